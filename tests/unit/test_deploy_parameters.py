"""`make deploy --parameter`: what `sam deploy` receives reads back, through the SAM CLI's own
argument parsing, as exactly the values asked for (empty ones and ones with spaces included), and a
value CloudFormation would refuse is refused before Modal or AWS is touched."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
from vap_shared.config import Settings
from vap_shared.contract import BACKEND_CHOICES, GPU_COUNTS

from local_stack.cfn import load_template
from vap_cli import deploy

ROOT = Path(__file__).resolve().parents[2]
SAM_PYTHON = ROOT / ".tools" / "sam" / "bin" / "python"
MODAL_URL = "https://acme--vap-gpu-api.modal.run"

# `sam deploy`'s click command parses the arguments (OptionNargs + CfnParameterOverridesType) exactly
# as on the command line; make_context stops before anything is deployed.
_SAM_PARSE = """
import json, sys
import click
from samcli.commands.deploy.command import cli
results = []
for argv in json.load(sys.stdin):
    try:
        results.append(cli.make_context("deploy", argv).params["parameter_overrides"])
    except click.ClickException as exc:
        results.append("refused: " + exc.format_message())
print(json.dumps(results))
"""


def sam_reads(commands: list[list[str]], template: Path) -> list[Any]:
    """The parameter overrides the installed SAM CLI reads from each `sam deploy ...` command."""
    assert SAM_PYTHON.exists(), "the SAM CLI is not installed (make venv builds .tools/sam)"
    argvs = []
    for command in commands:
        assert command[:2] == ["sam", "deploy"]
        argv = list(command[2:])
        argv[argv.index("--template-file") + 1] = str(template)
        argvs.append(argv)
    done = subprocess.run(
        [str(SAM_PYTHON), "-c", _SAM_PARSE],
        input=json.dumps(argvs),
        capture_output=True,
        text=True,
        env={**os.environ, "SAM_CLI_TELEMETRY": "0"},
        timeout=120,
        check=True,
    )
    results: list[Any] = json.loads(done.stdout)
    return results


@pytest.fixture
def template(tmp_path: Path) -> Path:
    path = tmp_path / "template.json"  # SAM reads the template while parsing its options
    path.write_text(json.dumps({"Resources": {}}), encoding="utf-8")
    return path


def command(parameters: dict[str, str]) -> list[str]:
    options = deploy.DeployOptions("vap", region="eu-west-1", parameters=parameters)
    return deploy.sam_deploy_command(options, Path("template.json"), MODAL_URL)


VALUES = {
    "empty (clears a value)": "",
    "spaces": "fal.media, *.fal.media, storage.googleapis.com",
    "leading and trailing spaces": "  padded  ",
    "double quotes": 'say "hi"',
    "single quote": "it's",
    "backslash inside": r"C:\temp\x",
    "equals and commas": "a=b,c=d",
    "looks like a second override": "x Other=y",
    "not ascii": "Grüße, 日本",
    "starts with dashes": "--region",
    "a tab and a newline": "a\tb\nc",
}


def test_sam_reads_back_every_value_exactly(template: Path) -> None:
    wanted = [{"FalMediaHosts": value, "FalUserId": "u-1"} for value in VALUES.values()]
    read = sam_reads([command(parameters) for parameters in wanted], template)
    for (what, _), parameters, got in zip(VALUES.items(), wanted, read, strict=True):
        expected = {**parameters, **deploy.DeployOptions("vap").overrides(MODAL_URL)}
        assert got == expected, what


UNPASSABLE = {
    "backslash at the end": "C:\\temp\\",
    "backslash before a space": "a\\ b",
    "backslash before a quote": 'a\\"b',
    "SAM's other form": "ParameterKey=A,ParameterValue=b",
}


def test_values_sam_would_misread_are_refused_before_anything_runs(
    template: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Each really is misread (or refused) by SAM when quoted the only way it allows...
    head = ["sam", "deploy", "--template-file", "t", "--parameter-overrides"]
    naive = [[*head, f'K="{value}"'] for value in UNPASSABLE.values()]
    for (what, value), got in zip(UNPASSABLE.items(), sam_reads(naive, template), strict=True):
        assert got != {"K": value}, what
    # ... so deploy refuses them by name, before Modal or sam run.
    for what, value in UNPASSABLE.items():
        modal, sam = _Never(), _Never()
        code = deploy.main(
            ["--stack", "vap", "--parameter", f"FalEndpointId={value}"], modal=modal, sam=sam, aws=object()
        )
        err = capsys.readouterr().err
        assert code == 1 and "FalEndpointId" in err and "cannot pass" in err, what


class _Never:
    def __call__(self, *args: Any) -> Any:
        raise AssertionError(f"nothing may run: {args}")


def test_a_parameter_cloudformation_would_refuse_is_refused_first(capsys: pytest.CaptureFixture[str]) -> None:
    cases = {
        "DefaultBackend=gpu": "not one of " + ", ".join(BACKEND_CHOICES),
        "MaxGpus=3": "not one of " + ", ".join(str(n) for n in GPU_COUNTS),
        "LogRetentionDays=31": "not one of",
        "MaxConcurrency=ten": "must be a number",
        "MaxConcurrency=1": "below its minimum 2",
        "OperatorEmail=not an address": "does not match",
        "NoSuchParameter=1": "has no parameter",
    }
    for argument, message in cases.items():
        code = deploy.main(
            ["--stack", "vap", "--parameter", argument], modal=_Never(), sam=_Never(), aws=object()
        )
        err = capsys.readouterr().err
        assert code == 1 and message in err and "nothing was deployed" in err, (argument, err)


def test_every_template_default_passes_the_check() -> None:
    parameters = load_template(ROOT / "template.yaml")["Parameters"]
    for name, spec in parameters.items():
        if "Default" in spec:
            assert deploy.parameter_problem(name, spec, str(spec["Default"])) is None, name


def test_max_receive_count_cannot_go_below_ingests_own_attempts(capsys: pytest.CaptureFixture[str]) -> None:
    """A sidecar waiting for late media is received INGEST_MAX_ATTEMPTS times before ingest fails it;
    a smaller MaxReceiveCount moves it to the dead-letter queue first, where it fails as internal."""
    attempts = Settings(bucket_name="b", jobs_table="t", topic_arn="a").ingest_max_attempts
    spec = load_template(ROOT / "template.yaml")["Parameters"]["MaxReceiveCount"]
    assert spec["MinValue"] == attempts
    assert spec["Default"] >= attempts
    assert f"INGEST_MAX_ATTEMPTS, {attempts}" in spec["ConstraintDescription"]

    below = str(attempts - 1)
    code = deploy.main(
        ["--stack", "vap", "--parameter", f"MaxReceiveCount={below}"],
        modal=_Never(),
        sam=_Never(),
        aws=object(),
    )
    err = capsys.readouterr().err
    assert code == 1
    assert f"MaxReceiveCount={below} is below its minimum {attempts}" in err
    assert "dead-letter queue" in err and "internal error" in err
    deploy.check_overrides(ROOT / "template.yaml", {"MaxReceiveCount": str(attempts)})
