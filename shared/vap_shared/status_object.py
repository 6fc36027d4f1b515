"""`outputs/<dir>/<name>/<job_id>/status.json`: the job's live state, readable without DynamoDB.

Written on every transition (and on throttled GPU progress) by ingest, the webhook and `vap
cancel`. Progress writes are best effort (a failed one is logged; the next one catches up). The
terminal write is not: `lifecycle.finalize_terminal` writes it with `required=True` before it
notifies, so a failure is retried by the same SQS redelivery / webhook retry / sweeper run that
retries the notification. The job table stays the source of truth for operators.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

from .jobs import Job, iso, utcnow
from .naming import output_keys
from .s3io import put_json

log = logging.getLogger(__name__)

STATUS_FILE = "status.json"
Phase = Literal["queued", "dispatched", "running", "storing", "succeeded", "failed", "cancelled"]
_PHASE_OF_STATE: dict[str, Phase] = {"received": "queued"}
PROGRESS_BUCKETS = 10  # progress is written at most ~10 times per run


def status_key(job: Job) -> str:
    return job.output_prefix + STATUS_FILE


def status_body(job: Job, phase: Phase | None = None) -> dict[str, Any]:
    keys = output_keys(job.output_prefix)
    body: dict[str, Any] = {
        "version": "1",
        "job_id": job.job_id,
        "name": job.name,
        "sidecar_key": job.sidecar_key,
        "sidecar_etag": job.sidecar_etag,
        "state": job.state,
        "phase": phase or _PHASE_OF_STATE.get(job.state, job.state),
        "backend": job.backend,
        "fallback_from": job.fallback_from,
        "progress": job.progress,
        "seed": job.seed,
        "output_key": job.output_key if job.state == "succeeded" else None,
        "metadata_key": job.metadata_key if job.state == "succeeded" else None,
        "error_report_key": keys["error"] if job.state == "failed" else None,
        "errors": job.errors if job.state in ("failed", "cancelled") else None,
        # Previews next to the video (`vap get` saves them), the earlier job a result was copied
        # from, and the estimated cost (`vap list`/`vap cost` read it from here).
        "poster_key": job.poster_key if job.state == "succeeded" else None,
        "preview_key": job.preview_key if job.state == "succeeded" else None,
        "reused_from": job.reused_from,
        # The inputs copied next to the result (readable like the video, after inbox/ expires).
        "input_copies": job.input_copies if job.state == "succeeded" else None,
        # What the job was asked to make, as metadata.json's `inputs`: a failed job has no
        # metadata.json, and users read no job table (`vap gallery` shows them for every job).
        "inputs": {"settings": job.settings, "media": job.inputs} if job.settings or job.inputs else None,
        "gpus": job.gpus,
        "cost": job.cost,
        "timings": job.timings(),
        "updated_at": iso(utcnow()),
    }
    return body


def progress_worth_writing(previous: dict[str, int] | None, current: dict[str, int] | None) -> bool:
    """Throttle: the first step, each tenth of the run, and the last step."""
    if not current:
        return False
    step, total = int(current.get("step", 0)), max(int(current.get("total", 0)), 1)
    if not previous or step >= total:
        return True
    prev_step, prev_total = int(previous.get("step", 0)), max(int(previous.get("total", 0)), 1)
    return bool(step * PROGRESS_BUCKETS // total != prev_step * PROGRESS_BUCKETS // prev_total)


def write_status(
    s3: Any, bucket: str, job: Job | None, phase: Phase | None = None, *, required: bool = False
) -> bool:
    """Write the job's status object; True if written. A failure is logged, and raised only when
    `required` (the terminal write, whose retry must not be lost)."""
    if job is None or not job.output_prefix:
        return False
    try:
        put_json(s3, bucket, status_key(job), status_body(job, phase))
    except Exception:
        if required:
            raise
        log.warning("could not write %s", status_key(job), exc_info=True)
        return False
    return True
