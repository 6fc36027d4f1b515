"""Webhook logic: verified GPU callbacks and fal webhooks → stored outputs, job updates, SNS.

Every path is idempotent: repeated deliveries store the same objects under the same keys, the
terminal transition is conditional and the notification is claimed once.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from aws_lambda_powertools import Logger
from pydantic import ValidationError

from .backends.dispatch import gpu_error_allows_fallback
from .backends.fal import fal_detail_errors
from .errors import FieldError, field_error
from .gpu_contract import GpuCallback
from .jobs import Job, iso, utcnow
from .lifecycle import fail_job, fall_back_or_fail, finalize_terminal, succeed_job
from .naming import output_keys, work_video_key
from .runtime import Runtime
from .s3io import StoreError, copy, put_json, stream_url_to_s3, validate_mp4
from .signing import SignatureError, derive_callback_key, verify_callback
from .status_object import progress_worth_writing, write_status

logger = Logger(child=True)

FAL_DOWNLOAD_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class Reply:
    status: int
    body: dict[str, Any]


def _ok(**body: Any) -> Reply:
    return Reply(200, {"ok": True, **body})


def metadata(job: Job, *, result: dict[str, Any], size: int, call_id: str | None) -> dict[str, Any]:
    keys = output_keys(job.output_prefix)
    return {
        "version": "1",
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
        "timings": {**job.timings(), "completed_at": iso(utcnow()), "backend": result.get("timings", {})},
    }


# ---------------------------------------------------------------- GPU (Modal / local GPU server)


def handle_gpu_callback(rt: Runtime, job_id: str, headers: dict[str, str], body: bytes) -> Reply:
    key = derive_callback_key(rt.stack_secret(), job_id)
    try:
        verify_callback(key, headers.get("x-vap-timestamp"), headers.get("x-vap-signature"), body)
    except SignatureError as exc:
        logger.warning("rejected GPU callback", extra={"job_id": job_id, "reason": str(exc)})
        return Reply(401, {"error": "invalid signature"})
    try:
        callback = GpuCallback.model_validate_json(body)
    except ValidationError:
        return Reply(400, {"error": "body is not a valid GPU callback"})
    if callback.job_id != job_id:
        return Reply(401, {"error": "job id does not match the signed path"})
    job = rt.store.get(job_id)
    if job is None:
        return Reply(404, {"error": "unknown job"})
    if job.terminal:
        finalize_terminal(rt, job)
        return _ok(state=job.state, note="already finished")
    # A callback from a superseded dispatch (the job fell back to fal) changes nothing.
    if (job.backend not in (None, "modal")) or (
        job.backend_call_id and job.backend_call_id != callback.call_id
    ):
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
    updated = fall_back_or_fail(rt, job, errors, reason, allow=gpu_error_allows_fallback(error))
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
        updated = fall_back_or_fail(rt, job, errors, exc.message)
        return _ok(state=updated.state if updated else job.state)
    keys = output_keys(job.output_prefix)
    write_status(rt.s3, s.bucket_name, job, "storing")
    copy(rt.s3, s.bucket_name, work_key, keys["video"])
    result = callback.result.model_dump() if callback.result else {}
    put_json(
        rt.s3,
        s.bucket_name,
        keys["metadata"],
        metadata(job, result=result, size=size, call_id=callback.call_id),
    )
    fields: dict[str, Any] = {"output_key": keys["video"], "metadata_key": keys["metadata"]}
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
    updated = fall_back_or_fail(rt, job, errors, reason)
    return _ok(state=updated.state if updated else job.state)


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
    put_json(
        rt.s3, s.bucket_name, keys["metadata"], metadata(job, result=result, size=size, call_id=request_id)
    )
    fields: dict[str, Any] = {
        "output_key": keys["video"],
        "metadata_key": keys["metadata"],
        "backend": "fal",
        "backend_call_id": request_id,
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
