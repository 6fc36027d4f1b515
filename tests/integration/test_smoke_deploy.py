"""`make smoke` and the deploy's secrets report against the local stack (both are tested on
the local stack; `make deploy`'s modal/sam commands are tested with recorders in tests/unit)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import boto3
import pytest

from local_stack import LocalStack
from vap_cli import deploy

pytestmark = pytest.mark.stack

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def state(stack: LocalStack, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What `make local` writes (.local/stack.json), for this stack."""
    path = tmp_path_factory.mktemp("smoke") / "stack.json"
    path.write_text(json.dumps(stack.describe()), encoding="utf-8")
    return path


def test_make_smoke_passes_against_the_local_stack(stack: LocalStack, state: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "VAP_STACK"}
    # The smoke command is a separate process, as `make smoke` runs it; this process serves the stack.
    done = subprocess.run(
        ["make", "-s", "smoke", f"SMOKE_ARGS=--local-state {state} --poll 0.2 --timeout 600"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900, check=False,
    )  # fmt: skip
    report = done.stdout[done.stdout.rfind("smoke test job") :]
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    for check in ("job created", "status.json terminal", "MP4 probed", "notification received"):
        assert f"PASS  {check}:" in report, report
    assert "h264 832x480, 9 frames at 16 fps" in report
    assert "timings: upload -> job created" in report and "generation" in report
    assert report.rstrip().endswith("PASSED")
    # The temporary notification queue is gone afterwards.
    queues = stack.sqs.list_queues(QueueNamePrefix="vap-smoke-").get("QueueUrls", [])
    assert queues == []


def test_smoke_fails_when_the_local_stack_is_not_running(tmp_path: Path) -> None:
    state = tmp_path / "stack.json"
    state.write_text(json.dumps({"endpoint_url": "http://127.0.0.1:9", "bucket": "b"}))
    done = subprocess.run(
        ["make", "-s", "smoke", f"SMOKE_ARGS=--local-state {state}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
        env={k: v for k, v in os.environ.items() if k != "VAP_STACK"},
    )  # fmt: skip
    assert done.returncode != 0 and "not running" in done.stderr


def test_secrets_report_names_the_placeholders_left(stack: LocalStack) -> None:
    aws = boto3.session.Session(region_name=stack.region)  # AWS_ENDPOINT_URL points it at the stack
    outputs = deploy.stack_outputs(aws, stack.config.stack_name)
    report = {s.what: s for s in deploy.secrets_report(aws, outputs)}
    assert {s.state for s in report.values()} == {"set"}  # the local stack puts real values in
    assert report["fal key"].arn == outputs["FalKeySecretArn"]
    sm = stack.client("secretsmanager")
    original = sm.get_secret_value(SecretId=outputs["FalKeySecretArn"])["SecretString"]
    sm.put_secret_value(SecretId=outputs["FalKeySecretArn"], SecretString="REPLACE_WITH_FAL_KEY")
    try:
        report = {s.what: s for s in deploy.secrets_report(aws, outputs)}
    finally:
        sm.put_secret_value(SecretId=outputs["FalKeySecretArn"], SecretString=original)
    assert report["fal key"].state == "placeholder" and report["Modal proxy-auth token"].state == "set"
    command = f"aws secretsmanager put-secret-value --secret-id {outputs['FalKeySecretArn']} "
    assert report["fal key"].how.startswith(command)
