"""S3 put → real S3→SQS notification → ingest → local GPU server over HTTP → signed callback →
webhook → S3 → SNS → SQS, on the local stack."""

from __future__ import annotations

import tempfile
from pathlib import Path

import httpx
import imageio_ffmpeg
import pytest
from stack_helpers import dlq_depth, get_json, jobs_for, sidecar

from local_stack import LocalStack

pytestmark = pytest.mark.stack


def test_sidecar_to_mp4_and_notification(
    stack: LocalStack, sample_media: dict[str, bytes], folder: str
) -> None:
    key = f"{folder}/balloon.json"
    media = {f"{folder}/{name}": data for name, data in sample_media.items()}
    stack.put_job(key, sidecar(backend="modal"), media)

    (note,) = stack.wait_for_notification(key, timeout_s=240)
    body = note.body
    assert body["status"] == "succeeded", body
    assert body["version"] == "1.1"
    assert body["backend"] == "modal"
    assert body["fallback_from"] is None
    assert body["seed"] == 7
    assert body["sidecar_bucket"] == stack.bucket
    assert note.attributes == {"status": "succeeded", "backend": "modal"}
    assert note.subject.startswith("VAP video ready: ") and note.subject.endswith(f"(job {body['job_id']})")
    for stamp in ("received_at", "dispatched_at", "completed_at"):
        assert body["timings"][stamp].endswith(("Z", "+00:00"))

    name = key.removeprefix("inbox/").removesuffix(".json")
    prefix = f"outputs/{name}/{body['job_id']}/"
    assert body["output_key"] == prefix + "video.mp4"
    assert body["metadata_key"] == prefix + "metadata.json"

    video = stack.s3.get_object(Bucket=stack.bucket, Key=body["output_key"])
    data = video["Body"].read()
    assert video["ContentType"] == "video/mp4"
    assert data[4:8] == b"ftyp"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "video.mp4"
        path.write_bytes(data)
        frames, seconds = imageio_ffmpeg.count_frames_and_secs(str(path))
    assert frames == 9
    assert seconds > 0

    # The presigned URL in the notification serves the same bytes.
    assert httpx.get(body["output_url"], timeout=30).content == data

    metadata = get_json(stack, body["metadata_key"])
    assert metadata["job_id"] == body["job_id"]
    assert metadata["seed"] == 7
    assert metadata["backend"] == "modal"

    (job,) = jobs_for(stack, key)
    assert job["state"]["S"] == "succeeded"
    assert dlq_depth(stack) == 0
    # Nothing the pipeline wrote re-triggered ingest: one job for one sidecar.
    assert stack.notifications_for(key) == [note]
