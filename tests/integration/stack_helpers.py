"""Small helpers shared by the stack tests."""

from __future__ import annotations

import json
import time
from typing import Any

from local_stack import LocalStack

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
