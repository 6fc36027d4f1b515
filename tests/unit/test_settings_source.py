"""One source of truth for settings: every template parameter default that reaches a function's
environment is the code's own default (vap_shared.config.Settings), so a function started without
the variable behaves exactly as the deployed stack does."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from vap_shared.config import Settings

from local_stack.cfn import load_template

TEMPLATE = load_template(Path(__file__).resolve().parents[2] / "template.yaml")
BASE_ENV = {"BUCKET_NAME": "b", "JOBS_TABLE": "t", "TOPIC_ARN": "arn:aws:sns:us-east-1:1:t"}
FUNCTIONS = ("IngestFunction", "WebhookFunction", "SweeperFunction", "StoreFunction")


def _parameter_env() -> list[tuple[str, str, str, dict[str, Any]]]:
    """(function, env var, parameter, parameter spec) for every `!Ref Parameter` in an environment."""
    found = []
    for function in FUNCTIONS:
        variables = TEMPLATE["Resources"][function]["Properties"]["Environment"]["Variables"]
        for name, value in variables.items():
            if isinstance(value, dict) and value.get("Ref") in TEMPLATE["Parameters"]:
                found.append((function, name, value["Ref"], TEMPLATE["Parameters"][value["Ref"]]))
    return found


PARAMETER_ENV = _parameter_env()


def _other_value(spec: dict[str, Any]) -> str:
    """A valid value different from the default (proves the variable is read at all)."""
    default = spec.get("Default")
    if "AllowedValues" in spec:
        return next(str(v) for v in spec["AllowedValues"] if str(v) != str(default))
    if spec["Type"] == "Number":
        value = int(default) + 1
        return str(value if value <= int(spec.get("MaxValue", value)) else int(default) - 1)
    if (
        "https://" in str(spec.get("AllowedPattern", ""))
        or str(default).startswith("https://")
        or default == ""
    ):
        return "https://other.example"
    return "other.example"


def test_every_parameter_reaching_an_environment_is_covered() -> None:
    # Guards the test below against passing vacuously.
    names = {name for _, name, _, _ in PARAMETER_ENV}
    assert {"MAX_SIDECAR_BYTES", "MAX_OUTPUT_BYTES", "JOB_BUDGET_SECONDS", "MODAL_CONTAINERS"} <= names
    assert all("Default" in spec for _, _, _, spec in PARAMETER_ENV)


@pytest.mark.parametrize(
    "function,name,parameter,spec", PARAMETER_ENV, ids=[f"{f}:{n}" for f, n, _, _ in PARAMETER_ENV]
)
def test_template_default_is_the_code_default(
    function: str, name: str, parameter: str, spec: dict[str, Any]
) -> None:
    defaults = Settings.from_env(BASE_ENV)
    deployed = Settings.from_env({**BASE_ENV, name: str(spec["Default"])})
    assert deployed == defaults, f"{parameter} defaults to {spec['Default']!r}; the code's default differs"
    assert Settings.from_env({**BASE_ENV, name: _other_value(spec)}) != defaults, f"{name} is not read"
