"""The sweeper drains the ingest dead-letter queue: a sidecar whose ingest crashed on every delivery
(a bug, not bad input) ends failed with one notification, never left `received` in silence."""

from __future__ import annotations

import json
import time
from typing import Any

import ingest
import pytest
import sweeper
from vap_shared import ingest_logic
from vap_shared.ingest_logic import Ingestor
from vap_shared.jobs import Job
from vap_shared.sweeper import DeadLetterDrain, SweepReport, sweep
from vap_testkit import FAL_EXAMPLE, MP4, PNG, call, s3_event, sqs_event, stack

INTERNAL = "could not process this sidecar after 5 attempts"


@pytest.fixture
def st(monkeypatch):
    with stack(monkeypatch) as s:
        dlq = s.sqs.create_queue(QueueName="ingest-dlq")["QueueUrl"]
        # Settings are frozen: test-only override (the template sets INGEST_DLQ_URL).
        s.runtime.settings.__dict__["ingest_dlq_url"] = dlq
        ingest._ingestor = Ingestor(s.runtime)
        sweeper._runtime = s.runtime
        yield s
    ingest.reset()
    sweeper.reset()


def dlq_url(st) -> str:
    return str(st.runtime.settings.ingest_dlq_url)


def dead_letter(st, body: dict[str, Any] | str) -> None:
    st.sqs.send_message(QueueUrl=dlq_url(st), MessageBody=body if isinstance(body, str) else json.dumps(body))


def dlq_depth(st) -> int:
    attrs = st.sqs.get_queue_attributes(
        QueueUrl=dlq_url(st),
        AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
    )["Attributes"]
    return int(attrs["ApproximateNumberOfMessages"]) + int(attrs["ApproximateNumberOfMessagesNotVisible"])


def upload(st, name: str = "inbox/dl/job.json", sidecar: dict[str, Any] | None = None) -> dict[str, Any]:
    st.put("inbox/dl/clip.mp4", MP4)
    st.put("inbox/dl/face.png", PNG)
    body = sidecar or {**FAL_EXAMPLE, "video_url": "clip.mp4", "image_url": "face.png"}
    raw = json.dumps(body).encode()
    etag = st.put(name, raw)
    return s3_event(name, etag, size=len(raw))


def the_job(st) -> Job:
    (job_id,) = st.job_ids()
    job = st.store.get(job_id)
    assert job is not None
    return job


def run(st) -> dict[str, Any]:
    return dict(call(sweeper.handler, {"source": "aws.events", "detail-type": "Scheduled Event"}))


def crash_ingest(monkeypatch) -> None:
    def boom(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("a bug in ingest")

    monkeypatch.setattr(ingest_logic.Ingestor, "_process", boom)


def test_a_crash_looping_sidecar_ends_failed_with_one_notification(st, monkeypatch):
    event = upload(st)
    crash_ingest(monkeypatch)
    for attempt in range(1, 6):  # every delivery crashes: SQS would move it to the DLQ
        result = call(ingest.handler, sqs_event(event, receive_count=attempt))
        assert [f["itemIdentifier"] for f in result["batchItemFailures"]] == ["m-0"]
    job = the_job(st)
    assert job.state == "received" and not st.notifications()
    dead_letter(st, event)

    result = run(st)
    assert result["dead_letters"] == {"failed": 1} and result["dead_letters_left"] == 0
    assert result["jobs"] == {job.job_id: "dead-letter-failed"}
    job = the_job(st)
    assert job.state == "failed" and job.dispatch_lease_until is None
    (error,) = job.errors or []
    assert error["field"] is None and INTERNAL in error["message"] and "internal error" in error["message"]
    report = st.get_json(f"{job.output_prefix}error.json")
    assert report["status"] == "failed" and report["errors"] == job.errors
    assert st.get_json(f"{job.output_prefix}status.json")["phase"] == "failed"
    (note,) = st.notifications()
    assert note["status"] == "failed" and note["job_id"] == job.job_id
    assert note["errors"] == job.errors
    assert dlq_depth(st) == 0  # deleted

    # Idempotent: a second copy of the dead letter (or a later run) notifies nobody again.
    dead_letter(st, event)
    assert run(st)["dead_letters"] == {"done": 1}
    assert not st.notifications() and dlq_depth(st) == 0
    assert run(st)["dead_letters"] == {}


def test_two_copies_of_a_dead_letter_in_one_run_fail_the_job_once(st, monkeypatch):
    event = upload(st)
    crash_ingest(monkeypatch)
    call(ingest.handler, sqs_event(event, receive_count=5))
    job = the_job(st)
    dead_letter(st, event)
    dead_letter(st, event)  # at-least-once: the redrive delivered it twice
    result = run(st)
    assert result["dead_letters"] == {"failed": 1, "done": 1} and result["dead_letters_left"] == 0
    assert result["jobs"] == {job.job_id: "dead-letter-failed"}  # what the run did to the job
    assert the_job(st).state == "failed" and len(st.notifications()) == 1


def test_a_dead_letter_without_a_record_gets_one_created_and_failed(st):
    event = upload(st, "inbox/dl/never-recorded.json")
    dead_letter(st, event)  # ingest crashed before it even created the record
    assert not st.job_ids()
    assert run(st)["dead_letters"] == {"failed": 1}
    job = the_job(st)
    assert job.state == "failed" and job.sidecar_key == "inbox/dl/never-recorded.json"
    assert job.output_prefix.startswith("outputs/dl/never-recorded/")
    (note,) = st.notifications()
    assert note["status"] == "failed" and INTERNAL in note["errors"][0]["message"]


def test_a_job_already_ended_and_notified_is_not_notified_twice(st):
    event = upload(st, sidecar={"prompt": ""})  # a bad sidecar: failed and notified at once
    call(ingest.handler, sqs_event(event))
    job = the_job(st)
    assert job.state == "failed" and len(st.notifications()) == 1
    dead_letter(st, event)
    assert run(st)["dead_letters"] == {"done": 1}
    assert not st.notifications()
    assert the_job(st).errors == job.errors  # its own reason, not the internal-error one
    assert dlq_depth(st) == 0


def test_a_terminal_job_never_notified_is_notified_once(st, monkeypatch):
    event = upload(st, sidecar={"prompt": ""})
    monkeypatch.setattr(
        st.runtime.notifier, "publish", lambda job: (_ for _ in ()).throw(OSError("SNS down"))
    )
    call(ingest.handler, sqs_event(event))
    assert the_job(st).state == "failed" and not the_job(st).notified_at
    monkeypatch.undo()
    dead_letter(st, event)
    assert run(st)["dead_letters"] == {"done": 1}
    (note,) = st.notifications()
    assert note["status"] == "failed" and "prompt" in json.dumps(note["errors"])


def test_test_events_and_foreign_messages_are_deleted(st):
    dead_letter(st, {"Service": "Amazon S3", "Event": "s3:TestEvent", "Bucket": "vap-test-bucket"})
    dead_letter(st, "not json")
    dead_letter(st, {"Records": [{"eventSource": "aws:sns"}]})
    dead_letter(st, s3_event("inbox/dl/clip.mp4", "abc"))  # not a sidecar
    dead_letter(st, s3_event("inbox/dl/job.json", "abc", bucket="someone-elses"))
    assert run(st)["dead_letters"] == {"skipped": 5}
    assert dlq_depth(st) == 0 and not st.job_ids() and not st.notifications()


def test_a_dispatched_job_is_left_to_the_deadline_sweep(st, monkeypatch):
    event = upload(st)
    real_write_status = ingest_logic.write_status
    calls = {"n": 0}

    def crash_after_dispatch(s3: Any, bucket: str, job: Job) -> None:
        calls["n"] += 1
        if job.state == "dispatched":
            raise RuntimeError("crash after the dispatch was recorded")
        real_write_status(s3, bucket, job)

    monkeypatch.setattr(ingest_logic, "write_status", crash_after_dispatch)
    call(ingest.handler, sqs_event(event))
    assert the_job(st).state == "dispatched"
    dead_letter(st, event)
    assert run(st)["dead_letters"] == {"dispatched": 1}
    assert the_job(st).state == "dispatched" and not st.notifications() and dlq_depth(st) == 0


def test_a_job_being_dispatched_keeps_its_message_for_the_next_run(st):
    event = upload(st)
    Ingestor(st.runtime).get_or_create(the_job_id(event), ingest_logic.parse_sqs_body(json.dumps(event))[0])
    assert st.store.acquire_dispatch_lease(the_job_id(event), int(time.time()), 120)
    dead_letter(st, event)
    assert run(st)["dead_letters"] == {"busy": 1}
    assert the_job(st).state == "received" and not st.notifications()
    assert dlq_depth(st) == 1  # kept (hidden until after this run), retried by a later run
    st.store.release_dispatch_lease(the_job_id(event))
    st.sqs.purge_queue(QueueUrl=dlq_url(st))
    dead_letter(st, event)
    assert run(st)["dead_letters"] == {"failed": 1}
    assert the_job(st).state == "failed" and len(st.notifications()) == 1


def the_job_id(event: dict[str, Any]) -> str:
    from vap_shared.naming import job_id

    (e,) = ingest_logic.parse_sqs_body(json.dumps(event))
    return job_id(e.event_time, e.bucket, e.key, e.etag, e.sequencer)


def test_draining_is_bounded_per_run(st):
    for i in range(3):
        dead_letter(st, s3_event(f"inbox/dl/n{i}.json", f"e{i}"))
    report = sweep(st.runtime)
    assert report.dead_letters == {"failed": 3} and report.dead_letters_left == 0
    for i in range(3, 6):
        dead_letter(st, s3_event(f"inbox/dl/n{i}.json", f"e{i}"))
    bounded = SweepReport()
    DeadLetterDrain(st.runtime, st.sqs, dlq_url(st)).drain(bounded, limit=2)
    assert bounded.dead_letters == {"failed": 2} and bounded.dead_letters_left == 1
    assert len(st.notifications()) == 5


def test_a_failing_dead_letter_stays_and_does_not_stop_the_others(st, monkeypatch):
    dead_letter(st, s3_event("inbox/dl/a.json", "ea"))
    real = DeadLetterDrain.settle_event

    def flaky(self: DeadLetterDrain, event: Any, report: Any) -> str:
        if event.key.endswith("a.json"):
            raise RuntimeError("DynamoDB throttled")
        return real(self, event, report)

    monkeypatch.setattr(DeadLetterDrain, "settle_event", flaky)
    dead_letter(st, s3_event("inbox/dl/b.json", "eb"))
    assert run(st)["dead_letters"] == {"error": 1, "failed": 1}
    assert dlq_depth(st) == 1  # the failed one is kept for the next run


def test_no_dead_letter_queue_configured_means_no_sqs_calls(st):
    st.runtime.settings.__dict__["ingest_dlq_url"] = ""
    report = sweep(st.runtime, sqs=object())  # any SQS call would raise AttributeError
    assert report.dead_letters == {} and report.dead_letters_left is None
