"""Notification schema 1.1 (video, cost, reused_from, poster_url) and fal's output shape."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from vap_shared.cost import GpuRun, Prices, estimate
from vap_shared.fal_output import FalFile, download_name, video_file

from tests.notification_schema import problems

ROOT = Path(__file__).resolve().parents[2]
FAL_REFERENCE = ROOT / ".." / "shared" / "reference" / "fal-video-as-prompt-api.txt"
JOB_ID = "20261125T182301Z-3f9c0a1b2d"
EARLIER = "20261120T101010Z-0123456789"
PREFIX = f"outputs/balloon/horse/{JOB_ID}/"
URL = f"https://b.s3.us-east-1.amazonaws.com/{PREFIX}video.mp4?X-Amz-Signature=abc"


def succeeded(version: str = "1.1", **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "version": version,
        "job_id": JOB_ID,
        "status": "succeeded",
        "sidecar_bucket": "vap-bucket",
        "sidecar_key": "inbox/balloon/horse.json",
        "backend": "modal",
        "fallback_from": None,
        "seed": 42,
        "timings": {
            "received_at": "2026-11-25T18:23:01.000000Z",
            "dispatched_at": "2026-11-25T18:23:01.400000Z",
            "completed_at": "2026-11-25T18:27:00.000000Z",
            "queue_s": 0.4,
            "generation_s": 238.6,
            "total_s": 239.0,
        },
        "output_key": PREFIX + "video.mp4",
        "metadata_key": PREFIX + "metadata.json",
        "output_url": URL,
        "output_url_expires_at": "2026-11-25T19:27:00.000000Z",
    }
    body.update(extra)
    return body


def failed(version: str = "1.1", **extra: Any) -> dict[str, Any]:
    body = succeeded(version)
    for key in ("output_key", "metadata_key", "output_url", "output_url_expires_at"):
        del body[key]
    body.update(
        status="failed",
        errors=[{"field": None, "message": "Generation failed on Modal: out of memory"}],
        error_report_key=PREFIX + "error.json",
    )
    body.update(extra)
    return body


def full_1_1() -> dict[str, Any]:
    return succeeded(
        video=video_file(URL, 4_404_019, "balloon/horse", JOB_ID),
        cost=estimate(Prices(), [GpuRun(238.6, "H100")]),
        poster_url=URL.replace("video.mp4", "poster.jpg"),
    )


def test_version_1_1_fields_accepted() -> None:
    assert problems(full_1_1()) == []
    reused = succeeded(reused_from=EARLIER, backend=None, cost=estimate(Prices()))
    assert problems(reused) == []
    assert problems(failed(cost=estimate(Prices(), [GpuRun(30.0, "H100")]))) == []


def test_version_1_messages_still_valid_and_never_carry_1_1_fields() -> None:
    assert problems(succeeded("1")) == [] and problems(failed("1")) == []
    for field in ("video", "cost", "reused_from", "poster_url"):
        one = succeeded("1", **{field: full_1_1().get(field, EARLIER)})
        assert problems(one), field
    assert problems(succeeded("2"))


def test_1_1_drift_is_caught() -> None:
    body = full_1_1()
    assert problems({**body, "video": {**body["video"], "extra": 1}})
    assert problems({**body, "video": {k: v for k, v in body["video"].items() if k != "file_size"}})
    assert problems({**body, "video": {**body["video"], "content_type": "image/png"}})
    assert problems({**body, "reused_from": "job-1"})
    assert problems({**body, "poster_url": "s3://bucket/poster.jpg"})
    assert problems({**body, "cost": {**body["cost"], "estimate": False}})
    assert problems({**body, "cost": {**body["cost"], "total": -1}})
    # Results belong to succeeded jobs only.
    for field in ("video", "poster_url", "reused_from"):
        assert problems(failed(**{field: body.get(field, EARLIER)})), field


def test_video_object_is_fals_output_file() -> None:
    video = video_file(URL, 123, "balloon/horse", JOB_ID)
    assert video == {
        "url": URL,
        "content_type": "video/mp4",
        "file_name": f"horse-{JOB_ID}.mp4",
        "file_size": 123,
    }
    assert FalFile.model_validate(video).url == URL
    assert download_name("top-level", JOB_ID) == f"top-level-{JOB_ID}.mp4"


def test_video_fields_are_exactly_fals_output_schema() -> None:
    """Read fal's own API page: the output example and the File type name the same four fields."""
    if not FAL_REFERENCE.exists():
        pytest.skip("fal's API reference is not next to the repository (../shared/reference)")
    text = FAL_REFERENCE.read_text(encoding="utf-8")
    output = text.split("Output#", 1)[1]
    example = re.search(r'"video":\s*\{(.*?)\}', output, re.S)
    assert example is not None
    example_keys = re.findall(r'"([a-z_]+)":', example.group(1))
    file_type = output.split("File#", 1)[1]
    # fal's page separates name and type with a no-break space.
    documented = re.findall(r"^([a-z_]+)\s(?:string|integer)", file_type, re.M)
    assert example_keys == documented == list(FalFile.model_fields)
    # Only url is required by fal; we always send all four.
    assert re.search(r"^url\sstring\* required", file_type, re.M)
    assert list(video_file(URL, 1, "a/b", JOB_ID)) == documented
