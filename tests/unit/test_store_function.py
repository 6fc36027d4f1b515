"""The store function: results are stored from the store queue, never inside the webhook's answer to
a delivery; every limit stays inside the invocation's time; retries are idempotent, and the last one
ends the job instead of leaving it waiting."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ingest
import pytest
import store
import webhook
from vap_shared import result_store
from vap_shared.result_store import STORE_RESERVE_S, StoreRequest
from vap_testkit import (
    BUCKET,
    MP4,
    Context,
    FakeServices,
    Stack,
    call,
    fal_webhook_event,
    handlers_on,
    sqs_event,
    stack,
    upload_fal_example,
)

from local_stack.cfn import load_template

TEMPLATE = load_template(Path(__file__).resolve().parents[2] / "template.yaml")


@pytest.fixture
def services() -> FakeServices:
    return FakeServices()


@pytest.fixture
def st(monkeypatch: pytest.MonkeyPatch, services: FakeServices) -> Iterator[Stack]:
    with stack(monkeypatch, services) as s, handlers_on(s):
        yield s


def _fal_job(st: Stack) -> Any:
    call(ingest.handler, sqs_event(upload_fal_example(st, backend="fal")))
    (job_id,) = st.job_ids()
    return st.store.get(job_id)


def _deliver(st: Stack, job: Any) -> dict[str, Any]:
    request_id = job.backend_call_id
    body = json.dumps(
        {
            "request_id": request_id,
            "status": "OK",
            "payload": {
                "video": {"url": "https://v3.fal.media/files/a/out.mp4", "content_type": "video/mp4"}
            },
        }
    ).encode()
    headers = st.services.fal_keys.headers(request_id, body)
    return dict(call(webhook.handler, fal_webhook_event(job.job_id, body, headers)))


def _store_event(body: str, receive_count: int = 1) -> dict[str, Any]:
    event = sqs_event(body, receive_count=receive_count)
    event["Records"][0]["eventSourceARN"] = "arn:aws:sqs:us-east-1:123456789012:store"
    return event


def test_the_webhook_answers_a_fal_delivery_without_downloading_the_video(st: Stack) -> None:
    job = _fal_job(st)
    response = _deliver(st, job)
    assert response["statusCode"] == 200
    assert st.services.calls("v3.fal.media") == []  # nothing downloaded while fal waits for us
    assert st.store.get(job.job_id).state == "dispatched" and st.store_requests_waiting() == 1
    st.store_results()
    assert len(st.services.calls("v3.fal.media")) == 1
    assert st.store.get(job.job_id).state == "succeeded"


def test_the_download_is_limited_to_the_invocations_time_left_less_a_reserve(
    st: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    limits: list[float] = []
    original = result_store.stream_url_to_s3

    def recording(*args: Any, **kwargs: Any) -> int:
        limits.append(kwargs["timeout_s"])
        return original(*args, **kwargs)

    monkeypatch.setattr(result_store, "stream_url_to_s3", recording)
    job = _fal_job(st)
    _deliver(st, job)
    st.store_results(remaining_ms=200_000)
    (limit,) = limits
    # Below what was left (200 s) by the reserve: metadata, the job record and the notification
    # still fit before Lambda's timeout.
    assert 200 - STORE_RESERVE_S - 1 <= limit <= 200 - STORE_RESERVE_S
    timeout = TEMPLATE["Resources"]["StoreFunction"]["Properties"]["Timeout"]
    assert timeout * 1000 > store.MIN_START_MS


def test_with_too_little_time_left_nothing_is_downloaded_and_the_request_comes_back(st: Stack) -> None:
    job = _fal_job(st)
    _deliver(st, job)
    (answer,) = st.store_results(remaining_ms=store.MIN_START_MS - 1).values()
    assert answer["batchItemFailures"] and st.services.calls("v3.fal.media") == []
    assert st.store_requests_waiting() == 1 and st.store.get(job.job_id).state == "dispatched"


def test_the_last_try_fails_the_job_with_the_reason_and_notifies_once(
    st: Stack, services: FakeServices
) -> None:
    job = _fal_job(st)
    services.cdn_status = 503
    _deliver(st, job)
    for _ in range(st.runtime.settings.store_max_receive_count - 1):
        (answer,) = st.store_results().values()
        assert answer["batchItemFailures"]
        st.end_store_retry_delays()
        assert st.store.get(job.job_id).state == "dispatched"
    (answer,) = st.store_results().values()  # the last receive: no DLQ, the job ends
    assert answer == {"batchItemFailures": []}
    failed = st.store.get(job.job_id)
    assert failed.state == "failed"
    assert failed.errors == [
        {
            "field": None,
            "message": "The fal.ai result could not be stored: downloading the result failed with HTTP 503.",
        }
    ]
    assert [n["status"] for n in st.notifications()] == ["failed"]
    assert st.store_requests_waiting() == 0


def test_a_retry_comes_back_after_a_backoff_shorter_than_the_visibility_timeout(
    st: Stack, services: FakeServices, monkeypatch: pytest.MonkeyPatch
) -> None:
    delays: list[int] = []
    original = st.runtime.sqs.change_message_visibility

    def recording(**kwargs: Any) -> Any:
        delays.append(kwargs["VisibilityTimeout"])
        return original(**kwargs)

    monkeypatch.setattr(st.runtime.sqs, "change_message_visibility", recording)
    job = _fal_job(st)
    services.cdn_status = 503
    _deliver(st, job)
    for _ in range(3):
        st.store_results()
        st.end_store_retry_delays()
    queue = TEMPLATE["Resources"]["StoreQueue"]["Properties"]
    assert delays == [30, 60, 120] and all(d < queue["VisibilityTimeout"] for d in delays)


def test_a_malformed_store_request_is_handed_back_not_dropped(st: Stack) -> None:
    answer = store.handler(_store_event('{"job_id": "x"}'), Context(300_000))
    assert answer == {"batchItemFailures": [{"itemIdentifier": "m-0"}]}


def test_a_request_for_a_finished_or_superseded_run_stores_nothing(st: Stack) -> None:
    job = _fal_job(st)
    other = StoreRequest(
        job_id=job.job_id,
        backend="fal",
        call_id="not-the-recorded-request",
        fal_output={"video": {"url": "x"}},
    )
    assert store.handler(_store_event(other.model_dump_json()), Context(300_000)) == {"batchItemFailures": []}
    assert st.store.get(job.job_id).state == "dispatched" and st.services.calls("v3.fal.media") == []
    gone = StoreRequest(job_id="20991231T000000Z-0000000000", backend="modal", call_id="fc-1")
    assert store.handler(_store_event(gone.model_dump_json()), Context(300_000)) == {"batchItemFailures": []}


def test_records_are_handed_back_when_the_invocation_runs_short(
    st: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch whose first record used up the time: the rest go back to SQS untouched."""
    job = _fal_job(st)
    request = StoreRequest(
        job_id=job.job_id,
        backend="fal",
        call_id=job.backend_call_id,
        fal_output={"video": {"url": "https://v3.fal.media/files/a/out.mp4"}},
    ).model_dump_json()
    event = sqs_event(request, request)
    clock = {"left": 300_000}

    class Shrinking(Context):
        def get_remaining_time_in_millis(self) -> int:
            return clock["left"]

    original = result_store.store_result

    def slow(*args: Any, **kwargs: Any) -> Any:
        outcome = original(*args, **kwargs)
        clock["left"] = store.MIN_START_MS - 1  # this one took most of the invocation
        return outcome

    monkeypatch.setattr(store, "store_result", slow)
    answer = store.handler(event, Shrinking())
    assert answer == {"batchItemFailures": [{"itemIdentifier": "m-1"}]}
    assert st.store.get(job.job_id).state == "succeeded"


def test_duplicate_store_requests_store_one_result_once(st: Stack) -> None:
    job = _fal_job(st)
    for _ in range(3):
        assert _deliver(st, job)["statusCode"] == 200  # fal redelivers, e.g. after a slow answer
    assert st.store_requests_waiting() == 3
    st.store_results()
    done = st.store.get(job.job_id)
    assert done.state == "succeeded" and len(st.services.calls("v3.fal.media")) == 1
    assert [n["status"] for n in st.notifications()] == ["succeeded"]
    assert st.s3.get_object(Bucket=BUCKET, Key=done.output_key)["Body"].read() == MP4


def test_a_stored_result_keeps_copies_of_its_inputs_readable_with_the_outputs(st: Stack) -> None:
    """The job's folder holds what made the video (the inbox expires; users may read only outputs/)."""
    job = _fal_job(st)
    _deliver(st, job)
    st.store_results()
    done = st.store.get(job.job_id)
    copies = done.input_copies
    assert copies == {
        "video_url": done.output_prefix + "inputs/reference.mp4",
        "image_url": done.output_prefix + "inputs/target.png",
    }
    assert st.s3.get_object(Bucket=BUCKET, Key=copies["video_url"])["Body"].read() == MP4
    target = st.s3.get_object(Bucket=BUCKET, Key=copies["image_url"])
    assert target["ContentType"] == "image/png"
    metadata = json.loads(st.s3.get_object(Bucket=BUCKET, Key=done.metadata_key)["Body"].read())
    status_object = st.s3.get_object(Bucket=BUCKET, Key=done.output_prefix + "status.json")
    status = json.loads(status_object["Body"].read())
    assert metadata["input_copies"] == copies and status["input_copies"] == copies


def test_an_input_gone_before_storing_is_simply_not_copied(st: Stack) -> None:
    job = _fal_job(st)
    st.s3.delete_object(Bucket=BUCKET, Key="inbox/set/face.png")
    _deliver(st, job)
    st.store_results()
    done = st.store.get(job.job_id)
    assert done.state == "succeeded" and set(done.input_copies or {}) == {"video_url"}
