"""Recovery on the local stack: the sweeper settles jobs whose callback/webhook never arrived."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from stack_helpers import get_json, jobs_for, settle, sidecar
from test_backend_faults import quiet

from local_stack import LocalStack
from local_stack.fal_server import FalServer
from local_stack.moto_server import AwsFault

pytestmark = pytest.mark.stack


def _media(folder: str, sample_media: dict[str, bytes]) -> dict[str, bytes]:
    return {f"{folder}/{n}": d for n, d in sample_media.items()}


def _job(stack: LocalStack, key: str) -> dict[str, Any]:
    (item,) = jobs_for(stack, key)
    return {k: next(iter(v.values())) for k, v in item.items()}


def _wait(predicate: Any, timeout_s: float = 120.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError("timed out waiting")


def _dispatched(stack: LocalStack, key: str) -> dict[str, Any] | None:
    items = jobs_for(stack, key)
    return _job(stack, key) if items and items[0]["state"]["S"] == "dispatched" else None


# Sweeps run with the job budget shrunk (local only): B 9000 s -> 3 s, so a job is overdue (its
# backend is asked) 2 s after dispatch and a still-running one is stopped after 4 s.
OVERDUE_SCALE = 0.0003
OVERDUE_S = 2


@pytest.fixture
def overdue(stack: LocalStack) -> Iterator[None]:
    quiet(stack)
    yield


def sweep(stack: LocalStack) -> dict[str, Any]:
    return stack.run_sweeper(time_scale=OVERDUE_SCALE)


def test_lost_fal_webhook_is_recovered_by_the_sweeper(
    stack: LocalStack, fal: FalServer, sample_media: dict[str, bytes], folder: str, overdue: None
) -> None:
    fal.behaviour.deliver_webhook = False
    key = f"{folder}/lost-fal.json"
    stack.put_job(key, sidecar(backend="fal"), _media(folder, sample_media))
    job = _wait(lambda: _dispatched(stack, key))
    _wait(lambda: fal.requests[job["backend_call_id"]].status == "COMPLETED")
    time.sleep(OVERDUE_S + 0.1)
    report = sweep(stack)
    assert report["jobs"][job["job_id"]] == "recovered", report
    (note,) = stack.wait_for_notification(key, timeout_s=60)
    assert note.body["status"] == "succeeded" and note.body["backend"] == "fal"
    assert get_json(stack, note.body["metadata_key"])["backend"] == "fal"
    # Another sweep, then (late) the webhook itself: still one notification.
    assert job["job_id"] not in sweep(stack)["jobs"]
    fal._deliver(fal.requests[job["backend_call_id"]])
    settle(1.0)
    assert len(stack.notifications_for(key)) == 1


def _terminal_gpu_callback(event: dict[str, Any]) -> bool:
    if not str(event.get("rawPath", "")).startswith("/callbacks/gpu/"):
        return False
    try:
        return json.loads(event.get("body") or "{}").get("event") in ("succeeded", "failed")
    except ValueError:
        return False


def test_lost_gpu_callback_is_recovered_from_the_gpu_status_endpoint(
    stack: LocalStack, sample_media: dict[str, bytes], folder: str, overdue: None
) -> None:
    if stack.gpu is None:
        pytest.skip("no local GPU server")
    assert stack.webhook_server is not None
    key = f"{folder}/lost-gpu.json"
    gpu_status: dict[str, Any] = {}

    def gpu_says_succeeded(call_id: str) -> bool:
        assert stack.gpu is not None
        gpu_status.update(
            httpx.get(
                f"{stack.gpu.url.rstrip('/')}/status/{call_id}",
                headers={"Modal-Key": stack.modal_token[0], "Modal-Secret": stack.modal_token[1]},
            ).json()
        )
        return gpu_status["state"] == "succeeded"

    # Every attempt of the GPU's terminal callback is lost on the network: the webhook never sees it.
    with stack.webhook_server.dropping(_terminal_gpu_callback) as lost:
        stack.put_job(key, sidecar(backend="modal"), _media(folder, sample_media))
        _wait(lambda: lost, timeout_s=300)
        job = _job(stack, key)
        assert job["state"] in ("dispatched", "running")
        _wait(lambda: gpu_says_succeeded(job["backend_call_id"]), timeout_s=60)
        time.sleep(OVERDUE_S + 0.1)
        report = sweep(stack)
    assert report["jobs"][job["job_id"]] == "recovered", report
    (note,) = stack.wait_for_notification(key, timeout_s=60)
    assert note.body["status"] == "succeeded" and note.body["backend"] == "modal"
    assert stack.s3.head_object(Bucket=stack.bucket, Key=note.body["output_key"])["ContentLength"] > 0
    assert all(job["job_id"] in e["rawPath"] for e in lost)  # only this job's callback was lost
    settle(0.5)
    assert len(stack.notifications_for(key)) == 1


def test_fal_never_starting_is_cancelled_and_fails_the_job_with_a_clear_reason(
    stack: LocalStack, fal: FalServer, sample_media: dict[str, bytes], folder: str, overdue: None
) -> None:
    fal.behaviour.queue_s = 30.0  # still IN_QUEUE when the deadline passes
    key = f"{folder}/slow-fal.json"
    stack.put_job(key, sidecar(backend="fal"), _media(folder, sample_media))
    job = _wait(lambda: _dispatched(stack, key))
    time.sleep(OVERDUE_S + 0.1)
    assert sweep(stack)["jobs"][job["job_id"]] == "running"  # long, not lost: left alone
    time.sleep(OVERDUE_S)  # past the budget and its grace: stopped
    assert sweep(stack)["jobs"][job["job_id"]] == "failed"
    (note,) = stack.wait_for_notification(key, timeout_s=60)
    assert note.body["status"] == "failed"
    assert f"did not finish within {2 * OVERDUE_S} s" in note.body["errors"][0]["message"]
    assert fal.requests[job["backend_call_id"]].cancelled  # removed from fal's queue: never runs


def test_a_running_fal_request_past_the_deadline_is_waited_for_not_dropped(
    stack: LocalStack, fal: FalServer, sample_media: dict[str, bytes], folder: str, overdue: None
) -> None:
    """fal's cancel removes only queued requests: a running one finishes and is billed. The
    sweeper leaves it (no cancel, no failure) and its webhook ends the job."""
    fal.behaviour.delay_s = 4 * OVERDUE_S + 4.0  # IN_PROGRESS well past the (scaled) budget
    key = f"{folder}/running-fal.json"
    stack.put_job(key, sidecar(backend="fal"), _media(folder, sample_media))
    job = _wait(lambda: _dispatched(stack, key))
    _wait(lambda: fal.requests[job["backend_call_id"]].status == "IN_PROGRESS")
    time.sleep(2 * OVERDUE_S + 0.2)  # past the budget and its grace
    for _ in range(2):
        assert sweep(stack)["jobs"][job["job_id"]] == "running"
    request = fal.requests[job["backend_call_id"]]
    assert not request.cancelled
    (note,) = stack.wait_for_notification(key, timeout_s=60)
    assert note.body["status"] == "succeeded" and note.body["backend"] == "fal"
    _wait(lambda: request.deliveries)  # recorded once the webhook has answered (after it notified)
    assert request.deliveries[0] == 200


def test_a_crash_looping_sidecar_is_failed_from_the_dlq_by_the_sweeper(
    stack: LocalStack, sample_media: dict[str, bytes], folder: str
) -> None:
    """Ingest fails with an error it does not handle on every delivery of one sidecar (S3 answers
    500 to every read of it, through the SDK's retries): after maxReceiveCount deliveries SQS moves
    it to the DLQ; the sweeper then fails the job with an internal-error message and one
    notification, and deletes the dead letter."""
    key = f"{folder}/crash-loop.json"
    sidecar_reads = AwsFault(
        "s3", "GetObject", match=lambda request: request.key == key, code="InternalError", status=500
    )
    quiet(stack)
    stack.run_sweeper()  # drains what earlier tests left in the DLQ
    with stack.aws_fault(sidecar_reads):
        stack.put_job(key, sidecar(), _media(folder, sample_media))
        # 5 deliveries, 5 s apart (the tests' visibility timeout), then the redrive.
        _wait(lambda: stack.queue_depth(stack.dlq_url) >= 1, timeout_s=120)
    assert sidecar_reads.hits, "the fault was not injected"
    assert _job(stack, key)["state"] == "received" and not stack.notifications_for(key)

    report = stack.run_sweeper()
    job = _job(stack, key)
    assert report["jobs"][job["job_id"]] == "dead-letter-failed"
    assert report["dead_letters"].get("failed") == 1 and report["dead_letters_left"] == 0
    assert job["state"] == "failed"
    (note,) = stack.wait_for_notification(key, timeout_s=30)
    assert note.body["status"] == "failed" and note.body["job_id"] == job["job_id"]
    (error,) = note.body["errors"]
    assert error["field"] is None
    assert "could not process this sidecar after 5 attempts" in error["message"]
    assert get_json(stack, f"{job['output_prefix']}error.json")["errors"] == note.body["errors"]
    assert stack.queue_depth(stack.dlq_url) == 0
    # The next run finds nothing; still one notification.
    assert stack.run_sweeper()["dead_letters"] == {}
    settle(1)
    assert len(stack.notifications_for(key)) == 1
