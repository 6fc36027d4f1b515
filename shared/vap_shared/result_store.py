"""Storing a finished run's result: taken in by the webhook (or the sweeper), stored from a queue.

A verified "succeeded" GPU callback or fal delivery is answered within seconds: the GPU's upload is
checked (a HEAD and 64 bytes) and the result is queued on the store queue (`STORE_QUEUE_URL`) as a
`StoreRequest`; the store function (functions/store) copies the GPU's upload, or streams fal's
video (hundreds of MB at 720p) into S3, writes `metadata.json` (`vap_shared.results`) and ends the
job succeeded. The sweeper hands a result whose callback never came to the same queue.

Storing is idempotent: the same keys are written by every retry, a multipart upload is aborted on
failure (`s3io.stream_url_to_s3`), a job already ended is only finalized (one notification), and a
request for a superseded run (another call, an older GPU attempt) changes nothing. A retryable
failure is tried again by SQS; the last try (`STORE_MAX_RECEIVE_COUNT`) fails the job with the
reason instead of leaving it to the dead-letter queue.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from aws_lambda_powertools import Logger
from pydantic import BaseModel, ConfigDict, Field

from . import metrics, results
from .contract import BackendName
from .cost import GpuRun, estimate, gpu_run_of_result, gpu_type_of
from .errors import FieldError, field_error
from .fal_delivery import FalDelivery
from .gpu_contract import GpuError, GpuResult
from .jobs import Job, iso, utcnow
from .lifecycle import fail_job, fall_back_or_fail, finalize_terminal, succeed_job
from .naming import output_keys, work_upload_key, work_video_key
from .notifier import presign_output
from .runs import superseded
from .runtime import Runtime
from .s3io import StoreError, copy, head, stream_url_to_s3, validate_mp4
from .status_object import write_status

logger = Logger(child=True)

# Kept free after a download for what follows it: metadata.json, the job record, status.json and
# the notification. A download gets the invocation's remaining time less this.
STORE_RESERVE_S = 30.0
# A download is not started with less time than this for it (the message is tried again).
MIN_DOWNLOAD_S = 30.0
# The GPU's previews: file name next to the video -> (its upload field, the GpuResult size naming it).
GPU_PREVIEWS: dict[str, tuple[str, str]] = {
    "poster.jpg": ("poster_put_url", "poster_bytes"),
    "preview.webp": ("preview_put_url", "preview_bytes"),
}


class StoreRequest(BaseModel):
    """The store queue's message: one finished run's result, to be stored for its job."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    version: Literal[1] = 1
    job_id: str = Field(min_length=1)
    backend: BackendName
    call_id: str = Field(min_length=1)  # the Modal call id / fal request id the result is from
    attempt: int | None = Field(default=None, ge=1)  # the GPU attempt that reported it
    gpu_result: GpuResult | None = None
    fal_output: dict[str, Any] | None = None  # fal's payload, `{"video": File, ...}`


@dataclass(frozen=True)
class Intake:
    """What became of a finished run handed in: `queued` for storing, `retry` (the GPU's upload is
    not readable yet: ask again), or `ended` (fell back to the other backend, or failed)."""

    outcome: Literal["queued", "retry", "ended"]
    state: str
    message: str = ""


StoreOutcome = Literal["stored", "done", "superseded", "gone", "retry", "failed"]


# ------------------------------------------------------------------------------------------ intake


def queue_result(rt: Runtime, job: Job, request: StoreRequest) -> None:
    """`status.json` phase `storing`, then the request on the store queue."""
    write_status(rt.s3, rt.settings.bucket_name, job, "storing")
    if not rt.settings.store_queue_url:
        raise RuntimeError("STORE_QUEUE_URL is not configured: a result cannot be stored")
    rt.sqs.send_message(QueueUrl=rt.settings.store_queue_url, MessageBody=request.model_dump_json())
    # Heard from: the sweeper asks the backend only about jobs quiet for a while, and one whose result
    # waits on the store queue is not (a backlog there must not make it re-queue the result).
    rt.store.update_fields(job.job_id, {"result_queued_at": iso(utcnow())}, iso(utcnow()), "completed_at")
    logger.info("result queued for storing", extra={"job_id": job.job_id, "backend": request.backend})


def _ended(updated: Job | None, job: Job) -> Intake:
    return Intake("ended", updated.state if updated else job.state)


def accept_gpu_result(
    rt: Runtime, job: Job, call_id: str, attempt: int | None, result: GpuResult | None
) -> Intake:
    """A GPU run reported success: check its upload (exists, size, an MP4: a bad one falls back to
    fal once, or fails the job), then queue it for storing."""
    s = rt.settings
    try:
        validate_mp4(rt.s3, s.bucket_name, work_video_key(s.work_prefix, job.job_id), s.max_output_bytes)
    except StoreError as exc:
        if exc.retryable:
            return Intake("retry", job.state, exc.message)
        errors = [field_error(None, f"The generated video is not usable: {exc.message}.")]
        return _ended(fall_back_or_fail(rt, job, errors, exc.message, kind="internal"), job)
    queue_result(
        rt,
        job,
        StoreRequest(job_id=job.job_id, backend="modal", call_id=call_id, attempt=attempt, gpu_result=result),
    )
    return Intake("queued", job.state)


def gpu_failed(rt: Runtime, job: Job, error: GpuError | None) -> Intake:
    """A GPU run reported failure: fal once (when allowed), or the job fails with the GPU's message."""
    from .backends.dispatch import gpu_error_allows_fallback  # the webhook's path, not the store's

    message = error.message if error else "the GPU reported a failure without details"
    field = error.field if error else None  # e.g. the input the GPU could not decode
    errors: list[FieldError] = [field_error(field, f"Generation failed on Modal: {message}")]
    reason = f"{error.code}: {message}" if error else message
    updated = fall_back_or_fail(
        rt,
        job,
        errors,
        reason,
        allow=gpu_error_allows_fallback(error),
        kind=metrics.error_kind_of_gpu_code(error.code if error else None),
    )
    return _ended(updated, job)


def accept_fal_result(rt: Runtime, job: Job, request_id: str, delivery: FalDelivery) -> Intake:
    """fal finished request `request_id` (a delivery, or its status and result read by the sweeper):
    a video is queued for storing; anything else falls back once or fails with fal's reason."""
    if delivery.video_url:
        queue_result(
            rt,
            job,
            StoreRequest(job_id=job.job_id, backend="fal", call_id=request_id, fal_output=delivery.output),
        )
        return Intake("queued", job.state)
    errors = delivery.failure_errors()
    reason = "; ".join(e["message"] for e in errors)
    return _ended(fall_back_or_fail(rt, job, errors, reason, kind=delivery.failure_kind()), job)


# ------------------------------------------------------------------------------------------ storing


def store_result(
    rt: Runtime, request: StoreRequest, *, time_left_s: Callable[[], float], last_try: bool
) -> StoreOutcome:
    """Store one queued result (the store function, per message): `stored` (the job succeeded),
    `done` (it had ended: only finalized), `superseded`/`gone` (nothing to do), `retry` (a
    retryable failure: SQS tries again) or `failed` (it could not be stored: the job failed)."""
    job = rt.store.get(request.job_id)
    if job is None:
        return "gone"
    if job.terminal:
        finalize_terminal(rt, job)  # whatever a crash skipped; never a second notification
        return "done"
    why = superseded(job, request.backend, request.call_id, request.attempt)
    if why is not None:
        logger.info("stored nothing for a superseded run", extra={"job_id": job.job_id, "reason": why})
        return "superseded"
    name = "Modal" if request.backend == "modal" else "fal.ai"
    try:
        if request.backend == "modal":
            fields = _store_gpu_result(rt, job, request)
        else:
            fields = _store_fal_result(rt, job, request, time_left_s)
    except StoreError as exc:
        if exc.retryable and not last_try:
            logger.warning("storing failed; tried again", extra={"job_id": job.job_id, "reason": exc.message})
            return "retry"
        message = f"The {name} result could not be stored: {exc.message}."
        fail_job(rt, job.job_id, [field_error(None, message)], kind="internal")
        return "failed"
    except Exception:
        if not last_try:
            raise
        # The last try: end the job rather than leave it `storing` with its message in the DLQ.
        logger.exception("storing failed on the last try; failing the job", extra={"job_id": job.job_id})
        message = f"The {name} result could not be stored (an internal error); it has been reported."
        fail_job(rt, job.job_id, [field_error(None, message)], kind="internal")
        return "failed"
    succeed_job(rt, job.job_id, fields)
    logger.info("job succeeded", extra={"job_id": job.job_id, "backend": request.backend})
    return "stored"


def _cost(rt: Runtime, gpu_runs: tuple[GpuRun, ...] = (), fal_videos: int = 0) -> dict[str, Any] | None:
    try:
        return estimate(rt.prices, gpu_runs, fal_videos)
    except Exception:  # a malformed price must not stop storing a result
        logger.warning("could not estimate the job's cost", exc_info=True)
        return None


def _video_url(rt: Runtime, job: Job) -> str:
    return presign_output(rt.s3, rt.settings.bucket_name, output_keys(job.output_prefix)["video"])[0]


def _copy_inputs(rt: Runtime, job: Job) -> dict[str, str]:
    bucket = rt.settings.bucket_name
    return results.copy_inputs(rt.s3, bucket, results.input_keys(job.inputs, bucket), job.output_prefix)


def _store_gpu_result(rt: Runtime, job: Job, request: StoreRequest) -> dict[str, Any]:
    """Copy the GPU's upload (and previews) from work/<job_id>/ next to the job's other outputs."""
    s, s3 = rt.settings, rt.s3
    work_key = work_video_key(s.work_prefix, job.job_id)
    found = head(s3, s.bucket_name, work_key)
    if found is None:
        raise StoreError(f"the generated video {work_key} was not found in S3", retryable=True)
    size = int(found.get("ContentLength", 0))
    keys = output_keys(job.output_prefix)
    copy(s3, s.bucket_name, work_key, keys["video"])
    gpu = request.gpu_result
    sources = {
        name: work_upload_key(s.work_prefix, job.job_id, field)
        for name, (field, size_attr) in GPU_PREVIEWS.items()
        if gpu is None or getattr(gpu, size_attr) is not None  # the GPU says it stored this one
    }
    files = results.copy_files(s3, s.bucket_name, sources, job.output_prefix)
    result = gpu.model_dump() if gpu is not None else {}
    gpu_type = job.gpu_type or gpu_type_of(result.get("gpu"))
    # Priced on the GPUs the run really used (routing may give a job more than it asked for).
    gpu_count = (gpu.gpu_count if gpu is not None else None) or job.gpus or 1
    runs = (gpu_run_of_result(result, gpu_count, gpu_type),) if gpu is not None else ()
    stored = results.write_metadata(
        s3,
        s.bucket_name,
        job,
        results.Generation.of_run(job, "modal", request.call_id, result),
        size=size,
        timings=results.run_timings(job, result),
        video_url=_video_url(rt, job),
        files=files,
        cost=_cost(rt, runs),
        input_copies=_copy_inputs(rt, job),
    )
    more: dict[str, Any] = {"gpu_type": gpu_type}
    if not job.backend:  # the callback overtook ingest's own dispatch write
        more.update({"backend": "modal", "backend_call_id": request.call_id})
    return stored.success_fields(**more)


def _store_fal_result(
    rt: Runtime, job: Job, request: StoreRequest, time_left_s: Callable[[], float]
) -> dict[str, Any]:
    """Stream fal's video from its CDN into S3 (allow-listed https hosts, size cap, and a time cap
    below what is left of the invocation)."""
    s = rt.settings
    output = request.fal_output or {}
    url = FalDelivery(status="OK", payload=output).video_url
    if url is None:
        raise StoreError("fal.ai finished without a video URL")
    limit_s = time_left_s() - STORE_RESERVE_S
    if limit_s < MIN_DOWNLOAD_S:
        raise StoreError(f"only {limit_s:.0f} s were left for the download", retryable=True)
    keys = output_keys(job.output_prefix)
    size = stream_url_to_s3(
        rt.http,
        rt.s3,
        url,
        s.bucket_name,
        keys["video"],
        allowed_hosts=s.fal_media_hosts,
        max_bytes=s.max_output_bytes,
        timeout_s=limit_s,
        allow_http_loopback=s.allow_http_loopback,
    )
    result = {k: v for k, v in output.items() if k != "video"}
    result["video"] = {k: v for k, v in (output.get("video") or {}).items() if k != "url"}
    stored = results.write_metadata(
        rt.s3,
        s.bucket_name,
        job,
        results.Generation.of_run(job, "fal", request.call_id, result),
        size=size,
        timings=results.run_timings(job, result),
        video_url=_video_url(rt, job),
        files={},
        cost=_cost(rt, fal_videos=1),
        input_copies=_copy_inputs(rt, job),
    )
    return stored.success_fields(backend="fal", backend_call_id=request.call_id)
