"""Crash points: a failure injected once at each step must still end, after the natural retry
(SQS redelivery of a sidecar or a store request, the backend's callback retry, or the sweeper), in
exactly one terminal state and exactly one notification."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import ingest
import pytest
import webhook
from botocore.exceptions import ClientError
from test_sweeper import SweepServices
from vap_shared import ingest_logic, job_store, lifecycle, notifier, result_store, results
from vap_shared.backends import dispatch as dispatch_module
from vap_shared.jobs import utcnow
from vap_shared.sweeper import sweep
from vap_testkit import (
    BUCKET,
    MP4,
    call,
    fal_webhook_event,
    gpu_callback_event,
    gpu_result,
    handlers_on,
    s3_event,
    sqs_event,
    stack,
    upload_fal_example,
)

NAME = "inbox/set/job.json"
RESULT = gpu_result(7, timings={"total_s": 1.0})


class Injected(RuntimeError):
    """The injected crash."""


def crash_once(
    monkeypatch: pytest.MonkeyPatch, owner: Any, name: str, when: Callable[..., bool] = lambda *a, **k: True
) -> dict[str, int]:
    """Make `owner.name` raise once (the first call for which `when` holds), then behave."""
    original = getattr(owner, name)
    fired = {"count": 0}

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if not fired["count"] and when(*args, **kwargs):
            fired["count"] += 1
            raise Injected(f"injected crash in {name}")
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, wrapper)
    return fired


@pytest.fixture
def services():
    return SweepServices()


@pytest.fixture
def st(monkeypatch, services):
    with stack(monkeypatch, services) as s, handlers_on(s, with_sweeper=True):
        yield s


def upload(st, backend="modal"):
    return upload_fal_example(st, NAME, backend)


def deliver(event, receive_count=1) -> list[str]:
    """One SQS delivery to the ingest handler; the message ids SQS would redeliver."""
    response = call(ingest.handler, sqs_event(event, receive_count=receive_count))
    return [f["itemIdentifier"] for f in response["batchItemFailures"]]


def the_job(st):
    (job_id,) = st.job_ids()
    return st.store.get(job_id)


def post(event) -> int:
    try:
        return int(call(webhook.handler, event)["statusCode"])
    except Exception:
        return 502  # the Function URL answers 502 when the handler crashes; the sender retries


def gpu_done(st, job, call_id=None) -> Any:
    st.put(f"work/{job.job_id}/video.mp4", MP4, "video/mp4")
    body = {
        "job_id": job.job_id,
        "call_id": call_id or job.backend_call_id,
        "event": "succeeded",
        "sent_at": int(time.time()),
        "result": RESULT,
    }
    return gpu_callback_event(st, job.job_id, body)


def fal_done(st, job) -> Any:
    delivery = {
        "request_id": job.backend_call_id,
        "status": "OK",
        "payload": {"video": {"url": "https://v3.fal.media/files/out.mp4"}},
    }
    body = json.dumps(delivery).encode()
    return fal_webhook_event(job.job_id, body, st.services.fal_keys.headers(job.backend_call_id, body))


def store_failed_once(st) -> None:
    """The store function ran and handed its request back; SQS delivers it again (later)."""
    (answer,) = st.store_results().values()
    assert answer["batchItemFailures"], answer
    st.end_store_retry_delays()


def assert_exactly_once(st, status="succeeded"):
    job = the_job(st)
    assert job.state == status, (job.state, job.errors)
    notes = st.notifications()
    assert [n["status"] for n in notes] == [status], notes
    assert notes[0]["job_id"] == job.job_id
    return job


def modal_submits(st) -> list[Any]:
    return [r for r in st.services.calls("modal.test") if r.url.path == "/submit"]


# ---------------------------------------------------------------------------------------------- ingest


def test_crash_before_dispatch_is_redelivered_and_dispatched_once(st, monkeypatch):
    event = upload(st)
    fired = crash_once(monkeypatch, ingest_logic, "dispatch")
    assert deliver(event) == ["m-0"]  # the batch item failed: SQS redelivers it
    assert fired["count"] == 1
    assert the_job(st).state == "received" and not modal_submits(st)
    assert deliver(event, receive_count=2) == []
    job = the_job(st)
    assert job.state == "dispatched" and len(modal_submits(st)) == 1
    assert post(gpu_done(st, job)) == 200
    st.store_results()
    assert_exactly_once(st)


def test_crash_after_dispatch_before_the_record_is_written(st, monkeypatch):
    """The GPU got the job but the record still says `received` (its dispatch intent says Modal):
    the redelivery submits the same job id again, which the GPU API answers with the same call, so
    the job runs once and that call finishes it."""
    event = upload(st)
    crash_once(monkeypatch, job_store.JobStore, "transition", when=lambda self, jid, target, *a, **k: True)
    assert deliver(event) == ["m-0"]
    first = the_job(st)
    assert first.state == "received" and first.backend_call_id is None and len(modal_submits(st)) == 1
    assert first.dispatch_intent == "modal" and first.dispatch_intent_at
    assert deliver(event, receive_count=2) == []
    job = the_job(st)
    assert job.state == "dispatched" and job.backend_call_id == "fc-1" and job.dispatch_intent is None
    assert len(modal_submits(st)) == 2 and set(st.services.modal_calls.values()) == {"fc-1"}
    assert post(gpu_done(st, job)) == 200
    st.store_results()
    assert_exactly_once(st)


def test_crash_after_dispatch_when_the_first_runs_callback_wins(st, monkeypatch):
    event = upload(st)
    crash_once(monkeypatch, job_store.JobStore, "transition")
    assert deliver(event) == ["m-0"]
    job = the_job(st)
    # The GPU finishes before SQS redelivers: its signed callback is the record.
    assert post(gpu_done(st, job, call_id="fc-1")) == 200
    st.store_results()
    assert the_job(st).state == "succeeded"
    assert deliver(event, receive_count=2) == []  # terminal: nothing dispatched again
    assert len(modal_submits(st)) == 1
    done = assert_exactly_once(st)
    assert done.backend == "modal" and done.backend_call_id == "fc-1"


def test_crash_while_failing_a_bad_sidecar_is_finished_by_the_redelivery(st, monkeypatch):
    st.put(NAME, b"{not json")
    event = s3_event(NAME, st.s3.head_object(Bucket=BUCKET, Key=NAME)["ETag"], size=9)
    crash_once(monkeypatch, lifecycle, "put_json", when=lambda s3, b, key, body: key.endswith("error.json"))
    assert deliver(event) == ["m-0"]
    assert the_job(st).state == "failed" and st.notifications() == []  # terminal, report + notify skipped
    assert deliver(event, receive_count=2) == []
    job = assert_exactly_once(st, "failed")
    assert st.get_json(job.error_report_key)["errors"] == job.errors


# ---------------------------------------------------------------------------------------------- storing


def test_crash_while_copying_the_gpu_output_is_retried_from_the_store_queue(st, monkeypatch):
    deliver(upload(st))
    job = the_job(st)
    crash_once(monkeypatch, result_store, "copy")
    assert post(gpu_done(st, job)) == 200  # answered at once: the result is queued
    store_failed_once(st)
    assert the_job(st).state == "dispatched"
    assert not [k for k in st.object_keys("outputs/") if k.endswith(("video.mp4", "metadata.json"))]
    st.store_results()
    done = assert_exactly_once(st)
    assert st.s3.get_object(Bucket=BUCKET, Key=done.output_key)["Body"].read() == MP4


def test_crash_while_writing_metadata_is_retried(st, monkeypatch):
    deliver(upload(st))
    job = the_job(st)
    crash_once(monkeypatch, results, "put_json", when=lambda s3, b, key, body: key.endswith("metadata.json"))
    assert post(gpu_done(st, job)) == 200
    store_failed_once(st)
    st.store_results()
    done = assert_exactly_once(st)
    assert st.get_json(done.metadata_key)["job_id"] == done.job_id


def test_s3_error_while_streaming_a_fal_result_leaves_no_partial_object(st, monkeypatch):
    deliver(upload(st, backend="fal"))
    job = the_job(st)
    original = st.runtime.s3.upload_part
    fired = []

    def failing_part(**kwargs):
        if not fired:
            fired.append(1)
            raise ClientError(
                {"Error": {"Code": "InternalError", "Message": "We encountered an error"}}, "UploadPart"
            )
        return original(**kwargs)

    monkeypatch.setattr(st.runtime.s3, "upload_part", failing_part)
    assert post(fal_done(st, job)) == 200
    store_failed_once(st)  # SQS delivers the store request again
    assert not st.object_keys("outputs/set/job/" + job.job_id + "/video.mp4")
    assert st.s3.list_multipart_uploads(Bucket=BUCKET).get("Uploads", []) == []  # aborted
    st.store_results()
    done = assert_exactly_once(st)
    assert st.s3.get_object(Bucket=BUCKET, Key=done.output_key)["Body"].read() == MP4


# ---------------------------------------------------------------------------------------------- notifying


def test_crash_before_notifying_is_notified_by_the_store_retry(st, monkeypatch):
    deliver(upload(st))
    job = the_job(st)
    crash_once(monkeypatch, notifier.Notifier, "publish")
    assert post(gpu_done(st, job)) == 200
    store_failed_once(st)
    done = the_job(st)
    assert done.state == "succeeded" and done.notified_at is None  # the claim was given back
    st.store_results()
    assert_exactly_once(st)


def test_crash_before_notifying_without_a_retry_is_notified_by_the_sweeper(st, monkeypatch):
    deliver(upload(st))
    job = the_job(st)
    crash_once(monkeypatch, notifier.Notifier, "publish")
    assert post(gpu_done(st, job)) == 200
    store_failed_once(st)
    st.sqs.purge_queue(QueueUrl=st.runtime.settings.store_queue_url)  # ... and the retry is lost
    outcomes = sweep(st.runtime, now=utcnow() + timedelta(seconds=5)).outcomes
    assert outcomes == {job.job_id: "notified"}
    assert_exactly_once(st)
    assert sweep(st.runtime, now=utcnow() + timedelta(seconds=5)).outcomes == {}
    assert st.notifications() == []


def test_crash_in_the_sweeper_while_recovering_is_finished_by_the_next_run(st, services, monkeypatch):
    deliver(upload(st))
    job = the_job(st)
    st.put(f"work/{job.job_id}/video.mp4", MP4, "video/mp4")
    services.modal_state = {"state": "succeeded", "result": RESULT}
    crash_once(monkeypatch, result_store, "queue_result")
    later = utcnow() + timedelta(hours=1)
    assert sweep(st.runtime, now=later).outcomes == {job.job_id: "error"}
    assert the_job(st).state == "dispatched" and st.store_requests_waiting() == 0
    assert sweep(st.runtime, now=later).outcomes == {job.job_id: "recovered"}
    st.store_results()
    assert_exactly_once(st)


@pytest.mark.parametrize("then", ["callback retry", "sweeper"])
def test_crash_during_fallback_dispatch_ends_in_one_clear_failure(st, services, monkeypatch, then):
    """The failure callback claims the one fallback, then crashes before dispatching to fal. The
    claim is never re-tried (a concurrent duplicate could dispatch twice): the retry, or else the
    sweeper, fails the job with Modal's reason."""
    deliver(upload(st, backend="auto"))
    job = the_job(st)
    crash_once(monkeypatch, dispatch_module, "dispatch")  # the fallback's submit (ingest's is bound)
    error = {"code": "internal", "message": "GPU lost", "retryable": True}
    body = {
        "job_id": job.job_id,
        "call_id": job.backend_call_id,
        "event": "failed",
        "sent_at": int(time.time()),
        "error": error,
    }
    event = gpu_callback_event(st, job.job_id, body)
    assert post(event) == 502
    assert the_job(st).state == "dispatched" and the_job(st).fallback_from == "modal"
    if then == "callback retry":
        assert post(event) == 200
    else:
        services.modal_state = {"state": "failed", "error": error}
        outcomes = sweep(st.runtime, now=utcnow() + timedelta(hours=1)).outcomes
        assert outcomes == {job.job_id: "failed"}
    failed = assert_exactly_once(st, "failed")
    assert "GPU lost" in failed.errors[0]["message"]
    assert not [r for r in st.services.calls("queue.fal.test")]
