"""Dead-letter drain: sidecars whose ingest crashed on every delivery end failed, once.

A sidecar lands in the ingest dead-letter queue (`INGEST_DLQ_URL`) only when ingest crashed on
every delivery: a bug, not bad input (bad input fails at once). Its job ends failed with an
internal-error message, error.json and one notification, instead of sitting `received` with nobody
told.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from aws_lambda_powertools import Logger

from ..errors import field_error
from ..lifecycle import fail_job, finalize_terminal
from ..naming import job_id as make_job_id
from ..runtime import Runtime
from .report import SweepReport, TimeLeft, out_of_time

if TYPE_CHECKING:
    from ..ingest_logic import S3ObjectEvent

logger = Logger(child=True)

# Ingest dead letters handled per run (short receives of up to 10); the rest wait for the next run.
MAX_DEAD_LETTERS_PER_RUN = 50
# A dead letter received but left (job being dispatched elsewhere, or an error) stays hidden this
# long: past the end of this run (Timeout 240 s), back for the next one.
DEAD_LETTER_VISIBILITY_S = 300


class DeadLetterDrain:
    def __init__(self, rt: Runtime, sqs: Any, queue_url: str) -> None:
        self.rt = rt
        self.sqs = sqs
        self.queue_url = queue_url

    def drain(
        self, report: SweepReport, time_left_ms: TimeLeft = None, limit: int = MAX_DEAD_LETTERS_PER_RUN
    ) -> None:
        """Up to `limit` messages: each sidecar's job ends failed (once), then the message is
        deleted. Short receives: an empty answer ends the drain until the next run."""
        handled = 0
        while handled < limit and not out_of_time(time_left_ms):
            messages = self.sqs.receive_message(
                QueueUrl=self.queue_url,
                MaxNumberOfMessages=min(10, limit - handled),
                WaitTimeSeconds=0,
                VisibilityTimeout=DEAD_LETTER_VISIBILITY_S,
            ).get("Messages", [])
            if not messages:
                break
            for message in messages:
                if out_of_time(time_left_ms):
                    break  # left hidden; it comes back for the next run
                handled += 1
                try:
                    outcome = self.settle(str(message.get("Body", "")), report)
                except Exception:
                    logger.exception("settling an ingest dead letter failed; the next run retries")
                    outcome = "error"
                report.dead_letters[outcome] = report.dead_letters.get(outcome, 0) + 1
                if outcome not in ("error", "busy"):
                    self.sqs.delete_message(QueueUrl=self.queue_url, ReceiptHandle=message["ReceiptHandle"])
        attributes = self.sqs.get_queue_attributes(
            QueueUrl=self.queue_url, AttributeNames=["ApproximateNumberOfMessages"]
        ).get("Attributes", {})
        report.dead_letters_left = int(attributes.get("ApproximateNumberOfMessages", 0))
        if handled or report.dead_letters_left:
            logger.info(
                "ingest dead letters",
                extra={"outcomes": report.dead_letters, "left": report.dead_letters_left},
            )

    def settle(self, body: str, report: SweepReport) -> str:
        """One dead letter, parsed as ingest parses it: "failed" (its job ended failed now), "done"
        (already ended: finished, never notified twice), "dispatched" (the deadline sweep has it),
        "busy" (another invocation holds the job's dispatch lease: keep the message), "skipped"
        (a test event, not S3, or not a sidecar)."""
        from ..ingest_logic import parse_sqs_body  # ingest's own parser; loaded only when needed

        outcomes = [self.settle_event(event, report) for event in parse_sqs_body(body)]
        for outcome in ("busy", "failed", "dispatched", "done"):
            if outcome in outcomes:
                return outcome
        return "skipped"

    def settle_event(self, event: S3ObjectEvent, report: SweepReport) -> str:
        from ..ingest_logic import DISPATCH_LEASE_SECONDS, Ingestor

        s = self.rt.settings
        if event.bucket != s.bucket_name or not (
            event.key.startswith(s.inbox_prefix) and event.key.endswith(".json")
        ):
            return "skipped"
        jid = make_job_id(event.event_time, event.bucket, event.key, event.etag, event.sequencer)
        # A job's outcome in the report is what its first dead letter of this run did: SQS delivers
        # at least once, and a second copy only finds the job that the first one ended.
        # The record as ingest creates it (ingest may have crashed before creating it).
        job = Ingestor(self.rt).get_or_create(jid, event)
        if job.terminal:
            finalize_terminal(self.rt, job)  # report, status and the one notification, if missing
            report.outcomes.setdefault(jid, "dead-letter-done")
            return "done"
        if job.state != "received":
            # Dispatched before the crash: a backend has it, the deadline sweep settles it.
            report.outcomes.setdefault(jid, "dead-letter-dispatched")
            return "dispatched"
        # Taking the dispatch lease keeps a live duplicate delivery from dispatching a failed job.
        if not self.rt.store.acquire_dispatch_lease(jid, int(time.time()), DISPATCH_LEASE_SECONDS):
            report.outcomes.setdefault(jid, "dead-letter-busy")
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
        report.outcomes.setdefault(jid, "dead-letter-failed")
        return "failed"
