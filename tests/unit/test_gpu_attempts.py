"""GPU re-runs on the service side: Modal runs a preempted input again, on a fresh container with the
same call id, and every callback and URL refresh says which attempt sent it. The newest attempt
heard from is recorded; an older one changes nothing (no fallback, no second notification), and
progress never goes backwards."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import ingest
import pytest
import webhook
from vap_shared import routes
from vap_shared.jobs import iso, utcnow
from vap_shared.signing import signed_headers
from vap_testkit import (
    MP4,
    FakeServices,
    Stack,
    call,
    gpu_callback_event,
    gpu_result,
    handlers_on,
    sqs_event,
    stack,
    upload_fal_example,
    url_event,
)

RESULT = gpu_result(11)


@pytest.fixture
def st(monkeypatch: pytest.MonkeyPatch) -> Iterator[Stack]:
    with stack(monkeypatch, FakeServices()) as s, handlers_on(s):
        yield s


def _job(st: Stack, backend: str = "auto") -> Any:
    call(ingest.handler, sqs_event(upload_fal_example(st, backend=backend)))
    (job_id,) = st.job_ids()
    return st.store.get(job_id)


def _callback(st: Stack, job: Any, attempt: int, event: str, **extra: Any) -> tuple[int, dict[str, Any]]:
    payload = {
        "job_id": job.job_id,
        "call_id": job.backend_call_id,
        "event": event,
        "sent_at": int(time.time()),
        "attempt": attempt,
        **extra,
    }
    response = call(webhook.handler, gpu_callback_event(st, job.job_id, payload))
    return response["statusCode"], json.loads(response["body"])


def _progress(st: Stack, job: Any, attempt: int, step: int, total: int = 50) -> int:
    return _callback(st, job, attempt, "progress", progress={"step": step, "total": total})[0]


def _refresh(st: Stack, job: Any, attempt: int) -> int:
    body = json.dumps(
        {
            "job_id": job.job_id,
            "call_id": job.backend_call_id,
            "purpose": "start",
            "sent_at": 1,
            "attempt": attempt,
        }
    ).encode()
    headers = {k.lower(): v for k, v in signed_headers(st.gpu_key(job.job_id), body).items()}
    return int(call(webhook.handler, url_event(routes.path("urls", job.job_id), body, headers))["statusCode"])


def _shown(st: Stack, job: Any) -> Any:
    return st.get_json(job.output_prefix + "status.json")["progress"]


FAILURE = {"code": "internal", "message": "the container was preempted", "retryable": True}


def test_a_failure_from_a_superseded_attempt_never_falls_back_to_fal(st: Stack) -> None:
    """Paying fal for a job whose re-run is under way would pay twice."""
    job = _job(st)
    assert _progress(st, job, attempt=1, step=10) == 200
    assert _progress(st, job, attempt=2, step=1) == 200  # Modal re-ran the input
    assert st.store.get(job.job_id).gpu_attempt == 2
    status, body = _callback(st, job, 1, "failed", error=FAILURE)
    assert status == 200 and body["note"] == "stale callback ignored"
    after = st.store.get(job.job_id)
    assert after.state == "running" and after.backend == "modal" and after.fallback_from is None
    assert st.services.calls("queue.fal.test") == []
    assert st.notifications() == []


def test_a_url_refresh_from_a_superseded_attempt_is_refused(st: Stack) -> None:
    job = _job(st, backend="modal")
    assert _refresh(st, job, attempt=1) == 200
    assert _refresh(st, job, attempt=2) == 200  # the re-run asks at its start: recorded
    assert st.store.get(job.job_id).gpu_attempt == 2
    assert _refresh(st, job, attempt=1) == 409  # the old container stops


def test_progress_never_goes_backwards_across_attempts_or_out_of_order(st: Stack) -> None:
    job = _job(st, backend="modal")
    assert _progress(st, job, 1, 30) == 200
    assert st.store.get(job.job_id).progress == {"step": 30, "total": 50} and _shown(st, job)["step"] == 30
    # The re-run starts over: what was shown stays until the re-run passes it.
    for step in (1, 10, 25):
        assert _progress(st, job, 2, step) == 200
        assert st.store.get(job.job_id).progress == {"step": 30, "total": 50}
        assert _shown(st, job)["step"] == 30
    assert _progress(st, job, 2, 40) == 200
    assert st.store.get(job.job_id).progress == {"step": 40, "total": 50} and _shown(st, job)["step"] == 40
    # A late (reordered) callback of the same attempt, and any of the old one, change nothing.
    assert _progress(st, job, 2, 35) == 200
    assert _progress(st, job, 1, 45) == 200
    after = st.store.get(job.job_id)
    assert after.progress == {"step": 40, "total": 50} and after.gpu_attempt == 2


def test_the_re_runs_result_is_stored_and_notified_once(st: Stack) -> None:
    job = _job(st, backend="modal")
    st.put(f"work/{job.job_id}/video.mp4", MP4, "video/mp4")
    assert _progress(st, job, 2, 5) == 200
    # A success reported by the superseded attempt is not stored...
    status, body = _callback(st, job, 1, "succeeded", result=RESULT)
    assert status == 200 and body["note"] == "stale callback ignored" and st.store_requests_waiting() == 0
    # ...the re-run's is, once, however often it is delivered.
    for _ in range(2):
        assert _callback(st, job, 2, "succeeded", result=RESULT)[0] == 200
    st.store_results()
    done = st.store.get(job.job_id)
    assert done.state == "succeeded" and done.gpu_attempt == 2
    assert [n["status"] for n in st.notifications()] == ["succeeded"]
    assert _callback(st, job, 3, "failed", error=FAILURE)[0] == 200  # after the end: nothing
    assert st.store.get(job.job_id).state == "succeeded" and st.notifications() == []


def test_a_store_request_of_a_superseded_attempt_stores_nothing(st: Stack) -> None:
    job = _job(st, backend="modal")
    st.put(f"work/{job.job_id}/video.mp4", MP4, "video/mp4")
    assert _callback(st, job, 1, "succeeded", result=RESULT)[0] == 200  # queued...
    assert _progress(st, job, 2, 1) == 200  # ...then a re-run of the call is heard from
    st.store_results()
    assert st.store.get(job.job_id).state == "running" and st.notifications() == []
    assert not [k for k in st.object_keys("outputs/") if k.endswith("video.mp4")]


def test_the_newest_attempt_is_recorded_with_a_conditional_monotonic_write(st: Stack) -> None:
    job = _job(st, backend="modal")
    now = iso(utcnow())
    assert st.store.record_gpu_attempt(job.job_id, 3, now).gpu_attempt == 3
    assert st.store.record_gpu_attempt(job.job_id, 2, now) is None  # never lowered
    assert st.store.record_gpu_attempt(job.job_id, 3, now).gpu_attempt == 3
    assert st.store.get(job.job_id).gpu_attempt == 3


def test_a_fallback_starts_a_new_run_with_no_attempts_or_progress(st: Stack) -> None:
    job = _job(st)
    assert _progress(st, job, 2, 20) == 200
    assert _callback(st, job, 2, "failed", error=FAILURE)[0] == 200  # the newest attempt failed: fal
    after = st.store.get(job.job_id)
    assert after.backend == "fal" and after.fallback_from == "modal" and after.dispatch_intent == "fal"
    assert after.gpu_attempt is None and after.progress is None
    assert len(st.services.calls("queue.fal.test")) == 1
