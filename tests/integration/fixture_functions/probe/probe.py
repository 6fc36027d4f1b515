"""A test-only Lambda handler for the local stack's own tests: the event says what to do.

Direct events:
  {"action": "echo", "variables": [...]}: the environment it runs in (pid, invocations so far in
      this environment, time left, the named variables);
  {"action": "sleep", "seconds": s}: sleeps (past its timeout, to be killed);
  {"action": "raise"}: an unhandled error; {"action": "exit"}: its process dies (a crash);
  {"action": "metric", "name": n}: prints one EMF line;
  {"action": "aws", "service": s, "operation": o, "params": {...}}: one AWS call with the
      environment's credentials, answered with the error code ("ok" if none) and the result.
A Function URL event runs the action in its JSON body. An SQS batch logs one line per record
({"seen": body, "count": receive count}), then: a body "slow-once" on its first receive sleeps
past any timeout, "exit-once" on its first receive kills the process; otherwise nothing failed.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

INVOCATIONS = 0  # per execution environment: module state survives warm invocations


def _crash() -> None:
    if "LAMBDA_TASK_ROOT" not in os.environ:  # run inside the harness (isolation "thread"): not ours to end
        raise RuntimeError("not in an execution environment of its own: the probe will not end this process")
    os._exit(3)


def _aws(event: dict[str, Any]) -> dict[str, Any]:
    import boto3
    from botocore.config import Config
    from botocore.exceptions import ClientError

    # S3 as the service's own clients use it: Signature Version 4, path style on an emulator.
    config = (
        Config(signature_version="s3v4", s3={"addressing_style": "path"})
        if event["service"] == "s3"
        else None
    )
    client = boto3.client(event["service"], config=config)
    try:
        result = getattr(client, event["operation"])(**event.get("params", {}))
    except ClientError as exc:
        return {"code": exc.response["Error"]["Code"], "message": exc.response["Error"].get("Message", "")}
    if isinstance(result, dict):
        result.pop("ResponseMetadata", None)
    return {"code": "ok", "result": json.loads(json.dumps(result, default=str))}


def _batch(records: list[dict[str, Any]]) -> dict[str, Any]:
    first = [r for r in records if r["attributes"].get("ApproximateReceiveCount") == "1"]
    for record in records:
        print(
            json.dumps(
                {"seen": record["body"], "count": int(record["attributes"]["ApproximateReceiveCount"])}
            )
        )
    if any(r["body"] == "exit-once" for r in first):
        _crash()
    if any(r["body"] == "slow-once" for r in first):
        time.sleep(float(os.environ.get("PROBE_SLOW_S", "30")))
    return {"batchItemFailures": []}


def _run(event: dict[str, Any], context: Any) -> Any:
    action = event.get("action")
    if action == "sleep":
        time.sleep(float(event["seconds"]))
        return {"slept": event["seconds"]}
    if action == "raise":
        raise ValueError("the probe was asked to fail")
    if action == "exit":
        _crash()
    if action == "metric":
        directive = {
            "Namespace": "Probe",
            "Dimensions": [[]],
            "Metrics": [{"Name": event["name"], "Unit": "Count"}],
        }
        doc = {
            "_aws": {"Timestamp": int(time.time() * 1000), "CloudWatchMetrics": [directive]},
            event["name"]: 1,
        }
        print(json.dumps(doc), flush=True)
        return {"ok": True}
    if action == "aws":
        return _aws(event)
    time.sleep(float(event.get("wait_s", 0)))
    return {
        "pid": os.getpid(),
        "invocations": INVOCATIONS,
        "remaining_ms": context.get_remaining_time_in_millis(),
        "env": {k: os.environ.get(k) for k in event.get("variables", [])},
    }


def handler(event: dict[str, Any], context: Any) -> Any:
    global INVOCATIONS
    INVOCATIONS += 1
    if "Records" in event:
        return _batch(event["Records"])
    if "requestContext" in event:
        result = _run(json.loads(event.get("body") or "{}"), context)
        return {"statusCode": 200, "body": json.dumps(result)}
    return _run(event, context)
