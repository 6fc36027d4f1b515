"""`vap cancel`: ask the backend to stop, then mark the job `cancelled` (job table + status.json).

Needs operator permissions: the job table (GetItem/UpdateItem), the Modal token / fal key secrets
and `outputs/*` PutObject. A cancelled job sends no notification (its `notified_at` is set).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import httpx
from botocore.exceptions import BotoCoreError, ClientError
from vap_shared.job_store import JobStore
from vap_shared.jobs import Job, iso, utcnow
from vap_shared.status_object import write_status

from .config import StackInfo
from .errors import EXIT_INVALID, CliError

CANCELLED_MESSAGE = "Cancelled by the user (vap cancel)."


@dataclass
class CancelOutcome:
    job: Job
    changed: bool  # False: it had already finished
    backend_note: str


def _secret(stack: StackInfo, secret_id: str | None) -> str:
    if not secret_id:
        raise CliError("the stack does not name the secret")
    try:
        return str(stack.client("secretsmanager").get_secret_value(SecretId=secret_id)["SecretString"])
    except (ClientError, BotoCoreError) as exc:
        raise CliError(f"cannot read the secret {secret_id} ({type(exc).__name__})") from None


def cancel_at_backend(stack: StackInfo, job: Job, http: httpx.Client) -> str:
    """Best effort; a short sentence saying what the backend answered."""
    if not job.backend or not job.backend_call_id:
        return "not dispatched yet: nothing to stop at a backend"
    try:
        if job.backend == "modal":
            if not stack.modal_endpoint_url:
                return "Modal endpoint unknown (ModalEndpointUrl parameter): not cancelled there"
            token = json.loads(_secret(stack, stack.modal_token_secret))
            response = http.post(
                f"{stack.modal_endpoint_url.rstrip('/')}/cancel/{job.backend_call_id}",
                headers={"Modal-Key": str(token["key"]), "Modal-Secret": str(token["secret"])},
            )
            if response.status_code == 200:
                cancelled = bool(response.json().get("cancelled"))
                return f"Modal call {job.backend_call_id}: " + (
                    "cancelled" if cancelled else "already finished"
                )
            return f"Modal answered HTTP {response.status_code} to the cancel request"
        url = (job.fal_urls or {}).get("cancel_url")
        if not url:
            return "no fal cancel_url recorded: not cancelled there"
        key = _secret(stack, stack.fal_key_secret)
        if key.startswith("{"):
            key = str(json.loads(key).get("key", ""))
        response = http.put(url, headers={"Authorization": f"Key {key}"})
        return f"fal request {job.backend_call_id}: HTTP {response.status_code} {response.text[:80]}"
    except CliError as exc:
        return f"could not cancel at {job.backend}: {exc.message}"
    except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
        return f"could not cancel at {job.backend}: {type(exc).__name__}"


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
    write_status(stack.client("s3"), stack.bucket, updated)
    return CancelOutcome(updated, True, note)
