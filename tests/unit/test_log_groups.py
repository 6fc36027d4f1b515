"""Every function's log group is declared (with a retention), output by name, and the runbook reads
those names (`vap logs`, the stack's outputs) instead of guessing `/aws/lambda/...` names, which a
function logging to its own group never writes to."""

from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path
from typing import Any

import boto3
import pytest
from moto import mock_aws
from template_kit import sam_template

from vap_cli.__main__ import main
from vap_cli.logs import OUTPUT_SUFFIX, log_groups

ROOT = Path(__file__).resolve().parents[2]


def _functions(sam: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {k: r for k, r in sam["Resources"].items() if r["Type"] == "AWS::Serverless::Function"}


def test_every_function_logs_to_a_declared_group_that_the_stack_outputs() -> None:
    sam = sam_template()
    functions = _functions(sam)
    assert {"IngestFunction", "WebhookFunction", "SweeperFunction"} <= set(functions)
    for logical_id, function in functions.items():
        group = function["Properties"]["LoggingConfig"]["LogGroup"]["Ref"]
        declared = sam["Resources"][group]
        assert declared["Type"] == "AWS::Logs::LogGroup", logical_id
        assert declared["Properties"]["RetentionInDays"] == {"Ref": "LogRetentionDays"}, logical_id
        output = logical_id.removesuffix("Function") + OUTPUT_SUFFIX
        assert sam["Outputs"][output]["Value"] == {"Ref": group}, f"{logical_id}: no {output} output"


def test_the_readme_names_log_groups_only_through_the_stack() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "/aws/lambda/" not in readme  # the functions never log there
    named = set(re.findall(r"vap logs ([a-z|\\]+) --stack", readme))
    functions = {k.removesuffix("Function").lower() for k in _functions(sam_template())}
    assert named, "the runbook shows how to find a log group"
    for entry in named:
        assert set(entry.replace("\\", "").split("|")) <= functions, entry
    outputs = set(re.findall(r"`(\w+LogGroupName)`", readme))
    assert outputs and outputs <= set(sam_template()["Outputs"])


def test_log_groups_come_from_outputs_ending_in_the_suffix() -> None:
    outputs = {
        "BucketName": "b",
        "IngestLogGroupName": "vap-IngestLogGroup-A1",
        "WebhookLogGroupName": "vap-WebhookLogGroup-B2",
        "StoreLogGroupName": "vap-StoreLogGroup-C3",
        "SweeperLogGroupName": "",
    }
    assert log_groups(outputs) == {
        "ingest": "vap-IngestLogGroup-A1",
        "store": "vap-StoreLogGroup-C3",
        "webhook": "vap-WebhookLogGroup-B2",
    }


# A deployed stack in moto's CloudFormation: a bucket and two log groups, output as the template does.
_STACK = {
    "Resources": {
        "Bucket": {"Type": "AWS::S3::Bucket"},
        "IngestLogGroup": {"Type": "AWS::Logs::LogGroup", "Properties": {"RetentionInDays": 30}},
        "WebhookLogGroup": {"Type": "AWS::Logs::LogGroup", "Properties": {"RetentionInDays": 30}},
    },
    "Outputs": {
        "BucketName": {"Value": {"Ref": "Bucket"}},
        "IngestLogGroupName": {"Value": {"Ref": "IngestLogGroup"}},
        "WebhookLogGroupName": {"Value": {"Ref": "WebhookLogGroup"}},
    },
}


def _vap(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([*args, "--stack", "vap", "--region", "us-east-1"])
    return code, out.getvalue(), err.getvalue()


@pytest.fixture
def deployed(monkeypatch: pytest.MonkeyPatch) -> Any:
    for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}.items():
        monkeypatch.setenv(name, value)
    with mock_aws():
        cfn = boto3.client("cloudformation", region_name="us-east-1")
        cfn.create_stack(StackName="vap", TemplateBody=json.dumps(_STACK))
        yield boto3.client("logs", region_name="us-east-1")


def test_vap_logs_prints_the_groups_the_stack_created(deployed: Any) -> None:
    created = {g["logGroupName"] for g in deployed.describe_log_groups()["logGroups"]}
    code, out, _ = _vap("logs")
    assert code == 0
    listed = dict(line.split() for line in out.splitlines())
    assert set(listed) == {"ingest", "webhook"} and set(listed.values()) == created

    code, out, _ = _vap("logs", "ingest")
    assert code == 0 and out.strip() == listed["ingest"] and out.strip() in created

    code, _, err = _vap("logs", "store")
    assert code == 2 and "no function 'store'" in err and "ingest, webhook" in err
