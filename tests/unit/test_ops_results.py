"""What a finished job carries: previews next to the video, fal's `video`
object, the estimated cost, notification 1.1, and the job metrics the handlers print (EMF)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
import webhook
from ops_flow import (
    POSTER,
    PREVIEW,
    RESULT,
    emf,
    fal_delivers,
    gpu_fails,
    gpu_succeeds,
    metric_values,
    submit,
)
from vap_shared.fal_output import FalFile
from vap_shared.results import FAL_PREVIEWS_SKIPPED
from vap_shared.reuse import ITEM_PREFIX
from vap_testkit import BUCKET, MP4, FakeServices, Stack, call, handlers_on, stack, url_event

from tests.notification_schema import problems

H100_PER_S = 0.001097


@pytest.fixture
def st(monkeypatch: pytest.MonkeyPatch) -> Iterator[Stack]:
    monkeypatch.setenv("POWERTOOLS_METRICS_NAMESPACE", "VAP/unit")
    with stack(monkeypatch, FakeServices()) as s, handlers_on(s):
        yield s


def _note(st: Stack) -> dict[str, Any]:
    (note,) = st.notifications()
    body = {k: v for k, v in note.items() if not k.startswith("_")}
    assert problems(body, note["_subject"], note["_attributes"]) == []
    return note


def test_a_gpu_result_has_its_previews_cost_and_fal_shaped_video(st: Stack) -> None:
    job_id = submit(st, "a/horse")
    assert gpu_succeeds(st, job_id)["status"] == 200
    job = st.store.get(job_id)
    prefix = f"outputs/a/horse/{job_id}/"
    assert st.s3.get_object(Bucket=BUCKET, Key=prefix + "poster.jpg")["Body"].read() == POSTER
    assert st.s3.get_object(Bucket=BUCKET, Key=prefix + "preview.webp")["Body"].read() == PREVIEW
    assert st.s3.head_object(Bucket=BUCKET, Key=prefix + "poster.jpg")["ContentType"] == "image/jpeg"
    assert st.s3.head_object(Bucket=BUCKET, Key=prefix + "preview.webp")["ContentType"] == "image/webp"

    meta = st.get_json(prefix + "metadata.json")
    assert meta["version"] == "1.1"
    assert meta["poster_key"] == prefix + "poster.jpg" and meta["preview_key"] == prefix + "preview.webp"
    assert "previews_skipped" not in meta
    # fal's output File, field for field; its url serves the video.
    video = FalFile.model_validate(meta["video"])
    assert set(meta["video"]) == {"url", "content_type", "file_name", "file_size"}
    assert (video.content_type, video.file_name, video.file_size) == (
        "video/mp4",
        f"horse-{job_id}.mp4",
        len(MP4),
    )
    assert f"/outputs/a/horse/{job_id}/video.mp4" in video.url and "X-Amz-Signature" in video.url
    # GPU seconds of the run (timings.total_s) on the H100 its device name says, plus AWS.
    gpu, aws = meta["cost"]["items"]
    assert (gpu["backend"], gpu["gpu_type"], gpu["gpu_count"], gpu["quantity"]) == ("modal", "H100", 1, 210.0)
    assert gpu["amount"] == pytest.approx(210.0 * H100_PER_S) and aws["backend"] == "aws"
    assert meta["cost"]["estimate"] is True and meta["cost"]["total"] == job.cost["total"]
    assert job.gpu_type == "H100" and job.bytes == len(MP4)

    note = _note(st)
    assert note["version"] == "1.1" and note["cost"] == job.cost and "reused_from" not in note
    assert note["video"]["url"] == note["output_url"] and note["video"]["file_size"] == len(MP4)
    assert f"/outputs/a/horse/{job_id}/poster.jpg" in note["poster_url"]
    status = st.get_json(prefix + "status.json")
    assert status["cost"] == job.cost and status["poster_key"] == prefix + "poster.jpg"
    assert status["preview_key"] == prefix + "preview.webp" and status["gpus"] == 1


def test_a_gpu_result_without_previews_has_no_poster_url(st: Stack) -> None:
    job_id = submit(st, "a/horse")
    gpu_succeeds(st, job_id, previews=False)
    meta = st.get_json(st.store.get(job_id).metadata_key)
    assert meta["poster_key"] is None and meta["preview_key"] is None
    note = _note(st)
    assert "poster_url" not in note and note["video"]["file_size"] == len(MP4)


def test_the_cost_counts_every_gpu_of_a_multi_gpu_run(st: Stack) -> None:
    job_id = submit(st, "a/horse", gpus=4)
    gpu_succeeds(st, job_id, result={**RESULT, "gpu": "NVIDIA H200"})
    (gpu, _aws) = st.store.get(job_id).cost["items"]
    assert (gpu["gpu_type"], gpu["gpu_count"]) == ("H200", 4)
    assert gpu["amount"] == pytest.approx(210.0 * 4 * 0.001261)
    assert st.get_json(st.store.get(job_id).metadata_key)["gpus"] == 4


def test_the_cost_counts_the_gpus_the_run_used_not_the_ones_asked_for(st: Stack) -> None:
    """Routing may run a job on more GPUs than its sidecar asked for; the result says how many."""
    job_id = submit(st, "a/horse", gpus=1)
    gpu_succeeds(st, job_id, result={**RESULT, "gpu": "NVIDIA H100 80GB HBM3", "gpu_count": 4})
    (gpu, _aws) = st.store.get(job_id).cost["items"]
    assert (gpu["gpu_type"], gpu["gpu_count"]) == ("H100", 4)
    assert gpu["amount"] == pytest.approx(210.0 * 4 * H100_PER_S)
    # A result without the count (an older GPU side) is priced on the dispatched GPUs.
    other = submit(st, "a/pony", gpus=2, reuse=False)
    gpu_succeeds(st, other, result={k: v for k, v in RESULT.items() if k != "gpu_count"})
    assert st.store.get(other).cost["items"][0]["gpu_count"] == 2


def test_a_fal_result_is_priced_per_video_and_says_why_it_has_no_previews(st: Stack) -> None:
    job_id = submit(st, "a/horse", backend="fal")
    fal_video = {"url": "https://v3.fal.media/files/a/out.mp4", "content_type": "video/mp4"}
    assert fal_delivers(st, job_id, {"video": fal_video}) == 200
    job = st.store.get(job_id)
    meta = st.get_json(job.metadata_key)
    assert meta["previews_skipped"] == FAL_PREVIEWS_SKIPPED
    assert meta["poster_key"] is None and meta["preview_key"] is None
    FalFile.model_validate(meta["video"])
    assert meta["video"]["url"] != fal_video["url"]  # ours (presigned), not fal's CDN
    assert [(i["backend"], i["what"], i["quantity"]) for i in meta["cost"]["items"]] == [
        ("fal", "videos", 1),
        ("aws", "requests", 1),
    ]
    note = _note(st)
    assert note["backend"] == "fal" and "poster_url" not in note and note["cost"] == job.cost


def test_callback_routes_answer_404_for_anything_but_a_job_id(st: Stack) -> None:
    job_id = submit(st, "a/horse")
    gpu_succeeds(st, job_id)
    key = st.store.get(job_id).reuse_key
    for path in (
        f"/callbacks/gpu/{ITEM_PREFIX}{key}",
        f"/callbacks/gpu/{ITEM_PREFIX}{key}/urls",
        f"/callbacks/fal/{ITEM_PREFIX}{key}",
        "/callbacks/gpu/admission%23modal",
        "/callbacks/gpu/admission#modal",
    ):
        body = json.dumps({"job_id": f"{ITEM_PREFIX}{key}"}).encode()
        response = call(webhook.handler, url_event(path, body, {"content-type": "application/json"}))
        assert response["statusCode"] == 404, path


# ---------------------------------------------------------------------------------------------- metrics


def test_a_success_is_counted_once_with_its_generation_time_and_cost(
    st: Stack, capsys: pytest.CaptureFixture[str]
) -> None:
    job_id = submit(st, "a/horse")
    received = emf(capsys.readouterr().out)
    assert metric_values(received, "JobsReceived") == [({}, 1.0)]
    assert metric_values(received, "JobsDispatched") == [({"backend": "modal"}, 1.0)]
    ((dims, queue_s),) = metric_values(received, "QueueToDispatchSeconds")
    assert dims == {"backend": "modal"} and 0 <= queue_s < 30
    for _ in range(3):  # repeated deliveries: one job, one count
        gpu_succeeds(st, job_id)
    docs = emf(capsys.readouterr().out)
    assert all(d["_aws"]["CloudWatchMetrics"][0]["Namespace"] == "VAP/unit" for d in docs)
    # Each line names its job as a plain property (searchable in Logs Insights), never a dimension.
    assert {d["job_id"] for d in docs} == {job_id}
    for doc in docs:
        assert all("job_id" not in dims for dims in doc["_aws"]["CloudWatchMetrics"][0]["Dimensions"])
    assert metric_values(docs, "JobsSucceeded") == [({"backend": "modal"}, 1.0)]
    assert metric_values(docs, "JobCostUSD") == [({"backend": "modal"}, st.store.get(job_id).cost["total"])]
    ((_, generation_s),) = metric_values(docs, "GenerationSeconds")
    assert generation_s >= 0
    assert metric_values(docs, "JobsFailed") == []


@pytest.mark.parametrize(
    ("code", "kind"),
    [("safety", "safety"), ("input", "input"), ("timeout", "timeout"), ("internal", "internal")],
)
def test_a_gpu_failure_is_counted_by_its_error_kind(
    st: Stack, capsys: pytest.CaptureFixture[str], code: str, kind: str
) -> None:
    job_id = submit(st, "a/horse")  # backend modal: no fallback
    capsys.readouterr()
    for _ in range(2):
        assert gpu_fails(st, job_id, code) == 200
    docs = emf(capsys.readouterr().out)
    assert metric_values(docs, "JobsFailed") == [({"backend": "modal", "error_kind": kind}, 1.0)]
    assert st.store.get(job_id).state == "failed"


def test_a_gpu_failure_that_falls_back_counts_a_fallback_and_a_dispatch(
    st: Stack, capsys: pytest.CaptureFixture[str]
) -> None:
    job_id = submit(st, "a/horse", backend="auto")
    capsys.readouterr()
    gpu_fails(st, job_id, "internal", "CUDA out of memory")
    docs = emf(capsys.readouterr().out)
    assert metric_values(docs, "Fallbacks") == [({"backend": "modal"}, 1.0)]
    # A fallback is a dispatch, not a job's first one: no queue time.
    assert metric_values(docs, "JobsDispatched") == [({"backend": "fal"}, 1.0)]
    assert metric_values(docs, "QueueToDispatchSeconds") == [] and metric_values(docs, "JobsFailed") == []


def test_a_bad_sidecar_is_an_input_failure_before_any_backend(
    st: Stack, capsys: pytest.CaptureFixture[str]
) -> None:
    job_id = submit(st, "a/horse", num_frames=500)
    assert st.store.get(job_id).state == "failed"
    docs = emf(capsys.readouterr().out)
    assert metric_values(docs, "JobsFailed") == [({"backend": "none", "error_kind": "input"}, 1.0)]
    assert metric_values(docs, "JobsDispatched") == []


def test_fal_rejecting_the_request_is_an_input_failure(st: Stack, capsys: pytest.CaptureFixture[str]) -> None:
    job_id = submit(st, "a/horse", backend="fal")
    capsys.readouterr()
    detail = [{"loc": ["body", "num_frames"], "msg": "too many", "type": "value_error"}]
    assert fal_delivers(st, job_id, {"detail": detail}, status="ERROR") == 200
    docs = emf(capsys.readouterr().out)
    assert metric_values(docs, "JobsFailed") == [({"backend": "fal", "error_kind": "input"}, 1.0)]


def test_a_reused_result_is_counted_as_reused_not_as_a_run(
    st: Stack, capsys: pytest.CaptureFixture[str]
) -> None:
    gpu_succeeds(st, submit(st, "a/horse"))
    capsys.readouterr()
    second = submit(st, "b/pony")
    docs = emf(capsys.readouterr().out)
    assert metric_values(docs, "ResultsReused") == [({}, 1.0)]
    assert metric_values(docs, "JobsSucceeded") == [({"backend": "reused"}, 1.0)]
    assert metric_values(docs, "JobCostUSD") == [({"backend": "reused"}, st.store.get(second).cost["total"])]
    assert metric_values(docs, "JobsDispatched") == [] and metric_values(docs, "GenerationSeconds") == []
