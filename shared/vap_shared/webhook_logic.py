"""Webhook logic: verified GPU callbacks and fal webhooks → stored outputs, job updates, SNS.

Every path is idempotent: repeated deliveries store the same objects under the same keys, the
terminal transition is conditional and the notification is claimed once.

Previews: the GPU uploads `poster.jpg` and `preview.webp` to work/<job_id>/ with the video; they
are copied next to `video.mp4`. fal results get none: making them would mean decoding H.264 in
this Lambda, and its layer has no video decoder (no ffmpeg, PyAV or OpenCV; adding one would add
tens of MB to every function's cold start for an extra). `metadata.json` says so
(`previews_skipped`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, TypeVar

from aws_lambda_powertools import Logger
from pydantic import ValidationError

from . import metrics
from .backends.dispatch import gpu_error_allows_fallback
from .backends.fal import fal_detail_errors
from .cost import GpuRun, estimate, gpu_run_of_result, gpu_type_of
from .errors import FieldError, field_error
from .fal_output import video_file
from .gpu_contract import GpuCallback, GpuResult, UrlRefreshRequest
from .jobs import Job, iso, utcnow
from .lifecycle import fail_job, fall_back_or_fail, finalize_terminal, succeed_job
from .naming import GPU_UPLOADS, output_keys, work_upload_key, work_video_key
from .notifier import presign_output
from .runtime import Runtime
from .s3io import StoreError, copy, head, put_json, stream_url_to_s3, validate_mp4
from .signing import SignatureError, derive_callback_key, verify_callback
from .status_object import progress_worth_writing, write_status

logger = Logger(child=True)

FAL_DOWNLOAD_TIMEOUT_S = 120.0
METADATA_VERSION = "1.1"  # 1.1 adds cost, video, poster_key, preview_key, previews_skipped, reused_from
# The GPU's previews are small (a JPEG frame, a WebP of a few frames under ~1 MB); anything larger
# is not one of them and is not copied.
MAX_PREVIEW_BYTES = 10 * 1024 * 1024
# GPU upload field -> the preview's file name next to video.mp4, and the GpuResult size naming it.
PREVIEWS: dict[str, str] = {"poster_put_url": "poster_bytes", "preview_put_url": "preview_bytes"}
FAL_PREVIEWS_SKIPPED = (
    "fal.ai results have no poster.jpg/preview.webp: the webhook would have to decode the H.264 "
    "video, and its Lambda layer has no video decoder."
)


@dataclass(frozen=True)
class Reply:
    status: int
    body: dict[str, Any]


def _ok(**body: Any) -> Reply:
    return Reply(200, {"ok": True, **body})


def metadata(
    job: Job,
    *,
    result: dict[str, Any],
    size: int,
    call_id: str | None,
    cost: dict[str, Any] | None = None,
    video: dict[str, Any] | None = None,
    poster_key: str | None = None,
    preview_key: str | None = None,
    previews_skipped: str | None = None,
) -> dict[str, Any]:
    """metadata.json. `video` is fal's output `File` (url = a presigned GET like the notification's
    output_url), so code written against fal's result reads ours; `cost` is `vap_shared.cost`'s."""
    keys = output_keys(job.output_prefix)
    body = {
        "version": METADATA_VERSION,
        "job_id": job.job_id,
        "sidecar_bucket": job.sidecar_bucket,
        "sidecar_key": job.sidecar_key,
        "name": job.name,
        "inputs": {"settings": job.settings, "media": job.inputs},
        "seed": result.get("seed", job.seed),
        "backend": job.backend,
        "backend_call_id": call_id,
        "fallback_from": job.fallback_from,
        "fallback_reason": job.fallback_reason,
        "result": result,
        "output_key": keys["video"],
        "bytes": size,
        "gpus": job.gpus,
        "timings": {**job.timings(), "completed_at": iso(utcnow()), "backend": result.get("timings", {})},
        "video": video,
        "poster_key": poster_key,
        "preview_key": preview_key,
        "cost": cost,
    }
    if previews_skipped:
        body["previews_skipped"] = previews_skipped
    return body


def _cost(rt: Runtime, gpu_runs: tuple[GpuRun, ...] = (), fal_videos: int = 0) -> dict[str, Any] | None:
    try:
        return estimate(rt.prices, gpu_runs, fal_videos)
    except Exception:  # a malformed price must not stop storing a result
        logger.warning("could not estimate the job's cost", exc_info=True)
        return None


def _video(rt: Runtime, job: Job, key: str, size: int) -> dict[str, Any]:
    url, _ = presign_output(rt.s3, rt.settings.bucket_name, key)
    return video_file(url, size, job.name, job.job_id)


def _copy_previews(rt: Runtime, job: Job, result: GpuResult | None) -> dict[str, str]:
    """Copy the GPU's poster/preview from work/<job_id>/ next to the video; upload field -> new
    key. Missing ones (not asked for, the GPU could not store them) are simply absent."""
    s = rt.settings
    copied: dict[str, str] = {}
    for field, size_attr in PREVIEWS.items():
        if result is not None and getattr(result, size_attr) is None:
            continue  # the GPU reports it did not store this one
        name, content_type = GPU_UPLOADS[field]
        source = work_upload_key(s.work_prefix, job.job_id, field)
        found = head(rt.s3, s.bucket_name, source)
        if found is None:
            continue
        if int(found.get("ContentLength", 0)) > MAX_PREVIEW_BYTES:
            logger.warning("preview too large; not stored", extra={"job_id": job.job_id, "key": source})
            continue
        dest = job.output_prefix + name
        copy(rt.s3, s.bucket_name, source, dest, content_type)
        copied[field] = dest
    return copied


# ---------------------------------------------------------------- GPU (Modal / local GPU server)


GpuMessage = TypeVar("GpuMessage", GpuCallback, UrlRefreshRequest)


def verified_gpu_message(
    rt: Runtime, job_id: str, headers: dict[str, str], body: bytes, model: type[GpuMessage]
) -> tuple[GpuMessage, Job] | Reply:
    """A body the job's GPU run signed (per-job HMAC, timestamp window) for the job in the path,
    parsed as `model`, and the job; else the reply that refuses it (401/400/404)."""
    key = derive_callback_key(rt.stack_secret(), job_id)
    try:
        verify_callback(key, headers.get("x-vap-timestamp"), headers.get("x-vap-signature"), body)
    except SignatureError as exc:
        logger.warning("rejected a GPU request", extra={"job_id": job_id, "reason": str(exc)})
        return Reply(401, {"error": "invalid signature"})
    try:
        message = model.model_validate_json(body)
    except ValidationError:
        return Reply(400, {"error": f"body is not a valid {model.__name__}"})
    if message.job_id != job_id:
        return Reply(401, {"error": "job id does not match the signed path"})
    job = rt.store.get(job_id)
    if job is None:
        return Reply(404, {"error": "unknown job"})
    return message, job


def superseded_run(job: Job, call_id: str) -> str | None:
    """Why a GPU run `call_id` of `job` no longer counts (None: it does): the job fell back to
    another backend, or another run is recorded."""
    if job.backend not in (None, "modal"):
        return f"the job has moved to {job.backend}"
    if job.backend_call_id and job.backend_call_id != call_id:
        return "another run of the job is recorded"
    return None


def handle_gpu_callback(rt: Runtime, job_id: str, headers: dict[str, str], body: bytes) -> Reply:
    verified = verified_gpu_message(rt, job_id, headers, body, GpuCallback)
    if isinstance(verified, Reply):
        return verified
    callback, job = verified
    if job.terminal:
        finalize_terminal(rt, job)
        return _ok(state=job.state, note="already finished")
    # A callback from a superseded dispatch (the job fell back to fal) changes nothing.
    if superseded_run(job, callback.call_id) is not None:
        return _ok(state=job.state, note="stale callback ignored")
    if callback.event == "progress":
        progress = callback.progress.model_dump() if callback.progress else None
        updated = rt.store.transition(job_id, "running", {"progress": progress}, iso(utcnow()))
        if updated is not None and (job.state != "running" or progress_worth_writing(job.progress, progress)):
            write_status(rt.s3, rt.settings.bucket_name, updated)
        return _ok(state=updated.state if updated else job.state)
    if callback.event == "succeeded":
        return _gpu_succeeded(rt, job, callback)
    error = callback.error
    message = error.message if error else "the GPU reported a failure without details"
    errors: list[FieldError] = [field_error(None, f"Generation failed on Modal: {message}")]
    reason = f"{error.code}: {message}" if error else message
    updated = fall_back_or_fail(
        rt,
        job,
        errors,
        reason,
        allow=gpu_error_allows_fallback(error),
        kind=metrics.error_kind_of_gpu_code(error.code if error else None),
    )
    return _ok(state=updated.state if updated else job.state)


def _gpu_succeeded(rt: Runtime, job: Job, callback: GpuCallback) -> Reply:
    s = rt.settings
    work_key = work_video_key(s.work_prefix, job.job_id)
    try:
        size = validate_mp4(rt.s3, s.bucket_name, work_key, s.max_output_bytes)
    except StoreError as exc:
        if exc.retryable:
            return Reply(503, {"error": exc.message})
        errors = [field_error(None, f"The generated video is not usable: {exc.message}.")]
        updated = fall_back_or_fail(rt, job, errors, exc.message, kind="internal")
        return _ok(state=updated.state if updated else job.state)
    keys = output_keys(job.output_prefix)
    write_status(rt.s3, s.bucket_name, job, "storing")
    copy(rt.s3, s.bucket_name, work_key, keys["video"])
    previews = _copy_previews(rt, job, callback.result)
    result = callback.result.model_dump() if callback.result else {}
    gpu_type = job.gpu_type or gpu_type_of(result.get("gpu"))
    runs = (gpu_run_of_result(result, job.gpus or 1, gpu_type),) if callback.result else ()
    cost = _cost(rt, runs)
    put_json(
        rt.s3,
        s.bucket_name,
        keys["metadata"],
        metadata(
            job,
            result=result,
            size=size,
            call_id=callback.call_id,
            cost=cost,
            video=_video(rt, job, keys["video"], size),
            poster_key=previews.get("poster_put_url"),
            preview_key=previews.get("preview_put_url"),
        ),
    )
    fields: dict[str, Any] = {
        "output_key": keys["video"],
        "metadata_key": keys["metadata"],
        "bytes": size,
        "poster_key": previews.get("poster_put_url"),
        "preview_key": previews.get("preview_put_url"),
        "cost": cost,
        "gpu_type": gpu_type,
    }
    if callback.result:
        fields["seed"] = callback.result.seed
    if not job.backend:
        fields.update({"backend": "modal", "backend_call_id": callback.call_id})
    updated = succeed_job(rt, job.job_id, fields)
    logger.info("job succeeded", extra={"job_id": job.job_id, "backend": "modal", "bytes": size})
    return _ok(state=updated.state if updated else "succeeded")


# ---------------------------------------------------------------- fal


def handle_fal_webhook(rt: Runtime, job_id: str, headers: dict[str, str], body: bytes) -> Reply:
    from .fal_webhook import verify_fal_webhook  # PyNaCl + JWKS: loaded by fal deliveries only

    try:
        request_id = verify_fal_webhook(headers, body, rt.jwks, expected_user_id=rt.settings.fal_user_id)
    except SignatureError as exc:
        logger.warning("rejected fal webhook", extra={"job_id": job_id, "reason": str(exc)})
        return Reply(401, {"error": "invalid signature"})
    try:
        delivery = json.loads(body)
    except ValueError:
        return Reply(400, {"error": "body is not JSON"})
    if not isinstance(delivery, dict):
        return Reply(400, {"error": "body is not a JSON object"})
    if str(delivery.get("request_id", request_id)) != request_id:
        return Reply(401, {"error": "request id does not match the signed header"})
    job = rt.store.get(job_id)
    if job is None:
        return Reply(404, {"error": "unknown job"})
    if job.terminal:
        finalize_terminal(rt, job)
        return _ok(state=job.state, note="already finished")
    # backend None: fal answered before ingest recorded the dispatch; the signed delivery to this
    # job's own webhook URL is then the record.
    if job.backend not in (None, "fal") or (job.backend_call_id and job.backend_call_id != request_id):
        return _ok(state=job.state, note="stale delivery ignored")
    if job.backend is None:
        recorded = rt.store.update_fields(
            job_id, {"backend": "fal", "backend_call_id": request_id}, iso(utcnow()), "backend_call_id"
        )
        job = recorded or rt.store.get(job_id) or job
    payload = delivery.get("payload")
    status = delivery.get("status")
    video = payload.get("video") if isinstance(payload, dict) else None
    url = video.get("url") if isinstance(video, dict) else None
    if status == "OK" and isinstance(url, str) and url:
        return _fal_succeeded(rt, job, request_id, payload if isinstance(payload, dict) else {}, url)
    errors = fal_failure_errors(delivery)
    reason = "; ".join(e["message"] for e in errors)
    updated = fall_back_or_fail(rt, job, errors, reason, kind=fal_failure_kind(delivery))
    return _ok(state=updated.state if updated else job.state)


def fal_failure_kind(delivery: dict[str, Any]) -> metrics.ErrorKind:
    """fal's validation answer (a 422 `detail`) is the request's fault; any other failure is not."""
    payload = delivery.get("payload")
    return "input" if isinstance(payload, dict) and payload.get("detail") is not None else "internal"


def fal_failure_errors(delivery: dict[str, Any]) -> list[FieldError]:
    payload = delivery.get("payload")
    if isinstance(payload, dict) and payload.get("detail") is not None:
        return fal_detail_errors(payload["detail"])
    if delivery.get("payload_error"):
        return [field_error(None, f"fal.ai could not return the result: {delivery['payload_error']}")]
    if delivery.get("error"):
        return [field_error(None, f"Generation failed on fal.ai: {delivery['error']}")]
    if delivery.get("status") == "OK":
        return [field_error(None, "fal.ai finished without a video URL.")]
    return [field_error(None, "Generation failed on fal.ai without a reason.")]


def _fal_succeeded(rt: Runtime, job: Job, request_id: str, payload: dict[str, Any], url: str) -> Reply:
    s = rt.settings
    keys = output_keys(job.output_prefix)
    write_status(rt.s3, s.bucket_name, job, "storing")
    try:
        size = stream_url_to_s3(
            rt.http,
            rt.s3,
            url,
            s.bucket_name,
            keys["video"],
            allowed_hosts=s.fal_media_hosts,
            max_bytes=s.max_output_bytes,
            timeout_s=FAL_DOWNLOAD_TIMEOUT_S,
            allow_http_loopback=s.allow_http_loopback,
        )
    except StoreError as exc:
        if exc.retryable:
            # fal redelivers the webhook; the download starts over (no partial object exists).
            return Reply(503, {"error": exc.message})
        fail_job(
            rt, job.job_id, [field_error(None, f"The fal.ai result could not be stored: {exc.message}.")]
        )
        return _ok(state="failed")
    result = {k: v for k, v in payload.items() if k != "video"}
    result["video"] = {k: v for k, v in (payload.get("video") or {}).items() if k != "url"}
    cost = _cost(rt, fal_videos=1)
    put_json(
        rt.s3,
        s.bucket_name,
        keys["metadata"],
        metadata(
            job,
            result=result,
            size=size,
            call_id=request_id,
            cost=cost,
            video=_video(rt, job, keys["video"], size),
            previews_skipped=FAL_PREVIEWS_SKIPPED,
        ),
    )
    fields: dict[str, Any] = {
        "output_key": keys["video"],
        "metadata_key": keys["metadata"],
        "backend": "fal",
        "backend_call_id": request_id,
        "bytes": size,
        "cost": cost,
    }
    if isinstance(payload.get("seed"), int):
        fields["seed"] = payload["seed"]
    updated = succeed_job(rt, job.job_id, fields)
    logger.info("job succeeded", extra={"job_id": job.job_id, "backend": "fal", "bytes": size})
    return _ok(state=updated.state if updated else "succeeded")


# The sweeper recovers a finished result whose callback/webhook never arrived through the same
# paths (same keys, same conditional transition, same notify-once).
store_gpu_success = _gpu_succeeded
store_fal_success = _fal_succeeded
