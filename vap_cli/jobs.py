"""Finding jobs and reading their state from the outputs folder (`status.json`), no DynamoDB."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from typing import Any

from botocore.exceptions import ClientError

from .config import StackInfo
from .errors import EXIT_INVALID, CliError

JOB_ID = re.compile(r"^\d{8}T\d{6}Z-[0-9a-f]{10}$")
STATUS_FILE = "status.json"
TERMINAL = ("succeeded", "failed", "cancelled")


def read_json(stack: StackInfo, key: str) -> dict[str, Any] | None:
    try:
        body = stack.client("s3").get_object(Bucket=stack.bucket, Key=key)["Body"].read()
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404", "NotFound"):
            return None
        raise
    value = json.loads(body)
    return value if isinstance(value, dict) else None


def status_keys(stack: StackInfo, prefix: str) -> Iterator[str]:
    paginator = stack.client("s3").get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=stack.bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            if obj["Key"].endswith("/" + STATUS_FILE):
                yield str(obj["Key"])


def job_id_of(key: str) -> str:
    return key.rsplit("/", 2)[-2]


def runs_of(stack: StackInfo, name: str) -> list[str]:
    """Status keys of the runs of one sidecar name, newest first."""
    prefix = f"{stack.outputs_prefix}{name}/"
    keys = [k for k in status_keys(stack, prefix) if k.count("/") == prefix.count("/") + 1]
    return sorted(keys, key=job_id_of, reverse=True)


def find_upload(stack: StackInfo, name: str, etag: str, timeout_s: float = 60.0) -> dict[str, Any] | None:
    """The job ingest created for our sidecar upload (matched by the sidecar's ETag)."""
    deadline = time.monotonic() + timeout_s
    while True:
        for key in runs_of(stack, name)[:20]:
            status = read_json(stack, key)
            if status and status.get("sidecar_etag", "").strip('"') == etag:
                return status
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.5)


def status_key(stack: StackInfo, ref: str) -> str:
    """`ref` is a job id, a name (`<dir>/<name>`, latest run) or a sidecar key."""
    ref = ref.strip()
    if JOB_ID.match(ref):
        suffix = f"/{ref}/{STATUS_FILE}"
        for key in status_keys(stack, stack.outputs_prefix):
            if key.endswith(suffix):
                return key
        raise CliError(f"No job {ref} in s3://{stack.bucket}/{stack.outputs_prefix} (yet).", EXIT_INVALID)
    name = ref.strip("/").removeprefix(stack.inbox_prefix).removesuffix(".json")
    name = name.removeprefix(stack.outputs_prefix)
    runs = runs_of(stack, name)
    if not runs:
        raise CliError(f"No job named {name!r} (nothing under {stack.outputs_prefix}{name}/).", EXIT_INVALID)
    return runs[0]


def get_status(stack: StackInfo, ref: str) -> dict[str, Any]:
    key = status_key(stack, ref)
    status = read_json(stack, key)
    if status is None:
        raise CliError(f"s3://{stack.bucket}/{key} disappeared.", EXIT_INVALID)
    status["_key"] = key
    return status


def list_jobs(stack: StackInfo, states: list[str] | None = None, limit: int = 20) -> list[dict[str, Any]]:
    keys = sorted(status_keys(stack, stack.outputs_prefix), key=job_id_of, reverse=True)
    found: list[dict[str, Any]] = []
    for key in keys:
        status = read_json(stack, key)
        if status is None:
            continue
        if states and status.get("state") not in states and status.get("phase") not in states:
            continue
        found.append(status)
        if len(found) >= limit:
            break
    return found


def describe_progress(status: dict[str, Any]) -> str:
    phase = str(status.get("phase") or status.get("state") or "?")
    progress = status.get("progress") or {}
    if phase == "running" and progress.get("total"):
        return f"running step {progress.get('step', 0)}/{progress['total']}"
    return phase
