"""One sweeper run: the dead-letter drain, then the deadline sweep and the notification catch-up."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from functools import partial
from typing import Any

from aws_lambda_powertools import Logger

from .. import metrics
from ..jobs import utcnow
from ..runtime import Runtime
from .catch_up import NotificationCatchUp
from .dead_letters import DeadLetterDrain
from .deadline import DeadlineSweep
from .report import MAX_JOBS_PER_RUN, OVERDUE_JOB_MS, SETTLE_JOB_MS, SweepReport, TimeLeft, out_of_time

logger = Logger(child=True)

# Deadline-sweep outcomes that settled a stuck job (its result or failure never arrived): a result
# recovered, a fallback, a failure (also after stopping an overdue run). The `StuckJobs` metric.
STUCK_OUTCOMES = frozenset({"recovered", "fell-back", "failed"})


def sweep(
    rt: Runtime,
    *,
    sqs: Any = None,
    now: datetime | None = None,
    time_left_ms: TimeLeft = None,
    limit: int = MAX_JOBS_PER_RUN,
    deadlines: DeadlineSweep | None = None,
) -> SweepReport:
    """`sqs`: the client for the ingest dead-letter queue (default: the runtime's, built only when
    `INGEST_DLQ_URL` is set). `deadlines`: the deadline sweep to use (default: from the settings)."""
    now = now or utcnow()
    report = SweepReport()
    if rt.settings.ingest_dlq_url:
        try:
            DeadLetterDrain(rt, sqs if sqs is not None else rt.sqs, rt.settings.ingest_dlq_url).drain(
                report, time_left_ms
            )
        except Exception:
            # The DLQ must not stop the deadline sweep (and vice versa); the next run retries.
            logger.exception("draining the ingest dead-letter queue failed")
    deadline = deadlines or DeadlineSweep(rt)
    catch_up = NotificationCatchUp(rt)
    work: list[tuple[str, bool, Callable[[], str]]] = [
        (job_id, True, partial(deadline.settle, job_id, now)) for job_id in deadline.candidates(now, limit)
    ]
    work += [(job_id, False, partial(catch_up.settle, job_id)) for job_id in catch_up.candidates(now, limit)]
    stuck = 0
    for done, (job_id, overdue, settle) in enumerate(work[:limit]):
        # A job is started only when what is left of the invocation covers its worst case.
        if out_of_time(time_left_ms, OVERDUE_JOB_MS if overdue else SETTLE_JOB_MS):
            logger.warning("out of time; the next run continues", extra={"left": len(work) - done})
            break
        try:
            report.outcomes[job_id] = settle()
        except Exception:
            # One bad job must not stop the others; it is picked up again next run.
            logger.exception("sweeping a job failed", extra={"job_id": job_id})
            report.outcomes[job_id] = "error"
        stuck += overdue and report.outcomes[job_id] in STUCK_OUTCOMES
    report.stuck = stuck
    metrics.stuck_jobs(stuck)  # every run, 0 too: the alarm and dashboard see the sweeper running
    if report.outcomes or report.dead_letters:
        logger.info("sweep done", extra={"counts": report.count(), "dead_letters": report.dead_letters})
    return report
