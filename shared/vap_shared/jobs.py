"""The job model and its state machine (docs/contracts.md: job record)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from .contract import BackendChoice, BackendName
from .errors import FieldError

State = Literal["received", "dispatched", "running", "succeeded", "failed", "cancelled"]
TERMINAL: frozenset[str] = frozenset({"succeeded", "failed", "cancelled"})

# Where each state may be entered from. Callbacks can overtake ingest's own "dispatched" write
# (the GPU may report progress before ingest records the dispatch), so `received` may jump ahead;
# `dispatched` is re-entered when a failed run falls back to the other backend.
ALLOWED_FROM: dict[str, tuple[str, ...]] = {
    "dispatched": ("received", "dispatched", "running"),
    "running": ("received", "dispatched", "running"),
    "succeeded": ("received", "dispatched", "running"),
    "failed": ("received", "dispatched", "running"),
    # `vap cancel`: the user stopped the job (the backend was asked to cancel; no notification).
    "cancelled": ("received", "dispatched", "running"),
}


def utcnow() -> datetime:
    return datetime.now(UTC)


def iso(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_iso(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


class Job(BaseModel):
    model_config = ConfigDict(extra="ignore")

    job_id: str
    state: State = "received"
    sidecar_bucket: str = ""
    sidecar_key: str = ""
    sidecar_etag: str = ""
    name: str = ""
    output_prefix: str = ""
    requested_backend: BackendChoice | None = None
    backend: BackendName | None = None
    backend_call_id: str | None = None
    fal_urls: dict[str, str] | None = None
    fallback_from: BackendName | None = None
    fallback_reason: str | None = None
    settings: dict[str, Any] | None = None
    inputs: dict[str, dict[str, Any]] | None = None
    # GpuJobRequest fields holding our presigned URLs (what a URL refresh renews).
    service_urls: list[str] | None = None
    webhook_base_url: str | None = None
    seed: int | None = None
    progress: dict[str, int] | None = None
    output_key: str | None = None
    metadata_key: str | None = None
    error_report_key: str | None = None
    errors: list[FieldError] | None = None
    notified_at: str | None = None
    # When the terminal status.json was written (a finished job is settled once this and
    # notified_at are set; the sweeper repairs jobs without it).
    status_written_at: str | None = None
    received_at: str | None = None
    dispatched_at: str | None = None
    completed_at: str | None = None
    updated_at: str | None = None
    expires_at: int | None = None
    dispatch_lease_until: int | None = None
    # The backend ingest is about to submit to, written before the submit: a redelivery after a
    # kill between the submit and the `dispatched` write finds the call instead of submitting again.
    dispatch_intent: BackendName | None = None
    dispatch_intent_at: str | None = None
    # The newest attempt of the GPU call heard from (Modal re-runs a preempted input; callbacks of
    # older attempts are superseded).
    gpu_attempt: int | None = None
    # GPUs of one container the job asked for (sidecar `gpus` or the stack default), and the GPU
    # type it ran on (from the result's device name), for the cost estimate.
    gpus: int | None = None
    gpu_type: str | None = None
    # Result reuse (vap_shared.reuse): the job's content key (None: not reusable), and the earlier
    # job whose result was copied instead of running.
    reuse_key: str | None = None
    reused_from: str | None = None
    # The stored result: its size, previews next to it, and the estimated cost (vap_shared.cost).
    bytes: int | None = None
    poster_key: str | None = None
    preview_key: str | None = None
    # When a finished run's result was last queued for storing (the store function then ends the job).
    result_queued_at: str | None = None
    # Copies of the inputs next to the result (media field -> key; `results.INPUT_COPIES`).
    input_copies: dict[str, str] | None = None
    cost: dict[str, Any] | None = None

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL

    def timings(self) -> dict[str, Any]:
        received = parse_iso(self.received_at)
        dispatched = parse_iso(self.dispatched_at)
        completed = parse_iso(self.completed_at)

        def span(a: datetime | None, b: datetime | None) -> float | None:
            return round((b - a).total_seconds(), 3) if a and b else None

        return {
            "received_at": self.received_at,
            "dispatched_at": self.dispatched_at,
            "completed_at": self.completed_at,
            "queue_s": span(received, dispatched),
            "generation_s": span(dispatched, completed),
            "total_s": span(received, completed),
        }


def can_transition(current: str, target: str) -> bool:
    return current in ALLOWED_FROM.get(target, ())
