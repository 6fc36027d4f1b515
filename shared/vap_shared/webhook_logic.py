"""Webhook logic: verified GPU callbacks and fal deliveries → job updates, results queued for storing.

Every delivery is answered within seconds: a finished run's result is checked and queued on the
store queue (`vap_shared.result_store`), never downloaded here. Every path is idempotent: repeated
deliveries queue the same result (stored once), transitions are conditional and the notification is
claimed once.

GPU re-runs: Modal runs a preempted input again on a fresh container with the same call id, and
each callback says which attempt sent it. The newest attempt heard from is recorded (monotonic);
callbacks of an older attempt change nothing (and never cause a fallback: that would pay twice).
Progress never goes backwards: within a dispatch the job (and `status.json`) keeps the furthest
step reported by any attempt, so a re-run that starts over from step 0 shows no progress until it
passes the step its predecessor had reached.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from aws_lambda_powertools import Logger
from pydantic import ValidationError

from .gpu_contract import GpuCallback, UrlRefreshRequest
from .jobs import Job, iso, utcnow
from .runs import superseded
from .runtime import Runtime
from .signing import SignatureError, derive_callback_key, verify_callback
from .status_object import progress_worth_writing, write_status

if TYPE_CHECKING:
    from .result_store import Intake

# A route loads only what it uses (cold start): progress callbacks, the most frequent, never load
# the store path, the lifecycle (fallback, notifications), the fal verifier or the URL refresh.

logger = Logger(child=True)


def _finalize_terminal(rt: Runtime, job: Job) -> None:
    from .lifecycle import finalize_terminal

    finalize_terminal(rt, job)


@dataclass(frozen=True)
class Delivery:
    """One POST to a callback route, as the handler parsed it from the Function URL event."""

    job_id: str
    headers: Mapping[str, str]  # lower-case names
    body: bytes
    # The fal webhook URL's per-job token (`?token=`; vap_shared.fal_token); None when absent.
    token: str | None = field(default=None, repr=False)


@dataclass(frozen=True)
class Reply:
    status: int
    body: dict[str, Any]


def _ok(**body: Any) -> Reply:
    return Reply(200, {"ok": True, **body})


def _intake_reply(intake: Intake) -> Reply:
    if intake.outcome == "retry":
        return Reply(503, {"error": intake.message})  # the sender retries the delivery
    note = "result queued for storing" if intake.outcome == "queued" else None
    return _ok(state=intake.state, **({"note": note} if note else {}))


# ---------------------------------------------------------------- GPU (Modal / local GPU server)


GpuMessage = TypeVar("GpuMessage", GpuCallback, UrlRefreshRequest)


def verified_gpu_message(
    rt: Runtime, delivery: Delivery, model: type[GpuMessage]
) -> tuple[GpuMessage, Job] | Reply:
    """A body the job's GPU run signed (per-job HMAC, timestamp window) for the job in the path,
    parsed as `model`, and the job; else the reply that refuses it (401/400/404)."""
    job_id = delivery.job_id
    key = derive_callback_key(rt.stack_secret(), job_id)
    headers = delivery.headers
    try:
        verify_callback(key, headers.get("x-vap-timestamp"), headers.get("x-vap-signature"), delivery.body)
    except SignatureError as exc:
        logger.warning("rejected a GPU request", extra={"job_id": job_id, "reason": str(exc)})
        return Reply(401, {"error": "invalid signature"})
    try:
        message = model.model_validate_json(delivery.body)
    except ValidationError:
        return Reply(400, {"error": f"body is not a valid {model.__name__}"})
    if message.job_id != job_id:
        return Reply(401, {"error": "job id does not match the signed path"})
    job = rt.store.get(job_id)
    if job is None:
        return Reply(404, {"error": "unknown job"})
    return message, job


def superseded_run(job: Job, call_id: str, attempt: int | None = None) -> str | None:
    """Why attempt `attempt` of GPU run `call_id` no longer counts for `job` (None: it does)."""
    return superseded(job, "modal", call_id, attempt)


def note_attempt(rt: Runtime, job: Job, call_id: str, attempt: int) -> Job | str:
    """Record `attempt` as the newest heard from when it is newer (a conditional, monotonic write);
    the job as it now is, or why the attempt is superseded."""
    why = superseded_run(job, call_id, attempt)
    if why is not None:
        return why
    if attempt <= (job.gpu_attempt or 1):
        return job
    recorded = rt.store.record_gpu_attempt(job.job_id, attempt, iso(utcnow()))
    if recorded is None:  # a newer attempt was recorded meanwhile
        return f"a newer attempt than {attempt} was recorded"
    logger.info("a new attempt of the GPU run", extra={"job_id": job.job_id, "attempt": attempt})
    return recorded


def handle_gpu_callback(rt: Runtime, delivery: Delivery) -> Reply:
    verified = verified_gpu_message(rt, delivery, GpuCallback)
    if isinstance(verified, Reply):
        return verified
    callback, job = verified
    if job.terminal:
        _finalize_terminal(rt, job)
        return _ok(state=job.state, note="already finished")
    noted = note_attempt(rt, job, callback.call_id, callback.attempt)
    if isinstance(noted, str):
        # The job fell back to fal, another run is recorded, or a newer attempt runs: no change.
        logger.info("stale GPU callback ignored", extra={"job_id": job.job_id, "reason": noted})
        return _ok(state=job.state, note="stale callback ignored")
    job = noted
    if callback.event == "progress":
        return _progress(rt, job, callback)
    from .result_store import accept_gpu_result, gpu_failed

    if callback.event == "succeeded":
        return _intake_reply(accept_gpu_result(rt, job, callback.call_id, callback.attempt, callback.result))
    return _intake_reply(gpu_failed(rt, job, callback.error))


def _progress(rt: Runtime, job: Job, callback: GpuCallback) -> Reply:
    if callback.progress is None:
        return _ok(state=job.state)
    progress = callback.progress.model_dump()
    updated = rt.store.advance_progress(job.job_id, progress, callback.attempt, iso(utcnow()))
    if updated is None:
        return _ok(state=job.state, note="progress not advanced")  # behind what was shown, or stale
    if job.state != "running" or progress_worth_writing(job.progress, progress):
        write_status(rt.s3, rt.settings.bucket_name, updated)
    return _ok(state=updated.state)


# ---------------------------------------------------------------- fal


def handle_fal_webhook(rt: Runtime, delivery: Delivery) -> Reply:
    """A fal delivery counts only when fal signed it (any account's: fal signs all alike) AND it is
    ours: for the fal request recorded on the job, or, while none is recorded yet, to a URL with the
    job's token for a job being dispatched to fal."""
    from .fal_delivery import FalDelivery
    from .fal_token import token_matches
    from .fal_webhook import verify_fal_webhook  # PyNaCl + JWKS: loaded by fal deliveries only
    from .result_store import accept_fal_result

    job_id = delivery.job_id
    try:
        request_id = verify_fal_webhook(
            delivery.headers, delivery.body, rt.jwks, expected_user_id=rt.settings.fal_user_id
        )
    except SignatureError as exc:
        logger.warning("rejected fal webhook", extra={"job_id": job_id, "reason": str(exc)})
        return Reply(401, {"error": "invalid signature"})
    # A token that is present must be the job's (never logged, compared in constant time).
    with_token = delivery.token is not None
    if with_token and not token_matches(rt.stack_secret(), job_id, delivery.token):
        logger.warning("rejected fal webhook", extra={"job_id": job_id, "reason": "wrong webhook token"})
        return Reply(401, {"error": "invalid webhook token"})
    try:
        body = FalDelivery.model_validate_json(delivery.body)
    except ValidationError:
        return Reply(400, {"error": "body is not a JSON object"})
    if (body.request_id or request_id) != request_id:
        return Reply(401, {"error": "request id does not match the signed header"})
    job = rt.store.get(job_id)
    if job is None:
        return Reply(404, {"error": "unknown job"})
    recorded = job.backend == "fal" and job.backend_call_id == request_id
    if not recorded and not with_token:
        # Not the fal request recorded for the job, and nothing ties it to one of ours.
        logger.warning("rejected fal webhook", extra={"job_id": job_id, "reason": "not a request of the job"})
        return Reply(401, {"error": "the delivery is not for a request of this job"})
    if job.terminal:
        _finalize_terminal(rt, job)
        return _ok(state=job.state, note="already finished")
    if recorded:
        return _intake_reply(accept_fal_result(rt, job, request_id, body))
    if job.backend == "fal" and job.backend_call_id:
        return _ok(state=job.state, note="stale delivery ignored")  # another request of ours
    if job.dispatch_intent == "fal":
        # Ours (the token), overtaking the dispatch write: the delivery records the request.
        noted = rt.store.record_fal_request(job_id, request_id, iso(utcnow()))
        job = noted or rt.store.get(job_id) or job
        if job.terminal or job.backend != "fal" or job.backend_call_id != request_id:
            return _ok(state=job.state, note="stale delivery ignored")
        return _intake_reply(accept_fal_result(rt, job, request_id, body))
    if job.backend is not None or job.dispatch_intent is not None:
        return _ok(state=job.state, note="stale delivery ignored")  # the job went to the other backend
    # Nothing says the job is being sent to fal (yet): let fal deliver it again later.
    return Reply(503, {"error": "the job is not dispatched yet; deliver again later"})


def handle_url_refresh(rt: Runtime, delivery: Delivery) -> Reply:
    """`POST /callbacks/gpu/{job_id}/urls` (`vap_shared.url_refresh`)."""
    from .url_refresh import handle_url_refresh as refresh

    return refresh(rt, delivery)
