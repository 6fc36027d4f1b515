"""The terminal status.json is written like the notification is sent: a failure is retried by the
same SQS redelivery (of a sidecar or a store request) / webhook retry / sweeper run, the job is
notified only after it is written, and the job records when it was (so the catch-up finds a job
whose status is stale)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import ingest
import pytest
import webhook
from botocore.exceptions import ClientError
from vap_shared.jobs import utcnow
from vap_shared.sweeper import sweep
from vap_testkit import (
    MP4,
    FakeServices,
    Stack,
    call,
    gpu_callback_event,
    gpu_result,
    handlers_on,
    s3_event,
    sqs_event,
    stack,
    upload_fal_example,
)

RESULT = gpu_result(7)


class StatusOutage:
    """S3 refusing the terminal status.json writes while `on` (everything else works)."""

    def __init__(self, s3: Any) -> None:
        self.on = True
        self.refused = 0
        self._put = s3.put_object
        s3.put_object = self.put_object

    def put_object(self, **kwargs: Any) -> Any:
        if self.on and kwargs["Key"].endswith("/status.json"):
            state = json.loads(kwargs["Body"])["state"]
            if state in ("succeeded", "failed", "cancelled"):
                self.refused += 1
                raise ClientError({"Error": {"Code": "SlowDown", "Message": "slow down"}}, "PutObject")
        return self._put(**kwargs)


@pytest.fixture
def st(monkeypatch: pytest.MonkeyPatch) -> Iterator[Stack]:
    with stack(monkeypatch, FakeServices()) as s, handlers_on(s):
        yield s


def _status(st: Stack, job: Any) -> dict[str, Any]:
    return dict(st.get_json(job.output_prefix + "status.json"))


def _succeed_callback(st: Stack, job: Any) -> dict[str, Any]:
    payload = {
        "job_id": job.job_id,
        "call_id": job.backend_call_id,
        "event": "succeeded",
        "sent_at": int(utcnow().timestamp()),
        "result": RESULT,
    }
    return gpu_callback_event(st, job.job_id, payload)


def _dispatched(st: Stack) -> Any:
    call(ingest.handler, sqs_event(upload_fal_example(st, backend="modal")))
    (job_id,) = st.job_ids()
    st.put(f"work/{job_id}/video.mp4", MP4, "video/mp4")
    return st.store.get(job_id)


def test_a_failed_terminal_status_write_is_retried_by_the_store_retry(st: Stack) -> None:
    job = _dispatched(st)
    outage = StatusOutage(st.runtime.s3)
    assert call(webhook.handler, _succeed_callback(st, job))["statusCode"] == 200
    (answer,) = st.store_results().values()
    assert answer["batchItemFailures"]  # handed back: SQS delivers the store request again
    after = st.store.get(job.job_id)
    assert after.state == "succeeded" and after.status_written_at is None and outage.refused == 1
    assert _status(st, job)["phase"] == "storing"  # stale: not terminal yet...
    assert st.notifications() == []  # ...so nobody is told yet
    assert st.store.unsettled_terminal() == [job.job_id]

    outage.on = False
    st.end_store_retry_delays()
    st.store_results()
    assert _status(st, job)["phase"] == "succeeded"
    (note,) = st.notifications()
    assert note["status"] == "succeeded"
    assert st.store.get(job.job_id).status_written_at and st.store.unsettled_terminal() == []


def test_ingest_redelivery_writes_a_failed_jobs_status_before_notifying(st: Stack) -> None:
    raw = b'{"prompt": "x"}'
    key = "inbox/bad/job.json"
    event = sqs_event(s3_event(key, st.put(key, raw), size=len(raw)))
    outage = StatusOutage(st.runtime.s3)
    assert call(ingest.handler, event) == {"batchItemFailures": [{"itemIdentifier": "m-0"}]}
    (job_id,) = st.job_ids()
    assert st.store.get(job_id).state == "failed" and st.notifications() == []
    assert outage.refused == 1
    outage.on = False
    assert call(ingest.handler, event) == {"batchItemFailures": []}
    job = st.store.get(job_id)
    assert _status(st, job)["phase"] == "failed" and job.status_written_at
    assert [n["status"] for n in st.notifications()] == ["failed"]


def test_the_sweeper_repairs_the_status_of_a_finished_job_nobody_retried(st: Stack) -> None:
    job = _dispatched(st)
    outage = StatusOutage(st.runtime.s3)
    call(webhook.handler, _succeed_callback(st, job))
    st.store_results()
    outage.on = False  # S3 is back, but the store request is gone (the DLQ)
    st.sqs.purge_queue(QueueUrl=st.runtime.settings.store_queue_url)
    outcomes = sweep(st.runtime, now=utcnow() + timedelta(minutes=5)).outcomes
    assert outcomes == {job.job_id: "notified"}
    assert _status(st, job)["phase"] == "succeeded"
    assert len(st.notifications()) == 1 and st.store.unsettled_terminal() == []
