"""SNS notifications (docs/contracts.md: notification format, version "1.1").

1.1 only adds optional fields to 1 (docs/notification.schema.json): on success `video` (fal's
output File, so code written for fal reads it), `poster_url` and `reused_from`; `cost` whenever
the job has one."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from .fal_output import video_file
from .jobs import Job, iso, utcnow
from .s3io import presign_get
from .url_lifetime import url_lifetime

VERSION = "1.1"
# The longest a result URL lives (output_url, poster_url, metadata.json's video.url): 1 h, or less
# when the credentials signing it expire sooner (vap_shared.url_lifetime); `vap url JOB` signs anew.
OUTPUT_URL_TTL = 3600
# SNS: ASCII, no control characters, fewer than 100 characters.
_SUBJECT_MAX = 99
_SUBJECT_VERB = {"succeeded": "ready", "failed": "failed"}


def subject_line(status: str, sidecar_key: str, job_id: str, inbox_prefix: str = "inbox/") -> str:
    """`VAP video ready: balloon/horse (job <id>)`: readable in a mail client's inbox list; the
    job name is made ASCII and shortened from the left so the job id always fits."""
    name = sidecar_key.removeprefix(inbox_prefix).removesuffix(".json")
    name = "".join(c if " " <= c <= "~" else "?" for c in name)
    head, tail = f"VAP video {_SUBJECT_VERB.get(status, status)}: ", f" (job {job_id})"
    room = _SUBJECT_MAX - len(head) - len(tail)
    if len(name) > room:
        name = "..." + name[len(name) - room + 3 :]
    return (head + name + tail)[:_SUBJECT_MAX]


def presign_output(s3: Any, bucket: str, key: str) -> tuple[str, datetime]:
    """A GET URL for a result object, and when it really stops working."""
    now = utcnow()
    lifetime = url_lifetime(s3, OUTPUT_URL_TTL, now)
    return presign_get(s3, bucket, key, lifetime.seconds), lifetime.expires_at(now)


def build_notification(job: Job, s3: Any, bucket: str) -> dict[str, Any]:
    body: dict[str, Any] = {
        "version": VERSION,
        "job_id": job.job_id,
        "status": job.state,
        "sidecar_bucket": job.sidecar_bucket,
        "sidecar_key": job.sidecar_key,
        "backend": job.backend,
        "fallback_from": job.fallback_from,
        "seed": job.seed,
        "timings": job.timings(),
    }
    if job.state == "succeeded" and job.output_key:
        body["output_key"] = job.output_key
        body["metadata_key"] = job.metadata_key
        body["output_url"], expires_at = presign_output(s3, bucket, job.output_key)
        body["output_url_expires_at"] = iso(expires_at)
        if job.bytes is not None:
            body["video"] = video_file(body["output_url"], job.bytes, job.name, job.job_id)
        if job.poster_key:
            body["poster_url"] = presign_output(s3, bucket, job.poster_key)[0]
        if job.reused_from:
            body["reused_from"] = job.reused_from
    else:
        body["errors"] = job.errors or [{"field": None, "message": "The job failed for an unknown reason."}]
        body["error_report_key"] = job.error_report_key
    if job.cost:
        body["cost"] = job.cost
    return body


class Notifier:
    def __init__(self, sns: Any, topic_arn: str, s3: Any, bucket: str) -> None:
        self._sns = sns
        self._topic_arn = topic_arn
        self._s3 = s3
        self._bucket = bucket

    def publish(self, job: Job) -> dict[str, Any]:
        body = build_notification(job, self._s3, self._bucket)
        self._sns.publish(
            TopicArn=self._topic_arn,
            Subject=subject_line(job.state, job.sidecar_key, job.job_id),
            Message=json.dumps(body, separators=(",", ":")),
            MessageAttributes={
                "status": {"DataType": "String", "StringValue": job.state},
                # SNS rejects empty string attributes; "none" marks a job never dispatched.
                "backend": {"DataType": "String", "StringValue": job.backend or "none"},
            },
        )
        return body
