"""Bad sidecars: each ends, promptly and without landing in the DLQ, in an error report, a failed
job record and a failure notification listing what is wrong."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest
from stack_helpers import dlq_depth, get_json, jobs_for, sidecar

from local_stack import LocalStack

pytestmark = pytest.mark.stack

_VALID = json.dumps(sidecar()).encode()

# case -> (sidecar body, the field the first error should name; None = about the whole file)
CASES: dict[str, tuple[bytes | dict[str, Any], str | None]] = {
    "malformed_json": (b'{"prompt": "a horse", "video_url": ', None),
    "not_an_object": (b'["prompt", "video_url"]', None),
    "wrong_type": (sidecar(num_frames="49"), "num_frames"),
    "bool_as_int": (sidecar(num_frames=True), "num_frames"),
    "out_of_range": (sidecar(num_frames=500), "num_frames"),
    "guidance_too_low": (sidecar(guidance_scale=1), "guidance_scale"),
    "unknown_enum": (sidecar(aspect_ratio="4:3"), "aspect_ratio"),
    "unknown_field": (sidecar(num_frame=49), "num_frame"),
    "missing_fields": (sidecar(prompt=None, video_description=None), "prompt"),
    "missing_media": (sidecar(video_url="not-uploaded.mp4"), "video_url"),
    "dotdot_path": (sidecar(video_url="../elsewhere/clip.mp4"), "video_url"),
    "oversize": (_VALID[:-1] + b" " * 70_000 + b"}", None),
    "file_scheme": (sidecar(image_url="file:///etc/passwd"), "image_url"),
    "ftp_scheme": (sidecar(image_url="ftp://example.com/image.png"), "image_url"),
    "http_scheme": (sidecar(image_url="http://example.com/image.png"), "image_url"),
    "host_not_allowed": (sidecar(image_url="https://attacker.example/image.png"), "image_url"),
}


@pytest.fixture(scope="module")
def uploaded(stack: LocalStack, sample_media: dict[str, bytes]) -> dict[str, str]:
    """Upload every case at once (they are processed concurrently); case -> sidecar key."""
    folder = f"inbox/bad-{uuid.uuid4().hex[:8]}"
    keys: dict[str, str] = {}
    for case, (body, _) in CASES.items():
        key = f"{folder}/{case}/job.json"
        media = {f"{folder}/{case}/{name}": data for name, data in sample_media.items()}
        stack.put_job(key, body, media)
        keys[case] = key
    return keys


@pytest.mark.parametrize("case", list(CASES))
def test_bad_sidecar_fails_cleanly(stack: LocalStack, uploaded: dict[str, str], case: str) -> None:
    key = uploaded[case]
    # Missing media waits for a few redeliveries (it may still be uploading) before failing.
    (note,) = stack.wait_for_notification(key, timeout_s=90)
    body = note.body
    assert body["status"] == "failed", body
    assert note.attributes["status"] == "failed"
    assert note.subject.startswith("VAP video failed: ")
    errors = body["errors"]
    assert errors and all(isinstance(e["message"], str) and e["message"] for e in errors)
    expected_field = CASES[case][1]
    if expected_field is not None:
        assert expected_field in {e["field"] for e in errors}, errors
    report = get_json(stack, body["error_report_key"])
    assert body["error_report_key"].startswith("outputs/")
    assert body["error_report_key"].endswith("/error.json")
    assert report["errors"] == errors
    assert report["status"] == "failed"
    (job,) = jobs_for(stack, key)
    assert job["state"]["S"] == "failed"
    assert "output_key" not in body


def test_nothing_reached_the_dlq(stack: LocalStack, uploaded: dict[str, str]) -> None:
    for key in uploaded.values():
        stack.wait_for_notification(key, timeout_s=90)
    assert dlq_depth(stack) == 0
    for key in uploaded.values():
        assert len(stack.notifications_for(key)) == 1, key
