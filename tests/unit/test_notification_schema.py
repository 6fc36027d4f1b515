"""docs/notification.schema.json: a valid schema that accepts what the notifier builds and the
README's example, and rejects drift."""

from __future__ import annotations

import json
import re
from pathlib import Path

from jsonschema import Draft202012Validator
from vap_shared.jobs import Job
from vap_shared.notifier import build_notification

from tests.notification_schema import problems, schema

JOB_ID = "20261125T182301Z-3f9c0a1b2d"
PREFIX = f"outputs/balloon/horse/{JOB_ID}/"
READY = f"VAP video ready: balloon/horse (job {JOB_ID})"
FAILED = f"VAP video failed: balloon/horse (job {JOB_ID})"


class FakeS3:
    def generate_presigned_url(self, *args: object, **kwargs: object) -> str:
        return f"https://bucket.s3.amazonaws.com/{PREFIX}video.mp4?X-Amz-Signature=abc"


def job(**fields: object) -> Job:
    base: dict[str, object] = {
        "job_id": JOB_ID,
        "sidecar_bucket": "vap-bucket",
        "sidecar_key": "inbox/balloon/horse.json",
        "output_prefix": PREFIX,
        "received_at": "2026-11-25T18:23:01.000000Z",
        "dispatched_at": "2026-11-25T18:23:01.400000Z",
        "completed_at": "2026-11-25T18:27:00.000000Z",
        "seed": 42,
    }
    base.update(fields)
    return Job.model_validate(base)


def test_schema_is_valid_and_versioned() -> None:
    Draft202012Validator.check_schema(schema())
    # Minor versions only add optional fields: "1" stays valid (tests/unit/test_ops_notification_schema.py).
    assert schema()["properties"]["version"]["enum"] == ["1", "1.1"]


def test_notifier_output_matches() -> None:
    ok = job(
        state="succeeded",
        backend="modal",
        output_key=PREFIX + "video.mp4",
        metadata_key=PREFIX + "metadata.json",
    )
    body = build_notification(ok, FakeS3(), "vap-bucket")
    assert problems(body, READY, {"status": "succeeded", "backend": "modal"}) == []
    failed = job(
        state="failed",
        errors=[{"field": "num_frames", "message": "must be an integer between 9 and 121; got 500"}],
        error_report_key=PREFIX + "error.json",
        seed=None,
        dispatched_at=None,
    )
    body = build_notification(failed, FakeS3(), "vap-bucket")
    assert problems(body, FAILED, {"status": "failed", "backend": "none"}) == []


def test_drift_is_caught() -> None:
    body = build_notification(
        job(state="failed", error_report_key=PREFIX + "error.json"), FakeS3(), "vap-bucket"
    )
    assert problems({**body, "surprise": 1})
    assert problems({**body, "status": "cancelled"})
    assert problems({k: v for k, v in body.items() if k != "errors"})
    assert problems(body, "VAP video failed: x (job y)", {"status": "failed", "backend": "none"})
    assert problems(body, READY, {"status": "failed", "backend": "none"})
    assert problems(body, FAILED, {"status": "succeeded", "backend": "none"})


def test_readme_example_matches_shape() -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    example = re.search(r"### Notifications.*?```json\n(.*?)```", readme, re.S)
    assert example is not None
    body = json.loads(example.group(1))  # the example is JSON ("…" only inside strings)
    assert set(body) <= set(schema()["properties"])
    assert set(body["timings"]) == set(schema()["properties"]["timings"]["properties"])
    # 1.1's nested objects: fal's File and the cost estimate, as the schema defines them.
    defs = schema()["$defs"]
    assert set(body["video"]) == set(defs["fal_file"]["properties"])
    assert set(body["cost"]) <= set(defs["cost"]["properties"])
    for item in body["cost"]["items"]:
        assert set(item) <= set(defs["cost"]["properties"]["items"]["items"]["properties"])


def test_subject_is_short_ascii_and_keeps_the_job_id():
    from vap_shared.notifier import subject_line

    jid = JOB_ID
    assert subject_line("succeeded", "inbox/balloon/horse.json", jid) == READY
    long = subject_line("failed", "inbox/" + "é" * 50 + "/" + "x" * 200 + ".json", jid)
    assert len(long) < 100 and long.isascii() and long.endswith(f"xxx (job {jid})")
    assert long.startswith("VAP video failed: ...")
    assert not problems_subject(long)


def problems_subject(subject: str) -> list[str]:
    from tests.notification_schema import _validator

    return [e.message for e in _validator("subject").iter_errors(subject)]
