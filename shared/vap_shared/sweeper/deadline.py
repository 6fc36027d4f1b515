"""Deadline sweep: dispatched/running jobs whose result never arrived, settled with their backend.

For a job past the ask point it asks the backend what happened:

- finished with a result → the result is stored and notified exactly as the webhook would have
  (same keys, same conditional transition, notify-once);
- failed → the other backend once (`auto` sidecars) or a failure notification with the reason;
- unknown to the backend, or refusing us → fall back once or fail clearly; cannot be asked for now
  (timeout, 5xx) → asked again next run, and treated as lost only from the stop point;
- still queued/running: left alone until the stop point (the callback is not lost, the run is just
  long), then cancelled and fallen back once or failed. A fal request that is already running is
  not dropped at the stop point: fal's cancel removes only queued requests, a running one is
  billed and its webhook will come, so it is left for a later run, up to the abandon point
  (ABANDON_AFTER_STOPS x the stop point), where a request still "running" is taken as stuck.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Literal

from aws_lambda_powertools import Logger

from .. import metrics
from ..backends.base import BackendError
from ..backends.fal import FalResult, FalStatus
from ..errors import field_error
from ..fal_delivery import FalDelivery
from ..jobs import Job, iso, parse_iso
from ..lifecycle import fall_back_or_fail
from ..result_store import Intake, accept_fal_result, accept_gpu_result, gpu_failed
from ..runtime import Runtime
from .catch_up import settle_terminal
from .report import outcome_of

logger = Logger(child=True)

DeadlineAction = Literal["wait", "ask", "stop"]
# A fal request still running this many times the stop point after its dispatch is stuck: its job
# fails (and frees its place at fal) rather than waiting for a webhook that will not come.
ABANDON_AFTER_STOPS = 3


def deadline_action(
    age_s: float, ask_after_s: float, stop_after_s: float, quiet_s: float | None = None
) -> DeadlineAction:
    """When to ask a backend about a job and when to stop it, from the numbers alone.

    `age_s`: how long ago the job was dispatched; `quiet_s`: how long since anything was heard of
    it (a progress callback); None = nothing since the dispatch. "wait": too early to ask, or the
    job is reporting progress; "ask": ask the backend, and leave a run it reports as still
    queued/running; "stop": ask, and stop such a run. Fed from the job budget:
    `Budget.silence_s` / `Budget.stop_after_s` (the stop point is past the GPU side's own deadline).
    """
    if age_s >= stop_after_s:
        return "stop"
    quiet = age_s if quiet_s is None else min(age_s, quiet_s)
    if quiet >= ask_after_s:
        return "ask"
    return "wait"


class DeadlineSweep:
    def __init__(self, rt: Runtime, ask_after_s: int | None = None, stop_after_s: int | None = None) -> None:
        self.rt = rt
        budget = rt.settings.budget
        self.ask_after_s = budget.silence_s if ask_after_s is None else ask_after_s
        self.stop_after_s = budget.stop_after_s if stop_after_s is None else stop_after_s

    def candidates(self, now: datetime, limit: int) -> list[str]:
        """Dispatched/running jobs dispatched longer than `ask_after_s` ago, oldest first per state."""
        cutoff = iso(now - timedelta(seconds=self.ask_after_s))
        ids: list[str] = []
        for state in ("dispatched", "running"):
            ids += self.rt.store.overdue(state, cutoff, limit)
        return ids

    def settle(self, job_id: str, now: datetime) -> str:
        """Settle one job; returns what was done (the report's outcome)."""
        job = self.rt.store.get(job_id)
        if job is None:
            return "gone"
        if job.terminal:
            return settle_terminal(self.rt, job)
        dispatched = parse_iso(job.dispatched_at)
        if dispatched is None:
            return "not-due"
        heard = parse_iso(job.updated_at)
        quiet_s = (now - heard).total_seconds() if heard is not None else None
        action = deadline_action(
            (now - dispatched).total_seconds(), self.ask_after_s, self.stop_after_s, quiet_s
        )
        if action == "wait":
            return "not-due"  # moved on since the query (e.g. a fallback re-dispatched it)
        stop = action == "stop"
        if job.backend == "modal" and job.backend_call_id:
            return self._modal(job, job.backend_call_id, stop)
        if job.backend == "fal" and job.backend_call_id:
            abandon = (now - dispatched).total_seconds() >= ABANDON_AFTER_STOPS * self.stop_after_s
            return self._fal(job, job.backend_call_id, stop, abandon)
        return self._give_up(job, "no backend call was recorded for the job", "the dispatch was lost")

    # ------------------------------------------------------------------ Modal / GPU API
    def _modal(self, job: Job, call_id: str, stop: bool) -> str:
        try:
            status = self.rt.modal.status(call_id)
        except BackendError as exc:
            if self._ask_again(job, exc, stop):
                return "unreachable"
            return self._give_up(job, f"Modal could not be asked about the job: {exc.reason}", exc.reason)
        if status is None:
            return self._give_up(job, "Modal has no record of the job's call", "call unknown to Modal")
        if status.state == "succeeded":
            # Stored by the store function, as the webhook would have had it stored.
            intake = accept_gpu_result(self.rt, job, call_id, None, status.result)
            if intake.outcome == "queued":
                logger.info("recovered a result whose callback never arrived", extra={"job_id": job.job_id})
            return self._recovered(intake)
        if status.state in ("failed", "cancelled"):
            return self._recovered(gpu_failed(self.rt, job, status.error))
        if not stop:
            return "running"
        try:
            self.rt.modal.cancel(call_id)
        except BackendError as exc:
            logger.warning("could not cancel the Modal call", extra={"call_id": call_id, "error": exc.reason})
        return self._give_up(
            job, self._overdue_message("Modal"), f"timeout: still {status.state}", kind="timeout"
        )

    # ------------------------------------------------------------------ fal queue API
    def _fal(self, job: Job, request_id: str, stop: bool, abandon: bool = False) -> str:
        fal = self.rt.fal
        try:
            status = fal.status(request_id, job.fal_urls)
            if status is None:
                return self._give_up(job, "fal.ai has no record of the request", "request unknown to fal")
            if status.status != "COMPLETED":
                if not stop:
                    return "running"
                return self._stop_fal(job, request_id, status.status, abandon)
            result = fal.result(request_id, job.fal_urls)
        except BackendError as exc:
            if self._ask_again(job, exc, stop):
                return "unreachable"
            return self._give_up(job, f"fal.ai could not be asked about the job: {exc.reason}", exc.reason)
        intake = accept_fal_result(self.rt, job, request_id, delivery_of(request_id, status, result))
        if intake.outcome == "queued":
            logger.info("recovered a fal result whose webhook never arrived", extra={"job_id": job.job_id})
        return self._recovered(intake)

    def _stop_fal(self, job: Job, request_id: str, fal_status: str, abandon: bool) -> str:
        """Past the stop point. fal's cancel removes only a queued request: one already running
        finishes and is billed, and its webhook will come, so the job is left for a later run
        rather than failed or sent to the other backend, until the abandon point."""
        if abandon:
            logger.warning("fal request still unfinished at the abandon point", extra={"job_id": job.job_id})
            return self._give_up(
                job,
                f"Generation on fal.ai was still {fal_status} {ABANDON_AFTER_STOPS * self.stop_after_s} s "
                "after it was sent (its result never arrived); the job was stopped.",
                f"timeout: still {fal_status} at the abandon point",
                kind="timeout",
            )
        if fal_status == "IN_PROGRESS":
            logger.info("overdue fal request is running; waiting for it", extra={"job_id": job.job_id})
            return "running"
        try:
            answer = self.rt.fal.cancel(request_id, job.fal_urls)
        except BackendError as exc:
            logger.warning("could not cancel the fal request", extra={"error": exc.reason})
            answer = None
        if answer == "ALREADY_COMPLETED":  # it started (or finished) since the status request
            logger.info("overdue fal request started before it was cancelled", extra={"job_id": job.job_id})
            return "running"
        return self._give_up(
            job, self._overdue_message("fal.ai"), f"timeout: still {fal_status}", kind="timeout"
        )

    @staticmethod
    def _recovered(intake: Intake) -> str:
        """The report's outcome of a finished run handed to the store path."""
        if intake.outcome == "retry":
            return "pending"  # the upload is not readable yet; the next run tries again
        if intake.outcome == "queued":
            return "recovered"
        return "fell-back" if intake.state == "dispatched" else intake.state

    @staticmethod
    def _ask_again(job: Job, exc: BackendError, stop: bool) -> bool:
        """A status request that failed transiently before the stop point is asked again next
        run: giving up on a job that may be running fine would pay for it twice (fallback) or
        fail it for a blip of the backend's API."""
        if stop or not exc.retryable:
            return False
        logger.warning(
            "backend could not be asked about an overdue job; asking again next run",
            extra={"job_id": job.job_id, "backend": exc.backend, "error": exc.reason},
        )
        return True

    # ------------------------------------------------------------------ endings
    def _overdue_message(self, backend: str) -> str:
        return (
            f"Generation on {backend} did not finish within {self.stop_after_s} s "
            "(its result never arrived); the job was stopped."
        )

    def _give_up(self, job: Job, message: str, reason: str, kind: metrics.ErrorKind = "internal") -> str:
        """`kind` `timeout`: stopped past the budget; `internal`: lost, unknown or unreachable."""
        errors = [field_error(None, message if message.endswith(".") else message + ".")]
        return outcome_of(fall_back_or_fail(self.rt, job, errors, reason, kind=kind))


def delivery_of(request_id: str, status: FalStatus, result: FalResult) -> FalDelivery:
    """The delivery fal would have sent for a finished request, from its status and result."""
    if result.video_url:
        return FalDelivery(request_id=request_id, status="OK", payload=result.body)
    if result.body.get("detail") is not None:
        return FalDelivery(request_id=request_id, status="ERROR", payload={"detail": result.body["detail"]})
    if status.body.get("error"):
        return FalDelivery(request_id=request_id, status="ERROR", error=status.body["error"])
    if result.http_status == 200:
        return FalDelivery(request_id=request_id, status="OK", payload=result.body)  # OK without a video
    return FalDelivery(
        request_id=request_id, status="ERROR", error=f"the result request answered HTTP {result.http_status}"
    )
