"""Small helpers shared by the stack tests."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from local_stack import LocalStack
from local_stack.lambda_runtime import LambdaFunction

FIXTURE_FUNCTIONS = Path(__file__).resolve().parent / "fixture_functions"

PROMPT = "A red balloon drifts upward over a calm lake while the camera holds still."
DESCRIPTION = "A sneaker inflates into a smooth sphere and floats out of the top of the frame."


def sidecar(**fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "prompt": PROMPT,
        "video_description": DESCRIPTION,
        "video_url": "clip.mp4",
        "image_url": "image.png",
        "num_frames": 9,
        "seed": 7,
        # Every stack test sends the same media and seed: without this, all but the first job would
        # be answered by result reuse. Reuse tests pass reuse=None (absent: the default, true).
        "reuse": False,
    }
    base.update(fields)
    return {k: v for k, v in base.items() if v is not None}


def jobs_for(stack: LocalStack, sidecar_key: str) -> list[dict[str, Any]]:
    table = stack.client("dynamodb")
    items: list[dict[str, Any]] = []
    paginator = table.get_paginator("scan")
    for page in paginator.paginate(
        TableName=stack.jobs_table,
        FilterExpression="sidecar_key = :k",
        ExpressionAttributeValues={":k": {"S": sidecar_key}},
    ):
        items.extend(page["Items"])
    return items


def get_json(stack: LocalStack, key: str) -> Any:
    return json.loads(stack.s3.get_object(Bucket=stack.bucket, Key=key)["Body"].read())


def dlq_depth(stack: LocalStack) -> int:
    return stack.queue_depth(stack.dlq_url)


def settle(seconds: float) -> None:
    """Give duplicates a chance to (wrongly) produce something before asserting they did not."""
    time.sleep(seconds)


def probe_function(
    stack: LocalStack, timeout_s: float = 5.0, role_of: str | None = None, **env: str
) -> LambdaFunction:
    """The test-only `probe` handler as a function of the local stack (run as the stack runs its
    own): `timeout_s` its Timeout, `role_of` a template function whose role it signs with (else the
    harness's credentials), `env` its variables. Stop it after use."""
    assert stack.deployment is not None
    function = LambdaFunction(
        logical_id="Probe",
        name="probe",
        arn=f"arn:aws:lambda:{stack.region}:123456789012:function:probe",
        code_dir=FIXTURE_FUNCTIONS / "probe",
        handler="probe.handler",
        timeout_s=timeout_s,
        memory_mb=128,
        environment={
            "AWS_REGION": stack.region,
            "AWS_DEFAULT_REGION": stack.region,
            "AWS_ENDPOINT_URL": stack.endpoint_url,
            **env,
        },
        isolation=stack.config.lambda_isolation,
        credentials=(lambda: stack.role_credentials(role_of, "probe"))
        if role_of
        else (lambda: dict(stack.credentials)),
    )
    function.log.echo = False
    return function


def wait_until(predicate: Any, timeout_s: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)
