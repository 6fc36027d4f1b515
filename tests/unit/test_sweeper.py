"""The sweeper: overdue jobs are settled with their backend (recover, fall back once, or fail)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import timedelta
from types import SimpleNamespace
from typing import Any

import httpx
import ingest
import pytest
import sweeper
import webhook
from vap_shared.jobs import iso, utcnow
from vap_shared.sweeper import DeadlineSweep, deadline_action
from vap_shared.sweeper import sweep as sweep_jobs
from vap_testkit import (
    FAL_QUEUE,
    MP4,
    Context,
    FakeServices,
    call,
    gpu_callback_event,
    gpu_result,
    handlers_on,
    sqs_event,
    stack,
    upload_fal_example,
)

RESULT = gpu_result(99)
LATER = timedelta(seconds=5400)  # the stop point of the tests' 4800 s budget (budget + 600 s)


@dataclass
class SweepServices(FakeServices):
    """FakeServices plus the GPU API's status/cancel and fal's status/response/cancel URLs."""

    modal_state: dict[str, Any] | None = None  # GET /status/{id} body; None → 404
    modal_status_code: int = 200
    fal_state: dict[str, Any] = field(default_factory=lambda: {"status": "IN_PROGRESS"})
    fal_status_code: int = 202
    fal_response: tuple[int, dict[str, Any]] = (200, {})
    fal_cancel: tuple[int, str] = (202, "CANCELLATION_REQUESTED")
    cancels: list[str] = field(default_factory=list)

    def handler(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if request.url.host == "modal.test" and (path.startswith(("/status/", "/cancel/"))):
            self.requests.append(request)
            if request.headers.get("modal-key") != "wk-test":
                return httpx.Response(401)
            if path.startswith("/cancel/"):
                self.cancels.append(path)
                return httpx.Response(200, json={"call_id": path.rsplit("/", 1)[1], "cancelled": True})
            if self.modal_state is None:
                return httpx.Response(404, json={"detail": "unknown call"})
            body = {"call_id": path.rsplit("/", 1)[1], **self.modal_state}
            return httpx.Response(self.modal_status_code, json=body)
        if request.url.host == "queue.fal.test" and "/requests/" in path:
            self.requests.append(request)
            if request.headers.get("authorization") != "Key fal-test-key-abc":
                return httpx.Response(401)
            if path.endswith("/cancel"):
                self.cancels.append(path)
                return httpx.Response(self.fal_cancel[0], json={"status": self.fal_cancel[1]})
            if path.endswith("/status"):
                return httpx.Response(self.fal_status_code, json=self.fal_state)
            return httpx.Response(self.fal_response[0], json=self.fal_response[1])
        return super().handler(request)


@pytest.fixture
def services():
    return SweepServices()


@pytest.fixture
def st(monkeypatch, services):
    with stack(monkeypatch, services) as s, handlers_on(s, with_sweeper=True):
        yield s


def dispatch(st, backend="modal", name="inbox/set/job.json"):
    call(ingest.handler, sqs_event(upload_fal_example(st, name, backend)))
    (job_id,) = [j for j in st.job_ids() if st.store.get(j).sidecar_key == name]
    job = st.store.get(job_id)
    assert job.state == "dispatched"
    return job


def sweep(st, later=LATER):
    return sweep_jobs(st.runtime, now=utcnow() + later).outcomes


def test_nothing_overdue_is_left_alone(st, services):
    job = dispatch(st)
    assert sweep(st, later=timedelta(0)) == {}
    assert st.store.get(job.job_id).state == "dispatched"
    assert not [r for r in services.requests if "/status/" in r.url.path]


def test_lost_gpu_callback_is_recovered_stored_and_notified_once(st, services):
    job = dispatch(st)
    st.put(f"work/{job.job_id}/video.mp4", MP4, "video/mp4")
    services.modal_state = {"state": "succeeded", "result": RESULT}
    assert sweep(st) == {job.job_id: "recovered"}
    # Queued for the store function, as the webhook would have had it stored.
    assert st.store.get(job.job_id).state == "dispatched" and st.store_requests_waiting() == 1
    st.store_results()
    done = st.store.get(job.job_id)
    assert done.state == "succeeded" and done.seed == 99 and done.backend == "modal"
    assert st.s3.get_object(Bucket="vap-test-bucket", Key=done.output_key)["Body"].read() == MP4
    assert st.get_json(done.metadata_key)["result"]["seed"] == 99
    (note,) = st.notifications()
    assert note["status"] == "succeeded"
    # Later sweeps (and the late callback) change nothing and notify nobody.
    assert sweep(st) == {}
    assert st.notifications() == []


def test_gpu_succeeded_but_upload_not_readable_yet_is_retried_next_run(st, services):
    job = dispatch(st)
    services.modal_state = {"state": "succeeded", "result": RESULT}
    assert sweep(st)[job.job_id] in ("pending", "fell-back", "failed")
    # Not stored and not notified while the upload is missing.
    assert not [k for k in st.object_keys("outputs/") if k.endswith(("video.mp4", "metadata.json"))]
    assert st.notifications() == []


def test_gpu_failure_reported_only_by_status_falls_back_once(st, services):
    job = dispatch(st, backend="auto")
    services.modal_state = {
        "state": "failed",
        "error": {"code": "internal", "message": "CUDA error", "retryable": True},
    }
    assert sweep(st) == {job.job_id: "fell-back"}
    after = st.store.get(job.job_id)
    assert after.backend == "fal" and after.fallback_from == "modal" and "CUDA error" in after.fallback_reason
    assert len(services.calls("queue.fal.test")) == 1
    assert st.notifications() == []
    # The re-dispatch restarts the clock: the next run does not touch it before its own deadline.
    assert sweep(st, later=timedelta(seconds=60)) == {}


def test_gpu_still_running_within_twice_the_deadline_is_left_alone(st, services):
    job = dispatch(st, backend="auto")
    services.modal_state = {"state": "running", "progress": {"step": 30, "total": 50}}
    assert sweep(st, later=timedelta(seconds=2000)) == {job.job_id: "running"}
    assert services.cancels == [] and st.store.get(job.job_id).backend == "modal"
    services.fal_state = {"status": "IN_PROGRESS"}
    fal_job = dispatch(st, backend="fal", name="inbox/set/fal.json")
    outcomes = sweep(st, later=timedelta(seconds=2000))
    assert outcomes[fal_job.job_id] == "running" and services.cancels == []


def test_gpu_still_running_past_deadline_is_cancelled_and_falls_back(st, services):
    job = dispatch(st, backend="auto")
    services.modal_state = {"state": "running", "progress": {"step": 3, "total": 50}}
    assert sweep(st) == {job.job_id: "fell-back"}
    assert services.cancels == [f"/cancel/{job.backend_call_id}"]
    after = st.store.get(job.job_id)
    assert after.backend == "fal" and "timeout" in after.fallback_reason


def test_overdue_without_fallback_fails_with_a_clear_reason_and_notifies(st, services):
    job = dispatch(st, backend="modal")
    services.modal_state = {"state": "queued"}
    assert sweep(st) == {job.job_id: "failed"}
    after = st.store.get(job.job_id)
    assert after.state == "failed"
    assert "did not finish within 5400 s" in after.errors[0]["message"]
    assert st.get_json(after.error_report_key)["errors"] == after.errors
    (note,) = st.notifications()
    assert note["status"] == "failed" and "did not finish" in note["errors"][0]["message"]
    assert sweep(st) == {}
    assert st.notifications() == []


@pytest.mark.parametrize(
    ("state", "status", "expected"),
    [
        (None, 200, "Modal has no record"),
        (
            {"state": "running"},
            503,
            "Modal could not be asked about the job: status request answered HTTP 503",
        ),
        (
            {"state": "failed", "error": {"code": "safety", "message": "flagged", "retryable": False}},
            200,
            "Generation failed on Modal: flagged",
        ),
    ],
)
def test_modal_lost_unreachable_or_refused_fails_clearly(st, services, state, status, expected):
    job = dispatch(st, backend="modal")
    services.modal_state, services.modal_status_code = state, status
    assert sweep(st) == {job.job_id: "failed"}
    assert expected in st.store.get(job.job_id).errors[0]["message"]
    assert len(st.notifications()) == 1


@pytest.mark.parametrize("backend", ["modal", "fal"])
def test_a_backend_that_cannot_be_asked_before_the_stop_point_is_asked_again(st, services, backend):
    # The job may be running fine: a 5xx from the status API is no reason to pay for it twice.
    job = dispatch(st, backend="auto" if backend == "modal" else "fal")
    services.modal_state, services.modal_status_code = {"state": "running"}, 503
    services.fal_state, services.fal_status_code = {"status": "IN_PROGRESS"}, 503
    assert sweep(st, later=timedelta(seconds=2000)) == {job.job_id: "unreachable"}
    after = st.store.get(job.job_id)
    assert after.state == "dispatched" and after.backend == backend and not st.notifications()
    assert services.cancels == []
    # Still unreachable at the stop point: then it is lost (fallback or a clear failure).
    assert sweep(st)[job.job_id] in ("fell-back", "failed")


def test_modal_down_in_auto_mode_falls_back_to_fal(st, services):
    job = dispatch(st, backend="auto")
    services.modal_state, services.modal_status_code = {"state": "running"}, 502
    assert sweep(st) == {job.job_id: "fell-back"}
    assert st.store.get(job.job_id).backend == "fal"


def test_fallback_happens_only_once_then_fails_with_both_reasons(st, services):
    job = dispatch(st, backend="auto")
    services.modal_state = {"state": "running"}
    assert sweep(st) == {job.job_id: "fell-back"}
    # fal never answers either.
    services.fal_state, services.fal_status_code = {"status": "IN_QUEUE"}, 202
    assert sweep(st) == {job.job_id: "failed"}
    after = st.store.get(job.job_id)
    assert after.state == "failed" and after.fallback_from == "modal"
    assert "fal.ai did not finish" in after.errors[0]["message"]
    assert any(c.endswith("/cancel") for c in services.cancels)
    (note,) = st.notifications()
    assert note["fallback_from"] == "modal" and note["backend"] == "fal"


def test_overdue_fal_request_that_is_running_is_waited_for_not_dropped(st, services):
    """fal's cancel removes only queued requests: a running one finishes and is billed, and its
    webhook will come. Failing it (or sending it to Modal too) would pay for a result and drop it."""
    job = dispatch(st, backend="auto")
    services.modal_state = {"state": "running"}
    assert sweep(st) == {job.job_id: "fell-back"}  # Modal stopped after its time: now at fal
    services.cancels.clear()
    services.fal_state, services.fal_status_code = {"status": "IN_PROGRESS"}, 202
    for _ in range(2):  # past the stop point, run after run
        assert sweep(st, later=2 * LATER) == {job.job_id: "running"}
    assert services.cancels == []
    after = st.store.get(job.job_id)
    assert after.state == "dispatched" and after.backend == "fal" and st.notifications() == []
    # Its result, when it comes, is stored as usual.
    services.fal_state, services.fal_status_code = {"status": "COMPLETED"}, 200
    services.fal_response = (200, {"video": {"url": "https://v3.fal.media/files/out.mp4"}})
    assert sweep(st, later=2 * LATER) == {job.job_id: "recovered"}
    st.store_results()
    (note,) = st.notifications()
    assert note["status"] == "succeeded" and note["backend"] == "fal"


def test_a_fal_request_running_far_past_the_stop_point_is_abandoned(st, services):
    # A request that never finishes must not keep its job (and its place at fal) forever.
    job = dispatch(st, backend="fal")
    services.fal_state, services.fal_status_code = {"status": "IN_PROGRESS"}, 202
    assert sweep(st, later=2 * LATER) == {job.job_id: "running"}
    assert sweep(st, later=3 * LATER) == {job.job_id: "failed"}
    after = st.store.get(job.job_id)
    assert "fal.ai was still IN_PROGRESS 16200 s after it was sent" in after.errors[0]["message"]
    (note,) = st.notifications()
    assert note["status"] == "failed"


@pytest.mark.parametrize(
    ("answer", "outcome"),
    [
        ((400, "ALREADY_COMPLETED"), "running"),  # it started after the status request: wait for it
        ((202, "CANCELLATION_REQUESTED"), "failed"),  # removed from fal's queue: stopped
        ((200, "OK"), "failed"),
        ((404, "NOT_FOUND"), "failed"),
    ],
)
def test_overdue_queued_fal_request_is_cancelled_and_what_fal_answers_decides(st, services, answer, outcome):
    job = dispatch(st, backend="fal")
    services.fal_state, services.fal_status_code = {"status": "IN_QUEUE"}, 202
    services.fal_cancel = answer
    assert sweep(st) == {job.job_id: outcome}
    assert services.cancels == [f"/fal-ai/video-as-prompt/requests/{job.backend_call_id}/cancel"]
    after = st.store.get(job.job_id)
    if outcome == "running":
        assert after.state == "dispatched" and st.notifications() == []
    else:
        assert "fal.ai did not finish within 5400 s" in after.errors[0]["message"]
        assert len(st.notifications()) == 1


def test_lost_fal_webhook_is_recovered_from_the_response_url(st, services):
    job = dispatch(st, backend="fal")
    services.fal_state, services.fal_status_code = {"status": "COMPLETED"}, 200
    services.fal_response = (200, {"video": {"url": "https://v3.fal.media/files/out.mp4"}, "seed": 5})
    assert sweep(st) == {job.job_id: "recovered"}
    st.store_results()
    done = st.store.get(job.job_id)
    assert done.state == "succeeded" and done.seed == 5 and done.backend == "fal"
    assert st.s3.get_object(Bucket="vap-test-bucket", Key=done.output_key)["Body"].read() == MP4
    meta = st.get_json(done.metadata_key)
    assert "url" not in meta["result"]["video"]
    (note,) = st.notifications()
    assert note["status"] == "succeeded" and note["backend"] == "fal"
    # The status request carried the fal key to the queue host only.
    status_calls = [r for r in services.calls("queue.fal.test") if r.url.path.endswith("/status")]
    assert status_calls and all(str(r.url).startswith(FAL_QUEUE + "/") for r in status_calls)


def test_fal_failure_from_the_response_url_carries_fals_reason(st, services):
    job = dispatch(st, backend="fal")
    services.fal_state, services.fal_status_code = {"status": "COMPLETED"}, 200
    detail = [{"loc": ["body", "num_frames"], "msg": "must be at most 121", "type": "value_error"}]
    services.fal_response = (422, {"detail": detail})
    assert sweep(st) == {job.job_id: "failed"}
    errors = st.store.get(job.job_id).errors
    assert errors == [
        {"field": "num_frames", "message": "fal.ai rejected `num_frames`: must be at most 121."}
    ]
    assert len(st.notifications()) == 1


def test_fal_unknown_request_fails(st, services):
    job = dispatch(st, backend="fal")
    services.fal_status_code = 404
    assert sweep(st) == {job.job_id: "failed"}
    assert "fal.ai has no record" in st.store.get(job.job_id).errors[0]["message"]


def test_recorded_fal_urls_on_another_host_are_never_sent_the_key(st, services):
    job = dispatch(st, backend="fal")
    st.store.update_fields(
        job.job_id,
        {"fal_urls": {"status_url": "https://evil.test/steal", "response_url": "https://evil.test/r"}},
        "2026-01-01T00:00:00.000000Z",
        only_if_absent="nothing",
    )
    assert sweep(st) == {job.job_id: "failed"}
    assert services.calls("evil.test") == []
    assert "not on the configured fal queue host" in st.store.get(job.job_id).errors[0]["message"]


def test_terminal_job_whose_notification_was_skipped_is_notified_once(st, services):
    job = dispatch(st, backend="modal")
    # A crash right after the terminal transition: no notification was claimed.
    st.store.transition(
        job.job_id,
        "failed",
        {"errors": [{"field": None, "message": "boom"}], "completed_at": "x"},
        "2026-01-01T00:00:00.000000Z",
    )
    assert sweep(st, later=timedelta(seconds=10)) == {job.job_id: "notified"}
    (note,) = st.notifications()
    assert note["status"] == "failed"
    assert sweep(st, later=timedelta(seconds=10)) == {}


def test_one_broken_job_does_not_stop_the_others(st, services, monkeypatch):
    first = dispatch(st, backend="modal", name="inbox/set/a.json")
    st.put("inbox/set/b.json", b"")  # (not dispatched: never in the index)
    services.modal_state = {"state": "queued"}
    original = DeadlineSweep.settle
    calls = []

    def flaky(self, job_id, now):
        calls.append(job_id)
        if len(calls) == 1:
            raise RuntimeError("boom")
        return original(self, job_id, now)

    monkeypatch.setattr(DeadlineSweep, "settle", flaky)
    assert sweep_jobs(st.runtime, now=utcnow() + LATER).outcomes == {first.job_id: "error"}
    assert sweep_jobs(st.runtime, now=utcnow() + LATER).outcomes == {first.job_id: "failed"}


@pytest.mark.parametrize(
    ("age", "action"),
    [(0, "wait"), (1799, "wait"), (1800, "ask"), (3599, "ask"), (3600, "stop"), (9e9, "stop")],
)
def test_the_deadline_policy_is_a_function_of_the_numbers(age, action):
    assert deadline_action(age, ask_after_s=1800, stop_after_s=3600) == action


def test_a_job_reporting_progress_is_asked_about_only_once_it_falls_silent():
    # Dispatched 2,000 s ago (past the 1,800 s ask point) but heard from a minute ago: wait.
    assert deadline_action(2000, ask_after_s=1800, stop_after_s=3600, quiet_s=60) == "wait"
    assert deadline_action(2000, ask_after_s=1800, stop_after_s=3600, quiet_s=1900) == "ask"
    # Past the stop point, progress or not.
    assert deadline_action(4000, ask_after_s=1800, stop_after_s=3600, quiet_s=1) == "stop"


def test_the_deadline_sweep_takes_its_limits_from_its_caller(st, services):
    """Limits given by the caller instead of the budget's `silence_s` / `stop_after_s`."""
    job = dispatch(st, backend="modal")
    services.modal_state = {"state": "running"}
    deadlines = DeadlineSweep(st.runtime, ask_after_s=60, stop_after_s=120)
    assert sweep_jobs(st.runtime, now=utcnow() + timedelta(seconds=30), deadlines=deadlines).outcomes == {}
    later = sweep_jobs(st.runtime, now=utcnow() + timedelta(seconds=90), deadlines=deadlines)
    assert later.outcomes == {job.job_id: "running"} and services.cancels == []
    stopped = sweep_jobs(st.runtime, now=utcnow() + timedelta(seconds=130), deadlines=deadlines)
    assert stopped.outcomes == {job.job_id: "failed"} and services.cancels == [
        f"/cancel/{job.backend_call_id}"
    ]
    assert "did not finish within 120 s" in st.store.get(job.job_id).errors[0]["message"]


def test_handler_reports_counts(st, services):
    job = dispatch(st, backend="modal")
    services.modal_state = {"state": "queued"}
    # Test-only override of the (cached) budget the handler's deadline sweep reads: stop after 1 s.
    st.runtime.settings.__dict__["budget"] = SimpleNamespace(silence_s=1, stop_after_s=1)
    import time

    time.sleep(1.1)  # past the stop point: a queued call is stopped
    # The sweeper's whole timeout (240 s) is left, as at the start of a scheduled run.
    result = sweeper.handler({"source": "aws.events", "detail-type": "Scheduled Event"}, Context(240_000))
    assert result == {
        "counts": {"failed": 1},
        "jobs": {job.job_id: "failed"},
        "dead_letters": {},  # no INGEST_DLQ_URL here: nothing drained
        "dead_letters_left": None,
        "stuck": 1,
    }


@pytest.mark.parametrize("left_s", [60, 240])
def test_an_overdue_job_is_started_only_when_the_time_left_covers_its_worst_case(st, services, left_s):
    """Settling an overdue job may ask its backend three times and dispatch to the other one (a
    Modal submit twice): a run with less time left than that leaves it for the next run."""
    from vap_shared.sweeper.report import OVERDUE_JOB_MS

    job = dispatch(st, backend="auto")
    services.modal_state = {
        "state": "failed",
        "error": {"code": "internal", "message": "x", "retryable": True},
    }
    left_ms = left_s * 1000
    outcomes = sweep_jobs(st.runtime, now=utcnow() + LATER, time_left_ms=lambda: left_ms).outcomes
    if left_ms < OVERDUE_JOB_MS:
        assert outcomes == {} and st.store.get(job.job_id).state == "dispatched"
        assert not [r for r in services.requests if "/status/" in r.url.path]  # not even asked
    else:
        assert outcomes == {job.job_id: "fell-back"}


def test_the_sweeper_stores_through_the_store_path_not_the_webhooks_http_module() -> None:
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    code = "import sys, sweeper; print(sorted(m for m in sys.modules if m.startswith('vap_shared.')))"
    done = subprocess.run(
        [sys.executable, "-c", code],
        env={
            "PYTHONPATH": f"{root / 'functions' / 'sweeper'}:{root / 'shared'}",
            "AWS_DEFAULT_REGION": "us-east-1",
        },
        capture_output=True,
        text=True,
        check=True,
    )
    loaded = done.stdout
    assert "vap_shared.result_store" in loaded
    assert "vap_shared.webhook_logic" not in loaded and "vap_shared.url_refresh" not in loaded


def test_a_job_whose_result_waits_on_the_store_queue_counts_as_heard_from(st, services):
    """A backlog on the store queue must not make the sweeper ask the backend and queue it again."""
    job = dispatch(st)
    long_ago = iso(utcnow() - timedelta(seconds=1000))  # past the tests' ask point, before the stop
    st.store.update_fields(job.job_id, {"dispatched_at": long_ago}, long_ago, "completed_at")
    st.put(f"work/{job.job_id}/video.mp4", MP4, "video/mp4")
    callback = {
        "job_id": job.job_id,
        "call_id": job.backend_call_id,
        "event": "succeeded",
        "sent_at": int(time.time()),
        "result": RESULT,
    }
    assert call(webhook.handler, gpu_callback_event(st, job.job_id, callback))["statusCode"] == 200
    assert st.store_requests_waiting() == 1
    assert sweep(st, later=timedelta(0)).get(job.job_id) in (None, "not-due")
    assert not [r for r in services.requests if "/status/" in r.url.path]
