"""A finished job's results end to end on the local stack: previews next to the video, fal's
`video` object, the estimated cost (metadata, notification, status.json, `vap list`/`vap cost`),
result reuse, and the EMF lines the handlers print. Every notification is checked against schema
1.1 (conftest)."""

from __future__ import annotations

import contextlib
import io
import json
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from stack_helpers import get_json, sidecar
from vap_shared.fal_output import FalFile
from vap_shared.notifier import OUTPUT_URL_TTL

from local_stack import LocalStack
from local_stack.notifications import Notification
from vap_cli.__main__ import main

pytestmark = pytest.mark.stack

JOB_WAIT_S = 300


def _put(stack: LocalStack, folder: str, name: str, media: dict[str, bytes], **fields: Any) -> str:
    """Media next to the sidecar, then `<folder>/<name>.json` (reuse allowed unless said otherwise)."""
    key = f"{folder}/{name}.json"
    uploads = {f"{folder}/{leaf}": data for leaf, data in media.items()}
    stack.put_job(key, sidecar(**{"reuse": None, **fields}), uploads)
    return key


def _done(stack: LocalStack, key: str) -> Notification:
    (note,) = stack.wait_for_notification(key, timeout_s=JOB_WAIT_S)
    return note


def _gpu_saw(stack: LocalStack, job_id: str) -> bool:
    return job_id in stack.gpu.executor._jobs  # the local GPU API's job id -> call id map


def _fal_saw(stack: LocalStack, job_id: str) -> bool:
    assert stack.fal is not None
    return any(job_id in (r.webhook_url or "") for r in stack.fal.requests.values())


@pytest.fixture(scope="module")
def gpu_job(stack: LocalStack, sample_media: dict[str, bytes]) -> dict[str, Any]:
    """One job on the GPU path (local GPU server: the real runner, tiny model) that later jobs reuse."""
    folder = f"inbox/t-{uuid.uuid4().hex[:10]}"
    key = _put(stack, folder, "horse", sample_media, backend="modal", seed=4242)
    note = _done(stack, key)
    assert note.body["status"] == "succeeded", note.body
    return {"key": key, "folder": folder, "note": note, "job_id": note.body["job_id"]}


def test_the_gpu_stores_a_poster_and_a_preview_next_to_the_video(stack: LocalStack, gpu_job) -> None:
    body = gpu_job["note"].body
    prefix = body["output_key"].rsplit("/", 1)[0] + "/"
    poster = stack.s3.get_object(Bucket=stack.bucket, Key=prefix + "poster.jpg")
    preview = stack.s3.get_object(Bucket=stack.bucket, Key=prefix + "preview.webp")
    assert poster["ContentType"] == "image/jpeg" and poster["Body"].read()[:3] == b"\xff\xd8\xff"
    data = preview["Body"].read()
    assert preview["ContentType"] == "image/webp" and data[:4] == b"RIFF" and data[8:12] == b"WEBP"
    assert len(data) < 1024 * 1024
    # The notification's poster URL serves the poster, and lives as long as output_url.
    assert httpx.get(body["poster_url"], timeout=30).content[:3] == b"\xff\xd8\xff"
    (lifetime,) = {
        int(parse_qs(urlsplit(body[f]).query)["X-Amz-Expires"][0]) for f in ("poster_url", "output_url")
    }
    assert lifetime <= OUTPUT_URL_TTL  # and no longer than the signing credentials (test_url_lifetime.py)
    metadata = get_json(stack, body["metadata_key"])
    assert metadata["poster_key"] == prefix + "poster.jpg"
    assert metadata["preview_key"] == prefix + "preview.webp"
    assert metadata["result"]["poster_bytes"] > 0 and metadata["result"]["preview_bytes"] == len(data)


def test_results_read_like_fals_output_and_carry_their_cost(stack: LocalStack, gpu_job) -> None:
    body = gpu_job["note"].body
    video = FalFile.model_validate(body["video"])  # fal's File, extra fields forbidden
    assert set(body["video"]) == {"url", "content_type", "file_name", "file_size"}
    data = httpx.get(video.url, timeout=30).content
    assert video.url == body["output_url"] and len(data) == video.file_size and data[4:8] == b"ftyp"
    assert video.file_name == f"horse-{body['job_id']}.mp4" and video.content_type == "video/mp4"
    metadata = get_json(stack, body["metadata_key"])
    assert {k: v for k, v in metadata["video"].items() if k != "url"} == {
        k: v for k, v in body["video"].items() if k != "url"
    }
    cost = body["cost"]
    assert cost["estimate"] is True and cost["currency"] == "USD" and metadata["cost"] == cost
    gpu, aws = cost["items"]
    # The local GPU is a CPU: priced as the default GPU type, for the seconds the run reported.
    assert (gpu["backend"], gpu["what"], gpu["gpu_type"], gpu["gpu_count"]) == (
        "modal",
        "gpu_seconds",
        "H100",
        1,
    )
    assert gpu["quantity"] == pytest.approx(metadata["result"]["timings"]["total_s"], abs=0.001)
    assert aws["backend"] == "aws" and cost["total"] == pytest.approx(gpu["amount"] + aws["amount"])
    status = get_json(stack, body["output_key"].rsplit("/", 1)[0] + "/status.json")
    assert status["cost"] == cost and status["poster_key"] == metadata["poster_key"]


def test_a_fal_result_has_fals_video_object_and_says_why_it_has_no_previews(
    stack: LocalStack, sample_media: dict[str, bytes], folder: str
) -> None:
    key = _put(stack, folder, "fal", sample_media, backend="fal", seed=None)
    body = _done(stack, key).body
    assert body["status"] == "succeeded" and body["backend"] == "fal"
    FalFile.model_validate(body["video"])
    assert "poster_url" not in body
    metadata = get_json(stack, body["metadata_key"])
    assert metadata["poster_key"] is None and "no video decoder" in metadata["previews_skipped"]
    assert [(i["backend"], i["what"]) for i in body["cost"]["items"]] == [
        ("fal", "videos"),
        ("aws", "requests"),
    ]


# ---------------------------------------------------------------------------------------------- reuse


def test_an_identical_request_under_another_name_reuses_the_result(
    stack: LocalStack, sample_media: dict[str, bytes], folder: str, gpu_job
) -> None:
    key = _put(stack, folder, "pony", sample_media, backend="modal", seed=4242)
    body = _done(stack, key).body
    assert body["status"] == "succeeded" and body["reused_from"] == gpu_job["job_id"]
    job_id = body["job_id"]
    assert not _gpu_saw(stack, job_id) and not _fal_saw(stack, job_id)  # no GPU, no fal call
    assert body["backend"] is None and body["timings"]["dispatched_at"] is None
    earlier = gpu_job["note"].body
    copied = stack.s3.get_object(Bucket=stack.bucket, Key=body["output_key"])["Body"].read()
    assert copied == stack.s3.get_object(Bucket=stack.bucket, Key=earlier["output_key"])["Body"].read()
    metadata = get_json(stack, body["metadata_key"])
    assert metadata["reused_from"] == gpu_job["job_id"] and metadata["job_id"] == job_id
    assert (
        metadata["seed"] == 4242 and metadata["result"] == get_json(stack, earlier["metadata_key"])["result"]
    )
    assert httpx.get(body["poster_url"], timeout=30).content[:3] == b"\xff\xd8\xff"
    assert [i["backend"] for i in body["cost"]["items"]] == ["aws"]


@pytest.mark.parametrize("change", ["one byte of media", "a setting", "no seed", "reuse false"])
def test_anything_but_an_equal_request_runs(
    stack: LocalStack, sample_media: dict[str, bytes], folder: str, gpu_job, change: str
) -> None:
    media = dict(sample_media)
    fields: dict[str, Any] = {"backend": "fal", "seed": 4242}  # fal: a run, quickly
    if change == "one byte of media":
        clip = bytearray(media["clip.mp4"])
        clip[-1] ^= 0x01
        media["clip.mp4"] = bytes(clip)
    elif change == "a setting":
        fields["guidance_scale"] = 6
    elif change == "no seed":
        fields["seed"] = None
    else:
        fields["reuse"] = False
    key = _put(stack, folder, "pony", media, **fields)
    body = _done(stack, key).body
    assert body["status"] == "succeeded" and "reused_from" not in body
    assert body["backend"] == "fal" and _fal_saw(stack, body["job_id"])


def test_a_deleted_earlier_output_runs_again(
    stack: LocalStack, sample_media: dict[str, bytes], folder: str
) -> None:
    first = _done(stack, _put(stack, folder, "one", sample_media, backend="fal", seed=777)).body
    stack.s3.delete_object(Bucket=stack.bucket, Key=first["output_key"])
    second = _done(stack, _put(stack, folder, "two", sample_media, backend="fal", seed=777)).body
    assert second["status"] == "succeeded" and "reused_from" not in second and second["backend"] == "fal"
    # The run that replaced the deleted result is the one reused from now on.
    third = _done(stack, _put(stack, folder, "three", sample_media, backend="fal", seed=777)).body
    assert third["reused_from"] == second["job_id"] and not _fal_saw(stack, third["job_id"])


# ---------------------------------------------------------------------------------------------- vap


def _vap(stack: LocalStack, tmp_path: Path, *args: str) -> tuple[int, str]:
    state = tmp_path / "stack.json"
    state.write_text(json.dumps(stack.describe()), encoding="utf-8")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main([*args, "--local-state", str(state)])
    return rc, out.getvalue()


def test_vap_get_saves_the_previews_and_list_and_cost_show_the_cost(
    stack: LocalStack, gpu_job, tmp_path: Path
) -> None:
    job_id = gpu_job["job_id"]
    rc, _ = _vap(stack, tmp_path, "get", job_id, "--out", str(tmp_path / "out"))
    assert rc == 0
    saved = sorted(p.name for p in (tmp_path / "out").iterdir())
    stem = f"horse-{job_id}"
    assert saved == sorted(f"{stem}{s}" for s in (".mp4", ".metadata.json", ".poster.jpg", ".preview.webp"))
    assert (tmp_path / "out" / f"{stem}.poster.jpg").read_bytes()[:3] == b"\xff\xd8\xff"

    rc, out = _vap(stack, tmp_path, "list", "--limit", "1000")
    (line,) = [line for line in out.splitlines() if line.startswith(job_id)]
    assert f"~${gpu_job['note'].body['cost']['total']:.4f}" in line

    rc, out = _vap(stack, tmp_path, "cost", "--since", "1d", "--json")
    report = json.loads(out)
    assert rc == 0 and report["estimate"] is True and report["jobs_with_cost"] >= 1
    assert report["by_backend"]["modal"] >= gpu_job["note"].body["cost"]["items"][0]["amount"]
    assert report["by_backend"]["aws"] > 0
