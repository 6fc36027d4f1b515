"""Ending a job: error report / outputs, terminal transition, exactly-once notification, fallback.

Every step is idempotent so a redelivered event, a retried webhook or a sweeper can finish a job
that a crash left half-done. The job metrics of an ending (and the reuse entry of a success) are
written only by the call whose conditional transition won, so a job is counted once however many
deliveries race to end it.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from aws_lambda_powertools import Logger

from . import metrics
from .errors import FieldError
from .jobs import Job, iso, utcnow
from .naming import output_keys
from .reuse import ReuseEntry
from .runtime import Runtime
from .s3io import put_json
from .status_object import write_status

if TYPE_CHECKING:
    from .backends.base import DispatchRequest

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


def _cost_total(cost: dict[str, Any] | None) -> float | None:
    total = (cost or {}).get("total")
    return float(total) if isinstance(total, int | float) and not isinstance(total, bool) else None


def aws_only_cost(rt: Runtime) -> dict[str, Any] | None:
    """The cost of a job no backend billed (or whose run's seconds are unknown): AWS only."""
    from .cost import estimate

    try:
        return estimate(rt.prices)
    except Exception:  # a malformed price must not stop a job from ending
        logger.warning("could not estimate the job's cost", exc_info=True)
        return None


def fail_job(
    rt: Runtime,
    job_id: str,
    errors: list[FieldError],
    extra: dict[str, Any] | None = None,
    kind: metrics.ErrorKind = "internal",
) -> Job | None:
    """Job → failed with `errors`, error.json in the outputs folder, failure notification.

    `kind` is the metrics' error kind: `input` (the request: validation, media, a backend's 422),
    `safety`, `timeout` (the run went past its budget) or `internal` (everything else)."""
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
        # The GPU's failure report carries no timings: a failed run's GPU seconds are not estimated.
        "cost": current.cost or aws_only_cost(rt),
        **(extra or {}),
    }
    updated = rt.store.transition(job_id, "failed", fields, iso(utcnow()))
    if updated is None:  # something else ended it meanwhile
        updated = rt.store.get(job_id)
        if updated is None:
            return None
    else:
        metrics.job_failed(updated.backend, kind, _cost_total(updated.cost), job_id)
    logger.info("job failed", extra={"job_id": job_id, "errors": errors, "kind": kind})
    finalize_terminal(rt, updated)
    return updated


def succeed_job(rt: Runtime, job_id: str, fields: dict[str, Any]) -> Job | None:
    updated = rt.store.transition(
        job_id,
        "succeeded",
        {**fields, "completed_at": iso(utcnow()), "dispatch_lease_until": None},
        iso(utcnow()),
    )
    if updated is None:
        updated = rt.store.get(job_id)
        if updated is None:
            return None
    elif updated.reused_from:
        metrics.result_reused(_cost_total(updated.cost), job_id)
    else:
        metrics.job_succeeded(
            updated.backend, updated.timings()["generation_s"], _cost_total(updated.cost), job_id
        )
        remember_result(rt, updated)
    finalize_terminal(rt, updated)
    return updated


def remember_result(rt: Runtime, job: Job) -> bool:
    """Record a succeeded job's result for reuse (when it has a reuse key); the first success for
    a key stays. Best effort: reuse saves a run later, it must not fail this one."""
    if not job.reuse_key or not job.output_key or not job.metadata_key or job.reused_from:
        return False
    entry = ReuseEntry(
        key=job.reuse_key,
        job_id=job.job_id,
        output_key=job.output_key,
        metadata_key=job.metadata_key,
        bytes=job.bytes or 0,
        backend=job.backend,
        created_at=job.completed_at or iso(utcnow()),
        files=tuple(key.rsplit("/", 1)[-1] for key in (job.poster_key, job.preview_key) if key),
    )
    try:
        recorded = rt.reuse.record(entry, job.expires_at or 0)
    except Exception:
        logger.warning("could not record the result for reuse", extra={"job_id": job.job_id}, exc_info=True)
        return False
    logger.info("result recorded for reuse", extra={"job_id": job.job_id, "recorded": recorded})
    return recorded


def request_from_job(job: Job) -> DispatchRequest:
    from .backends.base import DispatchRequest
    from .gpu_contract import GenerationSettings
    from .media import MediaRef

    inputs = job.inputs or {}
    return DispatchRequest(
        job_id=job.job_id,
        settings=GenerationSettings.model_validate(job.settings or {}),
        video=MediaRef.from_record("video_url", inputs["video_url"]),
        image=MediaRef.from_record("image_url", inputs["image_url"]),
        webhook_base_url=job.webhook_base_url or "",
        gpus=job.gpus or 1,
    )


def fall_back_or_fail(
    rt: Runtime,
    job: Job,
    errors: list[FieldError],
    reason: str,
    allow: bool = True,
    kind: metrics.ErrorKind = "internal",
) -> Job | None:
    """After a backend reported failure: re-dispatch once to the other backend when the sidecar
    allows it (`auto`, not fallen back yet), else fail the job (`kind`: see `fail_job`)."""
    # The backends load here, not at a cold start: the store function needs them only to fall back.
    from .backends.dispatch import DispatchFailed, fallback_target
    from .backends.dispatch import dispatch as dispatch_to

    target = fallback_target(job) if allow else None
    if target is None or not job.inputs or not job.webhook_base_url:
        return fail_job(rt, job.job_id, errors, kind=kind)
    failed_backend = job.backend
    # Claim the one fallback first, so repeated failure deliveries cannot dispatch twice; with it the
    # intent to dispatch to `target` (written before the submit: a fal delivery that overtakes the
    # `dispatched` write below finds the job waiting for it).
    claimed = rt.store.update_fields(
        job.job_id,
        {
            "fallback_from": failed_backend,
            "fallback_reason": reason[:500],
            "dispatch_intent": target,
            "dispatch_intent_at": iso(utcnow()),
        },
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
            rt,
            job.job_id,
            errors + exc.errors,
            {"fallback_from": failed_backend, "fallback_reason": reason},
            kind=kind,
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
            # A new run: its progress and GPU attempts start over.
            "progress": None,
            "progress_permille": None,
            "gpu_attempt": None,
            "dispatched_at": iso(utcnow()),
        },
        iso(utcnow()),
    )
    write_status(rt.s3, rt.settings.bucket_name, updated)
    if failed_backend is not None:
        metrics.fallback(failed_backend, job.job_id)
    metrics.job_dispatched(dispatch.backend, job_id=job.job_id)
    logger.info(
        "fell back to the other backend",
        extra={"job_id": job.job_id, "from": failed_backend, "to": dispatch.backend, "reason": reason},
    )
    return updated
