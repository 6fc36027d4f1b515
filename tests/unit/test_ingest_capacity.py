"""Backpressure: ingest dispatches only while the jobs outstanding at a backend are below what the
job budget allows there; the rest wait in the ingest queue (status `queued`), never as attempts."""

from __future__ import annotations

import json
from typing import Any

import ingest
import pytest
from vap_shared.ingest_logic import Ingestor
from vap_shared.jobs import iso, utcnow
from vap_testkit import FAL_EXAMPLE, MP4, PNG, FakeServices, Stack, call, s3_event, sqs_event, stack


@pytest.fixture
def services() -> FakeServices:
    return FakeServices()


class DelayRecorder:
    """The SQS client, recording each re-queue's DelaySeconds and sending it undelayed (so the
    test can receive it at once)."""

    def __init__(self, sqs: Any) -> None:
        self._sqs = sqs
        self.delays: list[int] = []

    def send_message(self, **kwargs: Any) -> Any:
        self.delays.append(kwargs.pop("DelaySeconds"))
        return self._sqs.send_message(**kwargs)


@pytest.fixture
def st(monkeypatch: pytest.MonkeyPatch, services: FakeServices) -> Any:
    # One Modal container: capacity 2 at Modal; fal takes 1.
    with stack(monkeypatch, services, MODAL_CONTAINERS="1", FAL_MAX_OUTSTANDING="1") as s:
        recorder = DelayRecorder(s.sqs)
        ingest._ingestor = Ingestor(s.runtime, sqs=recorder)
        s.delays = recorder.delays  # type: ignore[attr-defined]
        yield s
    ingest.reset()


def _upload(st: Stack, n: int, backend: str) -> dict[str, Any]:
    st.put("inbox/cap/clip.mp4", MP4)
    st.put("inbox/cap/face.png", PNG)
    raw = json.dumps({**FAL_EXAMPLE, "video_url": "clip.mp4", "image_url": "face.png", "backend": backend})
    key = f"inbox/cap/job-{n}.json"
    return s3_event(key, st.put(key, raw), size=len(raw))


def _job(st: Stack, key: str) -> Any:
    (job,) = [j for j in map(st.store.get, st.job_ids()) if j is not None and j.sidecar_key == key]
    return job


def _finish(st: Stack, job_id: str) -> None:
    st.store.transition(job_id, "succeeded", {"completed_at": iso(utcnow())}, iso(utcnow()))


def test_a_full_backend_keeps_the_job_queued_and_requeues_its_message(
    st: Stack, services: FakeServices
) -> None:
    events = [_upload(st, n, "modal") for n in range(3)]
    for event in events[:2]:
        assert call(ingest.handler, sqs_event(event)) == {"batchItemFailures": []}
    # The third: Modal has 2 outstanding = 2 x 1 container.
    result = call(ingest.handler, sqs_event(events[2], receive_count=1))
    assert result == {"batchItemFailures": []}  # this delivery is consumed...
    (message,) = st.handed_back()  # ...and a fresh one waits in the queue
    assert json.loads(message["Body"]) == events[2]
    # Looked at again after CAPACITY_RECHECK_SECONDS (jittered down to half of it).
    (delay,) = st.delays  # type: ignore[attr-defined]
    assert 15 <= delay <= 30
    waiting = _job(st, "inbox/cap/job-2.json")
    assert waiting.state == "received" and waiting.dispatch_lease_until is None
    assert st.get_json(waiting.output_prefix + "status.json")["phase"] == "queued"
    assert len(services.calls("modal.test")) == 2
    assert st.store.outstanding("modal") == 2

    # A place frees up: the re-queued message dispatches the recorded job without re-validating.
    _finish(st, _job(st, "inbox/cap/job-0.json").job_id)
    assert call(ingest.handler, sqs_event(message["Body"])) == {"batchItemFailures": []}
    assert _job(st, "inbox/cap/job-2.json").state == "dispatched"
    assert len(services.calls("modal.test")) == 3 and st.handed_back() == []


def test_waiting_is_not_an_attempt(st: Stack) -> None:
    events = [_upload(st, n, "modal") for n in range(3)]
    for event in events[:2]:
        call(ingest.handler, sqs_event(event))
    # Even a delivery at the last allowed attempt only waits: the job is not failed.
    attempts = st.runtime.settings.ingest_max_attempts
    assert call(ingest.handler, sqs_event(events[2], receive_count=attempts)) == {"batchItemFailures": []}
    (message,) = st.handed_back()
    assert message["Attributes"]["ApproximateReceiveCount"] == "1"
    assert _job(st, "inbox/cap/job-2.json").state == "received"


def test_auto_waits_for_a_busy_modal_instead_of_using_fal(st: Stack, services: FakeServices) -> None:
    events = [_upload(st, n, "auto") for n in range(3)]
    for event in events:
        call(ingest.handler, sqs_event(event))
    assert len(services.calls("modal.test")) == 2
    assert services.calls("queue.fal.test") == []
    assert _job(st, "inbox/cap/job-2.json").state == "received" and len(st.handed_back()) == 1


def test_modal_down_still_falls_back_within_fals_capacity(st: Stack, services: FakeServices) -> None:
    services.modal_status = 503
    events = [_upload(st, n, "auto") for n in range(2)]
    for event in events:
        assert call(ingest.handler, sqs_event(event)) == {"batchItemFailures": []}
    first = _job(st, "inbox/cap/job-0.json")
    assert first.state == "dispatched" and first.backend == "fal" and first.fallback_from == "modal"
    # fal holds one: the second waits (Modal is tried again when it comes back).
    assert _job(st, "inbox/cap/job-1.json").state == "received" and len(st.handed_back()) == 1
    assert len(services.calls("queue.fal.test")) == 1


def test_duplicate_deliveries_of_a_waiting_job_make_one_dispatch(st: Stack, services: FakeServices) -> None:
    events = [_upload(st, n, "modal") for n in range(3)]
    for event in events[:2]:
        call(ingest.handler, sqs_event(event))
    call(ingest.handler, sqs_event(events[2]))
    call(ingest.handler, sqs_event(events[2]))  # S3 delivered the event twice
    waiting = st.handed_back()
    assert len(waiting) == 2
    _finish(st, _job(st, "inbox/cap/job-0.json").job_id)
    for message in waiting:
        assert call(ingest.handler, sqs_event(message["Body"])) == {"batchItemFailures": []}
    assert _job(st, "inbox/cap/job-2.json").state == "dispatched"
    assert len(services.calls("modal.test")) == 3 and st.handed_back() == []


def test_a_copy_arriving_while_another_delivery_holds_the_lease_is_handed_back_not_dropped(
    st: Stack, services: FakeServices
) -> None:
    """At-least-once: SQS may hand the same message to two invocations. The one that finds the lease
    taken must not acknowledge it (that deletes the message the lease holder may still need if its
    submit fails); it hands it back, uncounted, and a later look finds the job dispatched or free."""
    event = _upload(st, 0, "modal")
    ingest.get_ingestor().get_or_create(_first_job_id(event), _first_event(event))
    job_id = _first_job_id(event)
    assert st.store.acquire_dispatch_lease(job_id, int(utcnow().timestamp()), 120)  # the other copy's
    assert call(ingest.handler, sqs_event(event)) == {"batchItemFailures": []}
    (message,) = st.handed_back()
    assert json.loads(message["Body"]) == event
    assert message["MessageAttributes"]["vap_attempts"]["StringValue"] == "0"  # not an attempt
    assert services.calls("modal.test") == [] and st.store.get(job_id).state == "received"
    # The lease holder failed and let go: the handed-back copy dispatches the job.
    st.store.release_dispatch_lease(job_id)
    assert call(ingest.handler, sqs_event(json.loads(message["Body"]))) == {"batchItemFailures": []}
    assert st.store.get(job_id).state == "dispatched"


def _first_event(event: dict[str, Any]) -> Any:
    from vap_shared.s3_events import parse_sqs_body

    (parsed,) = parse_sqs_body(json.dumps(event))
    return parsed


def _first_job_id(event: dict[str, Any]) -> str:
    from vap_shared.naming import job_id

    e = _first_event(event)
    return job_id(e.event_time, e.bucket, e.key, e.etag, e.sequencer)
