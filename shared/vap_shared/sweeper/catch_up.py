"""Notification catch-up: finished jobs whose notification or terminal status.json a crash (or an
S3/SNS outage nobody retried) left missing. They are the only jobs in the sparse `unsettled` index,
so a run reads just them, however many jobs have finished."""

from __future__ import annotations

from datetime import datetime

from ..jobs import Job
from ..lifecycle import finalize_terminal
from ..runtime import Runtime


def settle_terminal(rt: Runtime, job: Job) -> str:
    """Finish a terminal job: "done" (nothing was missing), "notified" (the notification went out
    now, with whatever else was missing) or "repaired" (only the report/status was missing)."""
    if job.notified_at and job.status_written_at:
        rt.store.settle(job.job_id)  # a crash between the last write and leaving the index
        return "done"
    notified_before = bool(job.notified_at)
    finalize_terminal(rt, job)
    return "repaired" if notified_before else "notified"


class NotificationCatchUp:
    def __init__(self, rt: Runtime) -> None:
        self.rt = rt

    def candidates(self, now: datetime, limit: int) -> list[str]:
        """Finished jobs still missing their notification or terminal status (sparse index)."""
        return self.rt.store.unsettled_terminal(limit)

    def settle(self, job_id: str) -> str:
        """`settle_terminal`'s outcome, or "gone"; a job not terminal (yet) is left to the others."""
        job = self.rt.store.get(job_id)
        if job is None:
            return "gone"
        if not job.terminal:
            return "done"
        return settle_terminal(self.rt, job)
