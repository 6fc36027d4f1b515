"""Job ids and S3 keys (docs/contracts.md: S3 layout, job id)."""

from __future__ import annotations

import hashlib
import logging
import re
from datetime import UTC, datetime

log = logging.getLogger(__name__)


# The time part of a job id whose event has no usable `eventTime`: fixed, so duplicates of that
# event (and the sweeper reading it from the dead-letter queue) still name the same job.
UNKNOWN_EVENT_TIME = datetime(1970, 1, 1, tzinfo=UTC)


def parse_event_time(value: object) -> datetime:
    """S3's `eventTime` (`2026-11-25T18:23:01.123Z`) as aware UTC; `UNKNOWN_EVENT_TIME` if absent
    or unparseable. Never the clock: the job id must follow from the event alone."""
    if isinstance(value, str) and value:
        try:
            parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
            return parsed.astimezone(UTC) if parsed.tzinfo else parsed.replace(tzinfo=UTC)
        except ValueError:
            log.warning("S3 event with an unparseable eventTime %r; its job id uses the epoch", value[:64])
            return UNKNOWN_EVENT_TIME
    log.warning("S3 event without an eventTime; its job id uses the epoch")
    return UNKNOWN_EVENT_TIME


# What `job_id` makes, and nothing else: the webhook answers 404 to any other path segment, so the
# table's other items (`admission#modal`, `reuse#<key>`) can never be addressed as jobs.
JOB_ID_PATTERN = re.compile(r"^[0-9]{8}T[0-9]{6}Z-[0-9a-f]{10}$")


def is_job_id(value: str) -> bool:
    return bool(JOB_ID_PATTERN.fullmatch(value))


def job_id(event_time: datetime, bucket: str, key: str, etag: str, sequencer: str | None) -> str:
    """`<yyyymmddTHHMMSSZ>-<10 hex>`: deterministic for duplicates of one S3 event.

    The hash input is bucket, key, eTag (quotes stripped) and sequencer ('' when absent)
    joined by newlines.
    """
    material = "\n".join([bucket, key, etag.strip('"'), sequencer or ""]).encode("utf-8")
    digest = hashlib.sha256(material).hexdigest()[:10]
    return f"{event_time.astimezone(UTC).strftime('%Y%m%dT%H%M%SZ')}-{digest}"


def sidecar_name(key: str, inbox_prefix: str) -> str:
    """`inbox/<dir>/<name>.json` → `<dir>/<name>`."""
    name = key[len(inbox_prefix) :] if key.startswith(inbox_prefix) else key
    return name[: -len(".json")] if name.endswith(".json") else name


def output_prefix(outputs_prefix: str, name: str, job_id: str) -> str:
    return f"{outputs_prefix}{name}/{job_id}/"


def output_keys(prefix: str) -> dict[str, str]:
    return {
        "video": prefix + "video.mp4",
        "metadata": prefix + "metadata.json",
        "error": prefix + "error.json",
    }


def work_prefix(work_prefix: str, job_id: str) -> str:
    return f"{work_prefix}{job_id}/"


def work_video_key(work: str, job_id: str) -> str:
    """Where the GPU PUTs its result before the webhook moves it."""
    return f"{work}{job_id}/video.mp4"


def work_input_key(work: str, job_id: str, field: str, ext: str) -> str:
    """Decoded `data:` media; `input-` keeps them apart from the GPU's `video.mp4`."""
    stem = field.removesuffix("_url")
    return f"{work}{job_id}/input-{stem}{ext}"


# What a URL refresh may presign for the GPU to PUT under work/<job_id>/ (template.yaml grants
# exactly these names): request field -> (file name, content type).
GPU_UPLOADS: dict[str, tuple[str, str]] = {
    "output_put_url": ("video.mp4", "video/mp4"),
    "poster_put_url": ("poster.jpg", "image/jpeg"),
    "preview_put_url": ("preview.webp", "image/webp"),
}


def work_upload_key(work: str, job_id: str, field: str) -> str:
    return f"{work}{job_id}/{GPU_UPLOADS[field][0]}"


# The GPU's saved denoising state (`gpu.vap.resume`): a URL refresh presigns a PUT and a GET for it,
# so a run Modal preempts and runs again continues where the first one saved (template.yaml grants
# the webhook exactly this name besides GPU_UPLOADS).
RESUME_STATE = ("resume.bin", "application/octet-stream")


def work_resume_key(work: str, job_id: str) -> str:
    return f"{work}{job_id}/{RESUME_STATE[0]}"
