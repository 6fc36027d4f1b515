"""`POST /callbacks/gpu/{job_id}/urls`: fresh presigned URLs for a GPU run that is still wanted.

Signed like a GPU callback (per-job HMAC key). 200 `UrlRefreshResponse`; 409 when the service no
longer wants this run (the job finished, fell back to fal, another call id is recorded, or a newer
attempt of the call runs: Modal re-ran a preempted input): the GPU then stops at once; 401 bad
signature; 404 unknown job. A refresh from a newer attempt records it (the older one's callbacks
then change nothing).
"""

from __future__ import annotations

import time

from aws_lambda_powertools import Logger

from .gpu_contract import UrlRefreshRequest
from .gpu_urls import fresh_urls, service_url_fields
from .jobs import Job
from .media import MediaRef
from .runtime import Runtime
from .s3io import presign_put
from .webhook_logic import Delivery, Reply, note_attempt, verified_gpu_message

logger = Logger(child=True)


def unwanted_reason(rt: Runtime, job: Job, call_id: str, attempt: int) -> str | None:
    """Why the service no longer wants attempt `attempt` of run `call_id` (None: it does; a newer
    attempt is recorded as the one heard from)."""
    if job.terminal:
        return f"the job has finished ({job.state})"
    noted = note_attempt(rt, job, call_id, attempt)
    return noted if isinstance(noted, str) else None


def _fields(job: Job) -> tuple[str, ...]:
    if job.service_urls is not None:
        return tuple(job.service_urls)
    inputs = job.inputs or {}
    if "video_url" in inputs and "image_url" in inputs:
        return service_url_fields(
            MediaRef.from_record("video_url", inputs["video_url"]),
            MediaRef.from_record("image_url", inputs["image_url"]),
        )
    return ("output_put_url",)


def handle_url_refresh(rt: Runtime, delivery: Delivery) -> Reply:
    verified = verified_gpu_message(rt, delivery, UrlRefreshRequest)
    if isinstance(verified, Reply):
        return verified
    request, job = verified
    job_id = job.job_id
    reason = unwanted_reason(rt, job, request.call_id, request.attempt)
    if reason is not None:
        logger.info("URL refresh for an unwanted run", extra={"job_id": job_id, "reason": reason})
        return Reply(409, {"error": f"superseded: {reason}"})
    s = rt.settings
    ttl = s.budget.url_ttl_s
    urls = fresh_urls(
        job,
        _fields(job),
        work_prefix=s.work_prefix,
        sign_get=rt.sign_get,
        sign_put=lambda k, content_type: presign_put(rt.s3, s.bucket_name, k, ttl, content_type),
        expires_at=int(time.time()) + ttl,
        bucket=s.bucket_name,  # the GPU's saved denoising state (resume after a preemption)
    )
    logger.info("URLs refreshed", extra={"job_id": job_id, "purpose": request.purpose})
    return Reply(200, urls.model_dump())
