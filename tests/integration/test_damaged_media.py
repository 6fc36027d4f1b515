"""Damaged media on the local stack: a truncated upload fails at ingest, from a few ranged reads of
the object in S3, naming the field in one line; no backend is called."""

from __future__ import annotations

import pytest
from stack_helpers import jobs_for, sidecar

from local_stack import LocalStack

pytestmark = pytest.mark.stack


@pytest.mark.parametrize(
    ("name", "cut", "field", "start"),
    [
        ("clip.mp4", 0.6, "video_url", "`video_url`: the MP4 is truncated: its `mdat` box runs to byte"),
        ("image.png", 0.5, "image_url", "`image_url`: the PNG is truncated"),
    ],
)
def test_a_truncated_upload_fails_at_ingest_naming_its_field(
    stack: LocalStack,
    sample_media: dict[str, bytes],
    folder: str,
    name: str,
    cut: float,
    field: str,
    start: str,
) -> None:
    media = {f"{folder}/{n}": data for n, data in sample_media.items()}
    media[f"{folder}/{name}"] = sample_media[name][: int(len(sample_media[name]) * cut)]
    key = f"{folder}/damaged.json"
    stack.put_job(key, sidecar(), media)
    (note,) = stack.wait_for_notification(key, timeout_s=60)
    assert note.body["status"] == "failed" and note.body["backend"] is None
    (error,) = note.body["errors"]
    assert error["field"] == field and error["message"].startswith(start), error
    assert "\n" not in error["message"]
    (job,) = jobs_for(stack, key)
    assert "backend_call_id" not in job and "dispatch_intent" not in job  # nothing was submitted
