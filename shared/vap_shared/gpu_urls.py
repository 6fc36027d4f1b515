"""The service's own presigned URLs in a GPU request: which fields hold them, and fresh ones.

A dispatch sends URLs that live the job budget; the GPU asks the `urls` route (`vap_shared.routes`)
for fresh ones when the job starts (after Modal's queue and cold start) and before it uploads, so a
URL never expires in a queue (and never outlives the Lambda credentials that signed it unnoticed).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import cast

from .gpu_contract import ServiceUrlField, UrlRefreshResponse
from .jobs import Job
from .media import MediaRef
from .naming import GPU_UPLOADS, RESUME_STATE, work_resume_key, work_upload_key
from .routes import url

GetSigner = Callable[[str, str], str]  # (bucket, key) -> presigned GET
PutSigner = Callable[[str, str], str]  # (key, content type) -> presigned PUT in the stack's bucket
INPUT_FIELDS: tuple[ServiceUrlField, ...] = ("video_url", "image_url")


def refresh_url(webhook_base_url: str, job_id: str) -> str:
    return url(webhook_base_url, "urls", job_id)


def service_url_fields(
    video: MediaRef, image: MediaRef, previews: bool = False
) -> tuple[ServiceUrlField, ...]:
    """The request fields that are our presigned S3 URLs (a user's https URL passes through)."""
    fields: list[ServiceUrlField] = [
        cast(ServiceUrlField, ref.field) for ref in (video, image) if ref.kind != "https"
    ]
    fields.append("output_put_url")
    if previews:
        fields += ["poster_put_url", "preview_put_url"]
    return tuple(fields)


def fresh_urls(
    job: Job,
    fields: Iterable[str],
    *,
    work_prefix: str,
    sign_get: GetSigner,
    sign_put: PutSigner,
    expires_at: int,
    bucket: str | None = None,
) -> UrlRefreshResponse:
    """New URLs for the job's own objects named by `fields`: its recorded inputs (inbox/ or work/)
    and its uploads under work/<job_id>/. Anything else stays None ("keep the URL you have").
    With `bucket` (the stack's), also a GET and a PUT for the job's saved denoising state."""
    urls: dict[str, str] = {}
    inputs = job.inputs or {}
    for field in fields:
        if field in INPUT_FIELDS and field in inputs:
            ref = MediaRef.from_record(field, inputs[field])
            if ref.kind == "s3" and ref.bucket and ref.key:
                urls[field] = sign_get(ref.bucket, ref.key)
        elif field in GPU_UPLOADS:
            urls[field] = sign_put(work_upload_key(work_prefix, job.job_id, field), GPU_UPLOADS[field][1])
    if bucket is not None:
        state = work_resume_key(work_prefix, job.job_id)
        urls["resume_get_url"] = sign_get(bucket, state)
        urls["resume_put_url"] = sign_put(state, RESUME_STATE[1])
    return UrlRefreshResponse(**urls, expires_at=expires_at)
