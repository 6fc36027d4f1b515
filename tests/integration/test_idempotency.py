"""Duplicates and forgeries: one S3 event delivered several times is one job and one
notification; a callback delivered several times notifies once; a forged or stale callback is
rejected with 401 and changes nothing."""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
import pytest
from stack_helpers import get_json, jobs_for, settle, sidecar
from vap_shared import routes
from vap_shared.signing import derive_callback_key, signed_headers

from local_stack import LocalStack

pytestmark = pytest.mark.stack


@pytest.fixture(scope="module")
def finished_job(stack: LocalStack, sample_media: dict[str, bytes]) -> dict[str, Any]:
    """One job through the GPU path, with duplicates of its S3 event sent while it runs."""
    folder = f"inbox/dup-{time.time_ns()}"
    key = f"{folder}/twice.json"
    stack.put_job(key, sidecar(backend="modal"), {f"{folder}/{n}": d for n, d in sample_media.items()})
    poller = stack.ingest_poller
    deadline = time.monotonic() + 30
    bodies: list[str] = []
    while not bodies and time.monotonic() < deadline:
        # moto URL-encodes the key in the event, real S3 does not: match either form.
        bodies = [b for b in poller.received_bodies if key.split("/")[-1] in b and folder.split("/")[-1] in b]
        time.sleep(0.1)
    event_body = bodies[0]
    assert set(bodies) == {event_body}  # S3 itself may have delivered the event twice: the same body
    # At-least-once delivery: the same S3 event again, while the first is in flight.
    for _ in range(2):
        stack.sqs.send_message(QueueUrl=stack.ingest_queue_url, MessageBody=event_body)
    (note,) = stack.wait_for_notification(key, timeout_s=240)
    return {"key": key, "note": note, "event_body": event_body}


def _job(stack: LocalStack, key: str) -> dict[str, Any]:
    (job,) = jobs_for(stack, key)
    return job


def test_duplicate_s3_events_make_one_job(stack: LocalStack, finished_job: dict[str, Any]) -> None:
    assert finished_job["note"].body["status"] == "succeeded", finished_job["note"].body
    # And once more after the job has finished.
    stack.sqs.send_message(QueueUrl=stack.ingest_queue_url, MessageBody=finished_job["event_body"])
    settle(4)
    assert len(jobs_for(stack, finished_job["key"])) == 1
    assert len(stack.notifications_for(finished_job["key"])) == 1


def _callback(stack: LocalStack, job_id: str, call_id: str, event: str, **extra: Any) -> bytes:
    body = {"job_id": job_id, "call_id": call_id, "event": event, "sent_at": int(time.time()), **extra}
    return json.dumps(body).encode()


def _job_key(stack: LocalStack, job_id: str) -> bytes:
    arn = stack.deployment.secret_arns["SigningSecret"] if stack.deployment else ""
    secret = stack.client("secretsmanager").get_secret_value(SecretId=arn)["SecretString"]
    return derive_callback_key(secret.encode("utf-8"), job_id)


def test_repeated_gpu_callbacks_notify_once(stack: LocalStack, finished_job: dict[str, Any]) -> None:
    note = finished_job["note"].body
    job = _job(stack, finished_job["key"])
    metadata = get_json(stack, note["metadata_key"])
    body = _callback(
        stack, note["job_id"], job["backend_call_id"]["S"], "succeeded", result=metadata["result"]
    )
    url = routes.url(stack.webhook_url, "gpu", note["job_id"])
    for _ in range(3):
        reply = httpx.post(url, content=body, headers=signed_headers(_job_key(stack, note["job_id"]), body))
        assert reply.status_code == 200, reply.text
    settle(2)
    assert len(stack.notifications_for(finished_job["key"])) == 1
    assert _job(stack, finished_job["key"]) == job


def test_forged_or_stale_gpu_callbacks_get_401(stack: LocalStack, finished_job: dict[str, Any]) -> None:
    note = finished_job["note"].body
    job_id = note["job_id"]
    before = _job(stack, finished_job["key"])
    url = routes.url(stack.webhook_url, "gpu", job_id)
    failed = {"error": {"code": "internal", "message": "forged", "retryable": False}}
    body = _callback(stack, job_id, before["backend_call_id"]["S"], "failed", **failed)
    good_key = _job_key(stack, job_id)
    attempts = {
        "wrong key": signed_headers(b"\x00" * 32, body),
        "stale": signed_headers(good_key, body, now=time.time() - 3600),
        "future": signed_headers(good_key, body, now=time.time() + 3600),
        "garbled": {**signed_headers(good_key, body), "X-VAP-Signature": "v1=not-hex"},
        "missing": {"Content-Type": "application/json"},
        "other job's key": signed_headers(_job_key(stack, job_id + "x"), body),
    }
    for name, headers in attempts.items():
        reply = httpx.post(url, content=body, headers=headers)
        assert reply.status_code == 401, (name, reply.status_code, reply.text)
    # Signed for this job but the body names another: rejected too.
    other = _callback(stack, "20260101T000000Z-0000000000", "x", "failed", **failed)
    reply = httpx.post(url, content=other, headers=signed_headers(good_key, other))
    assert reply.status_code == 401, reply.text
    # Body changed after signing.
    headers = signed_headers(good_key, body)
    reply = httpx.post(url, content=body.replace(b"forged", b"FORGED"), headers=headers)
    assert reply.status_code == 401, reply.text
    settle(1)
    assert _job(stack, finished_job["key"]) == before
    assert len(stack.notifications_for(finished_job["key"])) == 1
