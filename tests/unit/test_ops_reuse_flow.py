"""Result reuse wired into ingest and the webhook: an equal earlier job's result is copied, nothing
else is (emulated AWS, fake Modal/fal; the local-stack test runs the same cases end to end)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import ingest
import pytest
from botocore.exceptions import ClientError
from ops_flow import POSTER, PREVIEW, gpu_succeeds, submit
from test_ingest_capacity import DelayRecorder
from vap_shared.ingest_logic import Ingestor
from vap_shared.reuse import ITEM_PREFIX
from vap_testkit import BUCKET, MP4, FakeServices, Stack, call, handlers_on, sqs_event, stack

from tests.notification_schema import problems


@pytest.fixture
def st(monkeypatch: pytest.MonkeyPatch) -> Iterator[Stack]:
    with stack(monkeypatch, FakeServices()) as s, handlers_on(s):
        yield s


def _backend_calls(st: Stack) -> int:
    return len(st.services.calls("modal.test")) + len(st.services.calls("queue.fal.test"))


def _earlier(st: Stack) -> str:
    """A first job, run on the (fake) GPU to success: the result later jobs may reuse."""
    first = submit(st, "a/horse")
    assert gpu_succeeds(st, first)["status"] == 200
    assert st.store.get(first).state == "succeeded"
    st.notifications()  # drop the first job's notification
    return first


def test_an_identical_resubmission_under_another_name_copies_the_earlier_result(st: Stack) -> None:
    first = _earlier(st)
    calls = _backend_calls(st)

    second = submit(st, "b/pony")  # same bytes, settings and seed, another folder and name

    assert _backend_calls(st) == calls  # no GPU, no fal
    job = st.store.get(second)
    assert job.state == "succeeded" and job.reused_from == first and job.backend is None
    prefix = f"outputs/b/pony/{second}/"
    assert job.output_key == prefix + "video.mp4" and job.metadata_key == prefix + "metadata.json"
    assert st.s3.get_object(Bucket=BUCKET, Key=prefix + "video.mp4")["Body"].read() == MP4
    # The previews came along, next to the video.
    assert st.s3.get_object(Bucket=BUCKET, Key=prefix + "poster.jpg")["Body"].read() == POSTER
    assert st.s3.get_object(Bucket=BUCKET, Key=prefix + "preview.webp")["Body"].read() == PREVIEW
    assert job.poster_key == prefix + "poster.jpg" and job.preview_key == prefix + "preview.webp"
    meta = st.get_json(job.metadata_key)
    assert meta["reused_from"] == first and meta["job_id"] == second and meta["name"] == "b/pony"
    assert meta["output_key"] == prefix + "video.mp4" and meta["poster_key"] == prefix + "poster.jpg"
    assert meta["video"]["file_name"] == f"pony-{second}.mp4" and meta["video"]["file_size"] == len(MP4)
    assert meta["backend"] == "modal"  # how the video was made: the earlier job's run
    # Only the AWS side cost anything this time.
    assert [i["backend"] for i in meta["cost"]["items"]] == ["aws"] and meta["cost"] == job.cost
    (note,) = st.notifications()
    assert note["status"] == "succeeded" and note["version"] == "1.1" and note["reused_from"] == first
    assert note["backend"] is None and note["_attributes"]["backend"] == "none"
    assert note["video"]["url"] == note["output_url"] and "poster.jpg" in note["poster_url"]
    body = {k: v for k, v in note.items() if not k.startswith("_")}
    assert problems(body, note["_subject"], note["_attributes"]) == []
    status = st.get_json(prefix + "status.json")
    assert status["state"] == "succeeded" and status["reused_from"] == first and status["cost"] == job.cost


@pytest.mark.parametrize(
    "change",
    ["one byte of media", "a setting", "no seed", "reuse false", "an https medium"],
)
def test_anything_but_an_equal_request_runs(st: Stack, change: str) -> None:
    _earlier(st)
    calls = _backend_calls(st)
    if change == "one byte of media":
        second = submit(st, "b/pony", video=MP4[:-1] + b"\x01")
    elif change == "a setting":
        second = submit(st, "b/pony", guidance_scale=5.5)
    elif change == "no seed":
        second = submit(st, "b/pony", seed=None)
    elif change == "reuse false":
        second = submit(st, "b/pony", reuse=False)
    else:
        second = submit(st, "b/pony", image_url="https://storage.googleapis.com/bucket/face.png")
    job = st.store.get(second)
    assert job.state == "dispatched" and job.reused_from is None
    assert _backend_calls(st) == calls + 1
    expect_key = change in ("one byte of media", "a setting")
    assert (job.reuse_key is not None) == expect_key, job.reuse_key


def test_a_deleted_earlier_output_runs_again_and_becomes_the_result_to_reuse(st: Stack) -> None:
    first = _earlier(st)
    st.s3.delete_object(Bucket=BUCKET, Key=st.store.get(first).output_key)
    calls = _backend_calls(st)

    second = submit(st, "b/pony")
    assert st.store.get(second).state == "dispatched" and _backend_calls(st) == calls + 1
    key = st.store.get(second).reuse_key
    entry = st.runtime.reuse._client.get_item(
        TableName=st.runtime.settings.jobs_table, Key={"job_id": {"S": ITEM_PREFIX + key}}
    )["Item"]
    assert "reuse_stale_at" in entry  # the lookup marked the entry stale

    gpu_succeeds(st, second)
    # The new success replaced the stale entry: a third equal job copies the second one's result.
    third = submit(st, "c/foal")
    assert st.store.get(third).reused_from == second
    assert _backend_calls(st) == calls + 1


def test_of_two_equal_jobs_that_both_ran_the_first_to_succeed_is_the_one_reused(st: Stack) -> None:
    # Submitted before either had a result: both run, with the same key.
    one, two = submit(st, "a/horse"), submit(st, "b/pony")
    assert st.store.get(one).reuse_key == st.store.get(two).reuse_key is not None
    assert st.store.get(one).state == st.store.get(two).state == "dispatched"
    gpu_succeeds(st, two)
    gpu_succeeds(st, one)
    third = submit(st, "c/foal")
    assert st.store.get(third).reused_from == two


def test_a_reused_job_in_the_reuse_store_is_not_a_job(st: Stack) -> None:
    _earlier(st)
    # The reuse entry shares the table: it never shows up as a job.
    items = st.runtime.store._client.scan(TableName=st.runtime.settings.jobs_table)["Items"]
    entries = [i for i in items if i["job_id"]["S"].startswith(ITEM_PREFIX)]
    assert len(entries) == 1 and "state" not in entries[0] and "backend" not in entries[0]


def test_a_copy_the_service_cannot_make_runs_the_job_instead(
    st: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    _earlier(st)
    calls = _backend_calls(st)

    def refused(**kwargs: Any) -> None:
        raise ClientError({"Error": {"Code": "AccessDenied", "Message": "no"}}, "CopyObject")

    monkeypatch.setattr(st.runtime.s3, "copy_object", refused)
    second = submit(st, "b/pony")
    job = st.store.get(second)
    assert job.state == "dispatched" and job.reused_from is None and _backend_calls(st) == calls + 1


def test_an_equal_job_that_waited_for_capacity_reuses_the_result_that_came_meanwhile(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # One Modal container: 2 jobs at the GPU, the third equal one waits in the ingest queue.
    with stack(monkeypatch, FakeServices(), MODAL_CONTAINERS="1") as st, handlers_on(st):
        ingest._ingestor = Ingestor(st.runtime, sqs=DelayRecorder(st.sqs))  # re-queued undelayed
        first, second, third = (submit(st, f"burst/take-{n}") for n in range(3))
        states = [st.store.get(j).state for j in (first, second, third)]
        assert states == ["dispatched", "dispatched", "received"]
        url = st.runtime.settings.ingest_queue_url
        (waiting,) = st.sqs.receive_message(QueueUrl=url, WaitTimeSeconds=0).get("Messages", [])
        assert gpu_succeeds(st, first)["status"] == 200
        calls = _backend_calls(st)
        # Its turn comes: the result of the equal job that finished meanwhile is copied, no run.
        assert call(ingest.handler, sqs_event(waiting["Body"])) == {"batchItemFailures": []}
        job = st.store.get(third)
        assert job.state == "succeeded" and job.reused_from == first
        assert _backend_calls(st) == calls
        assert st.s3.get_object(Bucket=BUCKET, Key=job.output_prefix + "video.mp4")["Body"].read() == MP4
