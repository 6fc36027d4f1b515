"""`vap cancel`: ask the backend to stop, then mark the job `cancelled` (job table + status.json).

Needs operator permissions: the job table (GetItem/UpdateItem), the Modal token / fal key secrets
and `outputs/*` PutObject. A cancelled job sends no notification (its `notified_at` is set).
The backend calls go through the Lambdas' own backend clients (`vap_shared.backends`), with the
secrets read by the Lambdas' parser: the credentials go only to the stack's configured hosts.
"""

from __future__ import annotations

from dataclasses import dataclass

import httpx
from botocore.exceptions import BotoCoreError, ClientError
from vap_shared.backends.base import BackendError
from vap_shared.backends.fal import FalBackend
from vap_shared.backends.modal import ModalBackend
from vap_shared.job_store import JobStore
from vap_shared.jobs import Job, iso, utcnow
from vap_shared.secrets import SecretError, Secrets
from vap_shared.status_object import write_status

from .config import StackInfo
from .errors import EXIT_INVALID, CliError

CANCELLED_MESSAGE = "Cancelled by the user (vap cancel)."
FAL_CANCEL_MEANING = {
    "OK": "removed from fal's queue",
    "CANCELLATION_REQUESTED": "removed from fal's queue",
    "ALREADY_COMPLETED": "already running or finished at fal: it runs to its end (and is billed)",
    "NOT_FOUND": "fal does not know the request",
}


@dataclass
class CancelOutcome:
    job: Job
    changed: bool  # False: it had already finished
    backend_note: str


def stack_secrets(stack: StackInfo) -> Secrets:
    """The stack's secrets, parsed exactly as the Lambdas parse them (every accepted form)."""

    def fetch(secret_id: str) -> str:
        try:
            return str(stack.client("secretsmanager").get_secret_value(SecretId=secret_id)["SecretString"])
        except (ClientError, BotoCoreError) as exc:
            raise CliError(f"cannot read the secret {secret_id} ({type(exc).__name__})") from None

    return Secrets(fetch)


def cancel_at_backend(stack: StackInfo, job: Job, http: httpx.Client) -> str:
    """Best effort; a short sentence saying what the backend answered."""
    if not job.backend or not job.backend_call_id:
        return "not dispatched yet: nothing to stop at a backend"
    secrets = stack_secrets(stack)
    local = stack.kind == "local"  # the local stack's backends listen on loopback http
    try:
        if job.backend == "modal":
            if not stack.modal_endpoint_url:
                return "Modal endpoint unknown (ModalEndpointUrl parameter): not cancelled there"
            token = secrets.modal_token(stack.modal_token_secret or "")
            modal = ModalBackend(http, stack.modal_endpoint_url, lambda: token, allow_http_loopback=local)
            cancelled = modal.cancel(job.backend_call_id)
            return f"Modal call {job.backend_call_id}: " + ("cancelled" if cancelled else "already finished")
        key = secrets.fal_key(stack.fal_key_secret or "")
        fal = FalBackend(
            http, stack.fal_queue_url, stack.fal_endpoint_id, lambda: key, allow_http_loopback=local
        )
        answer = fal.cancel(job.backend_call_id, job.fal_urls)
        return f"fal request {job.backend_call_id}: {answer} ({FAL_CANCEL_MEANING[answer]})"
    except CliError as exc:
        return f"could not cancel at {job.backend}: {exc.message}"
    except SecretError as exc:
        return f"could not cancel at {job.backend}: {exc}"
    except BackendError as exc:
        return f"could not cancel at {job.backend}: {exc.reason}"


def cancel_job(stack: StackInfo, job_id: str, http: httpx.Client | None = None) -> CancelOutcome:
    if not stack.jobs_table:
        raise CliError("The stack has no JobsTable output; cannot cancel.")
    store = JobStore(stack.client("dynamodb"), stack.jobs_table)
    job = store.get(job_id)
    if job is None:
        raise CliError(f"No job {job_id} in the job table.", EXIT_INVALID)
    if job.terminal:
        return CancelOutcome(job, False, f"already {job.state}")
    with http or httpx.Client(timeout=httpx.Timeout(15.0, connect=5.0)) as client:
        note = cancel_at_backend(stack, job, client)
    now = iso(utcnow())
    updated = store.transition(
        job_id,
        "cancelled",
        {
            "completed_at": now,
            "errors": [{"field": None, "message": CANCELLED_MESSAGE}],
            "notified_at": now,  # nobody is told about a job its owner stopped
            "dispatch_lease_until": None,
        },
        now,
    )
    if updated is None:  # it finished meanwhile
        current = store.get(job_id) or job
        return CancelOutcome(current, False, f"{note}; the job had already {current.state}")
    # The job left the unsettled index only once its terminal status is written; if S3 refuses it
    # now, the sweeper's catch-up writes it (the job stays in that index until then).
    if write_status(stack.client("s3"), stack.bucket, updated):
        store.mark_status_written(job_id, iso(utcnow()))
        store.settle(job_id)
    return CancelOutcome(updated, True, note)
