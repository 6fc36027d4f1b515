"""A stored result: `metadata.json`, the job's success fields and the files next to the video.

Built here, once, for every way a result reaches `outputs/<dir>/<name>/<job_id>/`: a GPU run's
upload, a fal result (`vap_shared.result_store`) and an equal earlier job's result copied instead
of running (`vap_shared.reuse`). `metadata.json` is written last, after the video and previews, so
a reader that finds it finds everything it names.
"""

from __future__ import annotations

import mimetypes
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any, Protocol

from .fal_output import video_file
from .jobs import Job, iso, utcnow
from .naming import output_keys
from .s3io import copy, head, put_json

METADATA_VERSION = "1.1"  # 1.1 adds cost, video, poster_key, preview_key, previews_skipped, reused_from
# The GPU's previews are small (a JPEG frame, a WebP of a few frames under ~1 MB); anything larger
# is not one of them and is not copied.
MAX_PREVIEW_BYTES = 10 * 1024 * 1024
# Files stored next to video.mp4 when the run made them: name -> (content type, success field).
PREVIEW_FILES: Mapping[str, tuple[str, str]] = {
    "poster.jpg": ("image/jpeg", "poster_key"),
    "preview.webp": ("image/webp", "preview_key"),
}
# The job's own media, copied next to its result: the job's folder then holds what made the video
# after inbox/ and work/ expire, readable with the same grant as the video (`vap gallery`).
INPUT_COPIES: Mapping[str, str] = {"video_url": "inputs/reference", "image_url": "inputs/target"}
FAL_PREVIEWS_SKIPPED = (
    "fal.ai results have no poster.jpg/preview.webp: the store function would have to decode the H.264 "
    "video, and its Lambda layer has no video decoder."
)


class Target(Protocol):
    """The job a result is stored for (a `Job`, or `reuse.Target`)."""

    @property
    def job_id(self) -> str: ...
    @property
    def name(self) -> str: ...
    @property
    def sidecar_bucket(self) -> str: ...
    @property
    def sidecar_key(self) -> str: ...
    @property
    def output_prefix(self) -> str: ...


@dataclass(frozen=True)
class Generation:
    """What was generated and how: the run's part of `metadata.json`."""

    inputs: Mapping[str, Any]
    seed: int | None
    backend: str | None
    backend_call_id: str | None
    fallback_from: str | None
    fallback_reason: str | None
    result: Mapping[str, Any]
    gpus: int | None
    previews_skipped: str | None = None

    @classmethod
    def of_run(cls, job: Job, backend: str, call_id: str, result: Mapping[str, Any]) -> Generation:
        """A run of `job` on `backend` whose result (the `GpuResult`, or fal's output without its
        CDN URL) is `result`."""
        seed = result.get("seed")
        return cls(
            inputs={"settings": job.settings, "media": job.inputs},
            seed=seed if isinstance(seed, int) else job.seed,
            backend=backend,
            backend_call_id=call_id,
            fallback_from=job.fallback_from,
            fallback_reason=job.fallback_reason,
            result=result,
            gpus=job.gpus,
            previews_skipped=FAL_PREVIEWS_SKIPPED if backend == "fal" else None,
        )

    @classmethod
    def of_metadata(cls, earlier: Mapping[str, Any]) -> Generation:
        """An earlier job's run, read from its `metadata.json` (its call id is its own, not carried)."""
        return cls(
            inputs=earlier.get("inputs") or {},
            seed=earlier.get("seed"),
            backend=earlier.get("backend"),
            backend_call_id=None,
            fallback_from=earlier.get("fallback_from"),
            fallback_reason=earlier.get("fallback_reason"),
            result=earlier.get("result") or {},
            gpus=earlier.get("gpus"),
            previews_skipped=earlier.get("previews_skipped"),
        )


@dataclass(frozen=True)
class StoredResult:
    """What was written: keys, size, cost, and the `metadata.json` body."""

    output_key: str
    metadata_key: str
    bytes: int
    files: Mapping[str, str]  # preview file name -> its key next to the video
    input_copies: Mapping[str, str]  # media field -> the copy of that input next to the video
    cost: Mapping[str, Any] | None
    seed: int | None
    metadata: Mapping[str, Any] = field(repr=False)

    def success_fields(self, **more: Any) -> dict[str, Any]:
        """The job record's fields for this result (`succeed_job`), plus `more`."""
        fields: dict[str, Any] = {
            "output_key": self.output_key,
            "metadata_key": self.metadata_key,
            "bytes": self.bytes,
            "cost": dict(self.cost) if self.cost is not None else None,
            "input_copies": dict(self.input_copies) or None,
            **{attr: self.files.get(name) for name, (_, attr) in PREVIEW_FILES.items()},
        }
        if self.seed is not None:
            fields["seed"] = self.seed
        fields.update(more)
        return fields


def metadata(
    target: Target,
    generation: Generation,
    *,
    size: int,
    timings: Mapping[str, Any],
    video_url: str | None,
    files: Mapping[str, str],
    cost: Mapping[str, Any] | None,
    input_copies: Mapping[str, str] | None = None,
    reused_from: str | None = None,
) -> dict[str, Any]:
    """`metadata.json` (docs/contracts.md). `video` is fal's output `File` (url = a presigned GET
    like the notification's output_url), so code written against fal's result reads ours."""
    keys = output_keys(target.output_prefix)
    body: dict[str, Any] = {
        "version": METADATA_VERSION,
        "job_id": target.job_id,
        "sidecar_bucket": target.sidecar_bucket,
        "sidecar_key": target.sidecar_key,
        "name": target.name,
        "inputs": dict(generation.inputs),
        "input_copies": dict(input_copies or {}) or None,
        "seed": generation.seed,
        "backend": generation.backend,
        "fallback_from": generation.fallback_from,
        "fallback_reason": generation.fallback_reason,
        "result": dict(generation.result),
        "output_key": keys["video"],
        "bytes": size,
        "gpus": generation.gpus,
        "timings": dict(timings),
        **{attr: files.get(name) for name, (_, attr) in PREVIEW_FILES.items()},
        "cost": dict(cost) if cost is not None else None,
    }
    if generation.backend_call_id is not None:
        body["backend_call_id"] = generation.backend_call_id
    if video_url is not None:
        body["video"] = video_file(video_url, size, target.name, target.job_id)
    if generation.previews_skipped:
        body["previews_skipped"] = generation.previews_skipped
    if reused_from is not None:
        body["reused_from"] = reused_from
    return body


def run_timings(job: Job, result: Mapping[str, Any]) -> dict[str, Any]:
    """A fresh run's timings: the job's, completed now, and the backend's own."""
    return {**job.timings(), "completed_at": iso(utcnow()), "backend": result.get("timings", {})}


def copy_files(
    s3: Any, bucket: str, sources: Mapping[str, str], dest_prefix: str, max_bytes: int = MAX_PREVIEW_BYTES
) -> dict[str, str]:
    """Copy each preview file (name -> source key) that exists and is at most `max_bytes` next to
    the video; name -> new key. A missing one is simply absent (not made, or not kept)."""
    copied: dict[str, str] = {}
    for name, source in sources.items():
        content_type = PREVIEW_FILES[name][0]
        found = head(s3, bucket, source)
        if found is None or int(found.get("ContentLength", 0)) > max_bytes:
            continue
        copy(s3, bucket, source, dest_prefix + name, content_type)
        copied[name] = dest_prefix + name
    return copied


def input_keys(media: Mapping[str, Any] | None, bucket: str) -> dict[str, str]:
    """Media field -> key, for the recorded inputs (`Job.inputs`) stored in `bucket`."""
    keys: dict[str, str] = {}
    for name in INPUT_COPIES:
        record = (media or {}).get(name)
        if isinstance(record, Mapping) and record.get("kind") == "s3" and record.get("bucket") == bucket:
            keys[name] = str(record["key"])
    return keys


def copy_inputs(s3: Any, bucket: str, sources: Mapping[str, str], dest_prefix: str) -> dict[str, str]:
    """Copy each input (media field -> key) next to the video as `inputs/reference.<ext>` /
    `inputs/target.<ext>`; field -> new key. One gone (expired, deleted) is simply absent."""
    copied: dict[str, str] = {}
    for name, source in sources.items():
        found = head(s3, bucket, source)
        if found is None:
            continue
        suffix = PurePosixPath(source).suffix.lower()[:8]
        copy(s3, bucket, source, dest_prefix + INPUT_COPIES[name] + suffix, _content_type(found, suffix))
        copied[name] = dest_prefix + INPUT_COPIES[name] + suffix
    return copied


def _content_type(found: Mapping[str, Any], suffix: str) -> str:
    """The upload's own type, or the file name's where the uploader sent none (a browser needs one
    to play the copy)."""
    declared = str(found.get("ContentType") or "")
    if declared and declared not in ("application/octet-stream", "binary/octet-stream"):
        return declared
    return mimetypes.guess_type("x" + suffix)[0] or "application/octet-stream"


def write_metadata(
    s3: Any,
    bucket: str,
    target: Target,
    generation: Generation,
    *,
    size: int,
    timings: Mapping[str, Any],
    video_url: str | None,
    files: Mapping[str, str],
    cost: Mapping[str, Any] | None,
    input_copies: Mapping[str, str] | None = None,
    reused_from: str | None = None,
) -> StoredResult:
    """Write `metadata.json` (the last file of a result) and describe what was stored."""
    keys = output_keys(target.output_prefix)
    body = metadata(
        target,
        generation,
        size=size,
        timings=timings,
        video_url=video_url,
        files=files,
        cost=cost,
        input_copies=input_copies,
        reused_from=reused_from,
    )
    put_json(s3, bucket, keys["metadata"], body)
    return StoredResult(
        keys["video"],
        keys["metadata"],
        size,
        dict(files),
        dict(input_copies or {}),
        cost,
        generation.seed,
        body,
    )
