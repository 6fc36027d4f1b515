"""Sweeper: jobs whose callback/webhook never came, found by deadline and settled with the backend.

Runs on a schedule (template.yaml, every 5 minutes). For every job dispatched/running for longer
than `JOB_DEADLINE_SECONDS` it asks the backend what happened:

- finished with a result → the result is stored and notified exactly as the webhook would have
  (same keys, same conditional transition, notify-once);
- failed → the other backend once (`auto` sidecars) or a failure notification with the backend's
  reason;
- unknown to the backend, or the backend cannot be asked → the job falls back once or fails with a
  clear reason;
- still queued/running: left alone until twice the deadline (the callback is not lost, the run is
  just long), then the call is cancelled (best effort) and the job falls back once or fails.

It also finishes terminal jobs whose notification a crash skipped (and every retry missed), and
drains the ingest dead-letter queue (`INGEST_DLQ_URL`): a sidecar whose ingest crashed on every
delivery (a bug, not bad input: bad input fails at once) ends failed with an internal-error
message, error.json and one notification, instead of sitting `received` with nobody told.
Every step reuses `lifecycle`, so a sweeper racing a late webhook still ends in one terminal
state and one notification.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import httpx
from aws_lambda_powertools import Logger
from pydantic import ValidationError

from .backends.base import SUBMIT_TIMEOUT
from .backends.dispatch import gpu_error_allows_fallback
from .errors import FieldError, field_error
from .gpu_contract import GpuCallback, StatusResponse
from .jobs import Job, iso, utcnow
from .lifecycle import fail_job, fall_back_or_fail, finalize_terminal
from .naming import job_id as make_job_id
from .runtime import Runtime
from .urls import UrlNotAllowed, check_service_url
from .webhook_logic import fal_failure_errors, store_fal_success, store_gpu_success

if TYPE_CHECKING:
    from .ingest_logic import S3ObjectEvent

logger = Logger(child=True)

# Terminal jobs are re-checked for a missing notification for this long after their dispatch.
NOTIFY_WINDOW = timedelta(days=1)
MAX_JOBS_PER_RUN = 200
# Stop picking up new jobs when the invocation has less than this left (ms).
MIN_TIME_LEFT_MS = 15_000
# Ingest dead letters handled per run (short receives of up to 10); the rest wait for the next run.
MAX_DEAD_LETTERS_PER_RUN = 50
# A dead letter received but left (job being dispatched elsewhere, or an error) stays hidden this
# long: past the end of this run (Timeout 240 s), back for the next one.
DEAD_LETTER_VISIBILITY_S = 300


class BackendUnreachable(Exception):
    """The backend could not be asked (network, 5xx, auth, bad answer)."""


@dataclass
class SweepReport:
    outcomes: dict[str, str] = field(default_factory=dict)  # job id -> what the sweeper did
    # Ingest dead letters: what happened to each message (counts), and how many were left.
    dead_letters: dict[str, int] = field(default_factory=dict)
    dead_letters_left: int | None = None

    def count(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for outcome in self.outcomes.values():
            counts[outcome] = counts.get(outcome, 0) + 1
        return counts


class Sweeper:
    def __init__(self, rt: Runtime, sqs: Any = None) -> None:
        self.rt = rt
        self.settings = rt.settings
        self._sqs = sqs

    @property
    def sqs(self) -> Any:
        """The SQS client, built on first use (only runs with a dead-letter queue need it)."""
        if self._sqs is None:
            import boto3

            self._sqs = boto3.client("sqs")
        return self._sqs

    # ------------------------------------------------------------------ entry point
    def sweep(
        self,
        now: datetime | None = None,
        time_left_ms: Callable[[], int] | None = None,
        limit: int = MAX_JOBS_PER_RUN,
    ) -> SweepReport:
        now = now or utcnow()
        cutoff = iso(now - timedelta(seconds=self.settings.job_deadline_seconds))
        hard_cutoff = iso(now - timedelta(seconds=2 * self.settings.job_deadline_seconds))
        report = SweepReport()
        if self.settings.ingest_dlq_url:
            try:
                self.drain_dead_letters(report, time_left_ms)
            except Exception:
                # The DLQ must not stop the deadline sweep (and vice versa); the next run retries.
                logger.exception("draining the ingest dead-letter queue failed")
        candidates: list[str] = []
        for state in ("dispatched", "running"):
            candidates += self.rt.store.overdue(state, cutoff, limit)
        for state in ("succeeded", "failed"):
            candidates += self.rt.store.overdue(
                state, iso(now), limit, dispatched_after_iso=iso(now - NOTIFY_WINDOW), unnotified_only=True
            )
        for job_id in candidates[:limit]:
            if time_left_ms is not None and time_left_ms() < MIN_TIME_LEFT_MS:
                logger.warning("out of time; the next run continues", extra={"left": len(candidates)})
                break
            try:
                report.outcomes[job_id] = self.sweep_job(job_id, cutoff, hard_cutoff)
            except Exception:
                # One bad job must not stop the others; it is picked up again next run.
                logger.exception("sweeping a job failed", extra={"job_id": job_id})
                report.outcomes[job_id] = "error"
        if report.outcomes or report.dead_letters:
            logger.info("sweep done", extra={"counts": report.count(), "dead_letters": report.dead_letters})
        return report

    # ------------------------------------------------------------------ ingest dead letters
    def drain_dead_letters(
        self,
        report: SweepReport,
        time_left_ms: Callable[[], int] | None = None,
        limit: int = MAX_DEAD_LETTERS_PER_RUN,
    ) -> None:
        """Up to `limit` messages of the ingest DLQ: each sidecar's job ends failed (once), then the
        message is deleted. Short receives: an empty answer ends the drain until the next run."""
        url = self.settings.ingest_dlq_url
        handled = 0
        while handled < limit:
            if time_left_ms is not None and time_left_ms() < MIN_TIME_LEFT_MS:
                break
            messages = self.sqs.receive_message(
                QueueUrl=url,
                MaxNumberOfMessages=min(10, limit - handled),
                WaitTimeSeconds=0,
                VisibilityTimeout=DEAD_LETTER_VISIBILITY_S,
            ).get("Messages", [])
            if not messages:
                break
            for message in messages:
                handled += 1
                try:
                    outcome = self.settle_dead_letter(str(message.get("Body", "")), report)
                except Exception:
                    logger.exception("settling an ingest dead letter failed; the next run retries")
                    outcome = "error"
                report.dead_letters[outcome] = report.dead_letters.get(outcome, 0) + 1
                if outcome not in ("error", "busy"):
                    self.sqs.delete_message(QueueUrl=url, ReceiptHandle=message["ReceiptHandle"])
        attributes = self.sqs.get_queue_attributes(
            QueueUrl=url, AttributeNames=["ApproximateNumberOfMessages"]
        ).get("Attributes", {})
        report.dead_letters_left = int(attributes.get("ApproximateNumberOfMessages", 0))
        if handled or report.dead_letters_left:
            logger.info(
                "ingest dead letters",
                extra={"outcomes": report.dead_letters, "left": report.dead_letters_left},
            )

    def settle_dead_letter(self, body: str, report: SweepReport) -> str:
        """One dead letter, parsed as ingest parses it: "failed" (its job ended failed now), "done"
        (already ended: finished, never notified twice), "dispatched" (the deadline sweep has it),
        "busy" (another invocation holds the job's dispatch lease: keep the message), "skipped"
        (a test event, not S3, or not a sidecar)."""
        from .ingest_logic import parse_sqs_body  # ingest's own parser; loaded only when needed

        outcomes = [self._settle_dead_event(event, report) for event in parse_sqs_body(body)]
        for outcome in ("busy", "failed", "dispatched", "done"):
            if outcome in outcomes:
                return outcome
        return "skipped"

    def _settle_dead_event(self, event: S3ObjectEvent, report: SweepReport) -> str:
        from .ingest_logic import DISPATCH_LEASE_SECONDS, Ingestor

        s = self.settings
        if event.bucket != s.bucket_name or not (
            event.key.startswith(s.inbox_prefix) and event.key.endswith(".json")
        ):
            return "skipped"
        jid = make_job_id(event.event_time, event.bucket, event.key, event.etag, event.sequencer)
        # The record as ingest creates it (ingest may have crashed before creating it).
        job = Ingestor(self.rt)._get_or_create(jid, event)
        if job.terminal:
            finalize_terminal(self.rt, job)  # report, status and the one notification, if missing
            report.outcomes[jid] = "dead-letter-done"
            return "done"
        if job.state != "received":
            # Dispatched before the crash: a backend has it, the deadline sweep settles it.
            report.outcomes[jid] = "dead-letter-dispatched"
            return "dispatched"
        # Taking the dispatch lease keeps a live duplicate delivery from dispatching a failed job.
        if not self.rt.store.acquire_dispatch_lease(jid, int(time.time()), DISPATCH_LEASE_SECONDS):
            report.outcomes[jid] = "dead-letter-busy"
            return "busy"
        attempts = s.ingest_max_receive_count
        message = (
            f"The service could not process this sidecar after {attempts} attempts "
            "(an internal error, not a problem with the request); it has been reported to the operators."
        )
        logger.error(
            "ingest gave up on a sidecar (dead letter); failing its job",
            extra={"job_id": jid, "key": event.key, "attempts": attempts},
        )
        fail_job(self.rt, jid, [field_error(None, message)])
        report.outcomes[jid] = "dead-letter-failed"
        return "failed"

    def sweep_job(self, job_id: str, cutoff_iso: str, hard_cutoff_iso: str | None = None) -> str:
        """Settle one job dispatched before `cutoff_iso`; one still running at its backend is only
        stopped when dispatched before `hard_cutoff_iso` (None: at once)."""
        job = self.rt.store.get(job_id)
        if job is None:
            return "gone"
        if job.terminal:
            if job.notified_at:
                return "done"
            finalize_terminal(self.rt, job)
            return "notified"
        if not job.dispatched_at or job.dispatched_at >= cutoff_iso:
            return "not-due"  # moved on since the query (e.g. a fallback re-dispatched it)
        stop = hard_cutoff_iso is None or job.dispatched_at < hard_cutoff_iso
        if job.backend == "modal" and job.backend_call_id:
            return self._modal(job, job.backend_call_id, stop)
        if job.backend == "fal" and job.backend_call_id:
            return self._fal(job, job.backend_call_id, stop)
        return self._give_up(job, "no backend call was recorded for the job", "the dispatch was lost")

    # ------------------------------------------------------------------ Modal / GPU API
    def _modal_headers(self) -> dict[str, str]:
        try:
            key, secret = self.rt.secrets.modal_token(self.settings.modal_token_secret_arn)
        except Exception as exc:
            raise BackendUnreachable(f"credentials unavailable ({type(exc).__name__})") from None
        return {"Modal-Key": key, "Modal-Secret": secret}

    def modal_status(self, call_id: str) -> StatusResponse | None:
        """The GPU API's status of a call; None when it does not know the call (404)."""
        endpoint = self.settings.modal_endpoint_url
        if not endpoint:
            raise BackendUnreachable("no MODAL_ENDPOINT_URL is configured")
        try:
            check_service_url(endpoint, self.settings.allow_http_loopback)
        except UrlNotAllowed as exc:
            raise BackendUnreachable(str(exc)) from None
        try:
            response = self.rt.http.get(
                f"{endpoint}/status/{call_id}", headers=self._modal_headers(), timeout=SUBMIT_TIMEOUT
            )
        except httpx.HTTPError as exc:
            raise BackendUnreachable(f"connection failed ({type(exc).__name__})") from None
        if response.status_code == 404:
            return None
        if response.status_code != 200:
            raise BackendUnreachable(f"status request answered HTTP {response.status_code}")
        try:
            return StatusResponse.model_validate_json(response.content)
        except ValidationError:
            raise BackendUnreachable("status answer is not a GPU status") from None

    def _modal_cancel(self, call_id: str) -> None:
        try:
            self.rt.http.post(
                f"{self.settings.modal_endpoint_url}/cancel/{call_id}",
                headers=self._modal_headers(),
                timeout=SUBMIT_TIMEOUT,
            )
        except (httpx.HTTPError, BackendUnreachable) as exc:
            logger.warning("could not cancel the Modal call", extra={"call_id": call_id, "error": str(exc)})

    def _modal(self, job: Job, call_id: str, stop: bool) -> str:
        try:
            status = self.modal_status(call_id)
        except BackendUnreachable as exc:
            return self._give_up(job, f"Modal could not be asked about the job: {exc}", str(exc))
        if status is None:
            return self._give_up(job, "Modal has no record of the job's call", "call unknown to Modal")
        if status.state == "succeeded":
            callback = GpuCallback(
                job_id=job.job_id,
                call_id=call_id,
                event="succeeded",
                sent_at=int(time.time()),
                result=status.result,
            )
            reply = store_gpu_success(self.rt, job, callback)
            if reply.status >= 500:
                return "pending"  # the upload is not readable yet; the next run tries again
            logger.info("recovered a result whose callback never arrived", extra={"job_id": job.job_id})
            return "recovered"
        if status.state in ("failed", "cancelled"):
            error = status.error
            message = error.message if error else "the GPU reported a failure without details"
            errors: list[FieldError] = [field_error(None, f"Generation failed on Modal: {message}")]
            reason = f"{error.code}: {message}" if error else message
            updated = fall_back_or_fail(self.rt, job, errors, reason, allow=gpu_error_allows_fallback(error))
            return self._outcome(updated)
        if not stop:
            return "running"
        self._modal_cancel(call_id)
        return self._give_up(job, self._overdue_message("Modal"), f"timeout: still {status.state}")

    # ------------------------------------------------------------------ fal queue API
    def _fal_url(self, job: Job, request_id: str, kind: str) -> str:
        s = self.settings
        base = f"{s.fal_queue_url}/{s.fal_endpoint_id}/requests/{request_id}"
        default = {"status_url": f"{base}/status", "response_url": base, "cancel_url": f"{base}/cancel"}[kind]
        url = (job.fal_urls or {}).get(kind) or default
        # The fal key is only ever sent to the configured queue host.
        if not url.startswith(s.fal_queue_url + "/"):
            raise BackendUnreachable(f"the recorded {kind} is not on the configured fal queue host")
        try:
            check_service_url(url, s.allow_http_loopback)
        except UrlNotAllowed as exc:
            raise BackendUnreachable(str(exc)) from None
        return url

    def _fal_request(self, method: str, url: str) -> httpx.Response:
        try:
            key = self.rt.secrets.fal_key(self.settings.fal_key_secret_arn)
        except Exception as exc:
            raise BackendUnreachable(f"credentials unavailable ({type(exc).__name__})") from None
        try:
            return self.rt.http.request(
                method, url, headers={"Authorization": f"Key {key}"}, timeout=SUBMIT_TIMEOUT
            )
        except httpx.HTTPError as exc:
            raise BackendUnreachable(f"connection failed ({type(exc).__name__})") from None

    def _fal(self, job: Job, request_id: str, stop: bool) -> str:
        try:
            response = self._fal_request("GET", self._fal_url(job, request_id, "status_url"))
            if response.status_code == 404:
                return self._give_up(job, "fal.ai has no record of the request", "request unknown to fal")
            if response.status_code not in (200, 202):
                raise BackendUnreachable(f"status request answered HTTP {response.status_code}")
            status_body = _json_object(response)
            fal_status = str(status_body.get("status", ""))
            if fal_status != "COMPLETED":
                if not stop:
                    return "running"
                try:
                    self._fal_request("PUT", self._fal_url(job, request_id, "cancel_url"))
                except BackendUnreachable as exc:
                    logger.warning("could not cancel the fal request", extra={"error": str(exc)})
                return self._give_up(job, self._overdue_message("fal.ai"), f"timeout: still {fal_status}")
            result = self._fal_request("GET", self._fal_url(job, request_id, "response_url"))
        except BackendUnreachable as exc:
            return self._give_up(job, f"fal.ai could not be asked about the job: {exc}", str(exc))
        body = _json_object(result)
        video = body.get("video")
        url = video.get("url") if isinstance(video, dict) else None
        if result.status_code == 200 and isinstance(url, str) and url:
            reply = store_fal_success(self.rt, job, request_id, body, url)
            if reply.status >= 500:
                return "pending"  # fal's CDN failed transiently; the next run tries again
            logger.info("recovered a fal result whose webhook never arrived", extra={"job_id": job.job_id})
            return "recovered" if reply.body.get("state") != "failed" else "failed"
        delivery: dict[str, Any] = {"status": "ERROR"}
        if body.get("detail") is not None:
            delivery["payload"] = {"detail": body["detail"]}
        elif status_body.get("error"):
            delivery["error"] = status_body["error"]
        elif result.status_code == 200:
            delivery["status"] = "OK"
        else:
            delivery["error"] = f"the result request answered HTTP {result.status_code}"
        errors = fal_failure_errors(delivery)
        updated = fall_back_or_fail(self.rt, job, errors, "; ".join(e["message"] for e in errors))
        return self._outcome(updated)

    # ------------------------------------------------------------------ endings
    def _overdue_message(self, backend: str) -> str:
        return (
            f"Generation on {backend} did not finish within {2 * self.settings.job_deadline_seconds} s "
            "(its result never arrived); the job was stopped."
        )

    def _give_up(self, job: Job, message: str, reason: str) -> str:
        errors = [field_error(None, message if message.endswith(".") else message + ".")]
        updated = fall_back_or_fail(self.rt, job, errors, reason)
        return self._outcome(updated)

    @staticmethod
    def _outcome(updated: Job | None) -> str:
        if updated is None:
            return "gone"
        if updated.state == "dispatched":
            return "fell-back"
        return updated.state


def _json_object(response: httpx.Response) -> dict[str, Any]:
    try:
        data = response.json()
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}
