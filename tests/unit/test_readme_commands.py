"""The README's commands exist: every `make TARGET` it names is a Makefile target, and its Deploy
section is the deploy command, the secrets step and the smoke check."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _targets() -> set[str]:
    text = (ROOT / "Makefile").read_text(encoding="utf-8")
    return set(re.findall(r"^([a-z][\w-]*):", text, re.MULTILINE))


def test_every_make_target_the_readme_names_exists() -> None:
    named = set(re.findall(r"\bmake ([a-z][\w-]*)", (ROOT / "README.md").read_text(encoding="utf-8")))
    assert {"deploy", "smoke", "test", "demo", "layer"} <= named
    assert named <= _targets(), named - _targets()


def test_the_deploy_section_is_deploy_secrets_and_smoke() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("\n## Deploy\n", 1)[1].split("\n## ", 1)[0]
    steps = re.findall(r"^\d\. \*\*(\w+)", section, re.MULTILINE)
    assert steps == ["Deploy", "Secrets", "Check"]
    assert "make deploy STACK=" in section and "make smoke STACK=" in section
    assert section.count("aws secretsmanager put-secret-value") == 2
    assert "sam build" not in section and "--guided" not in section  # one command, no hand steps
    for variable in ("JOB_BUDGET_S", "MODAL_CONTAINERS", "FAL_MAX_OUTSTANDING", "DOWNLOAD_WEIGHTS"):
        assert f"$(if $({variable})" in (ROOT / "Makefile").read_text(), variable
