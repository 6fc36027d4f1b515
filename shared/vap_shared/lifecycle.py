"""Ending a job: error report / outputs, terminal transition, exactly-once notification, fallback.

Every step is idempotent so a redelivered event, a retried webhook or a sweeper can finish a job
that a crash left half-done.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

from aws_lambda_powertools import Logger

from .backends.base import DispatchRequest
from .backends.dispatch import DispatchFailed, fallback_target
from .backends.dispatch import dispatch as dispatch_to
from .errors import FieldError
from .gpu_contract import GenerationSettings
from .jobs import Job, iso, utcnow
from .media import MediaRef
from .naming import output_keys
from .runtime import Runtime
from .s3io import put_json
from .status_object import write_status

logger = Logger(child=True)


def error_report(job: Job) -> dict[str, Any]:
    return {
        "version": "1",
        "job_id": job.job_id,
        "status": "failed",
        "sidecar_bucket": job.sidecar_bucket,
        "sidecar_key": job.sidecar_key,
        "backend": job.backend,
        "fallback_from": job.fallback_from,
        "errors": job.errors or [],
        "completed_at": job.completed_at,
    }


def notify_once(rt: Runtime, job: Job) -> bool:
    """Publish the job's notification unless one was sent; True if this call sent it."""
    if job.notified_at or not job.terminal:
        return False
    if not rt.store.claim_notification(job.job_id, iso(utcnow())):
        return False
    try:
        rt.notifier.publish(job)
    except Exception:
        # Give the claim back so the retry (SQS redelivery / webhook retry) can notify.
        rt.store.release_notification(job.job_id)
        raise
    logger.info("notified", extra={"job_id": job.job_id, "status": job.state})
    return True


def write_terminal_status(rt: Runtime, job: Job) -> None:
    """The terminal status.json, recorded on the job; raises if S3 refuses it (so the caller's
    retry writes it again, exactly like a failed notification)."""
    write_status(rt.s3, rt.settings.bucket_name, job, required=True)
    rt.store.mark_status_written(job.job_id, iso(utcnow()))


def finalize_terminal(rt: Runtime, job: Job) -> None:
    """Finish what a crash may have skipped for a job already in a terminal state: error report,
    terminal status.json (before the notification: a notified job's status is never stale),
    the one notification, then leave the unsettled index. Raises while any of it fails."""
    if job.state == "failed" and job.error_report_key:
        put_json(rt.s3, rt.settings.bucket_name, job.error_report_key, error_report(job))
    # Always written, even if written before: a late non-terminal write (a duplicate callback's
    # `storing`) may have replaced it.
    write_terminal_status(rt, job)
    notify_once(rt, job)
    rt.store.settle(job.job_id)


def fail_job(
    rt: Runtime, job_id: str, errors: list[FieldError], extra: dict[str, Any] | None = None
) -> Job | None:
    """Job → failed with `errors`, error.json in the outputs folder, failure notification."""
    current = rt.store.get(job_id)
    if current is None:
        return None
    if current.terminal:
        finalize_terminal(rt, current)
        return current
    report_key = output_keys(current.output_prefix)["error"]
    fields: dict[str, Any] = {
        "errors": errors,
        "error_report_key": report_key,
        "completed_at": iso(utcnow()),
        "dispatch_lease_until": None,
        **(extra or {}),
    }
    updated = rt.store.transition(job_id, "failed", fields, iso(utcnow()))
    if updated is None:  # something else ended it meanwhile
        updated = rt.store.get(job_id)
        if updated is None:
            return None
    logger.info("job failed", extra={"job_id": job_id, "errors": errors})
    finalize_terminal(rt, updated)
    return updated


def succeed_job(rt: Runtime, job_id: str, fields: dict[str, Any]) -> Job | None:
    updated = rt.store.transition(
        job_id, "succeeded", {**fields, "completed_at": iso(utcnow())}, iso(utcnow())
    )
    if updated is None:
        updated = rt.store.get(job_id)
        if updated is None:
            return None
    finalize_terminal(rt, updated)
    return updated


def request_from_job(job: Job) -> DispatchRequest:
    inputs = job.inputs or {}
    return DispatchRequest(
        job_id=job.job_id,
        settings=GenerationSettings.model_validate(job.settings or {}),
        video=MediaRef.from_record("video_url", inputs["video_url"]),
        image=MediaRef.from_record("image_url", inputs["image_url"]),
        webhook_base_url=job.webhook_base_url or "",
    )


def fall_back_or_fail(
    rt: Runtime, job: Job, errors: list[FieldError], reason: str, allow: bool = True
) -> Job | None:
    """After a backend reported failure: re-dispatch once to the other backend when the sidecar
    allows it (`auto`, not fallen back yet), else fail the job."""
    target = fallback_target(job) if allow else None
    if target is None or not job.inputs or not job.webhook_base_url:
        return fail_job(rt, job.job_id, errors)
    failed_backend = job.backend
    # Claim the one fallback first, so repeated failure deliveries cannot dispatch twice.
    claimed = rt.store.update_fields(
        job.job_id,
        {"fallback_from": failed_backend, "fallback_reason": reason[:500]},
        iso(utcnow()),
        only_if_absent="fallback_from",
    )
    if claimed is None:
        return rt.store.get(job.job_id)
    # A new dispatch gets a whole budget (its URLs and deadline start now). It does not wait for
    # capacity: the job already held a place, and the webhook cannot park it in the queue.
    request = replace(request_from_job(job), deadline_unix=rt.settings.budget.deadline_unix(time.time()))
    try:
        outcome = dispatch_to(request, target, rt.backends)
    except DispatchFailed as exc:
        return fail_job(
            rt, job.job_id, errors + exc.errors, {"fallback_from": failed_backend, "fallback_reason": reason}
        )
    dispatch = outcome.dispatch
    updated = rt.store.transition(
        job.job_id,
        "dispatched",
        {
            "backend": dispatch.backend,
            "backend_call_id": dispatch.call_id,
            "fal_urls": dispatch.urls or None,
            "fallback_from": failed_backend,
            "fallback_reason": reason[:500],
            "progress": None,
            "dispatched_at": iso(utcnow()),
        },
        iso(utcnow()),
    )
    write_status(rt.s3, rt.settings.bucket_name, updated)
    logger.info(
        "fell back to the other backend",
        extra={"job_id": job.job_id, "from": failed_backend, "to": dispatch.backend, "reason": reason},
    )
    return updated
