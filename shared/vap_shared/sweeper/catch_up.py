"""Notification catch-up: finished jobs whose notification (or report) a crash skipped."""

from __future__ import annotations

from datetime import datetime, timedelta

from ..jobs import iso
from ..lifecycle import finalize_terminal
from ..runtime import Runtime

# Terminal jobs are re-checked for a missing notification for this long after their dispatch.
NOTIFY_WINDOW = timedelta(days=1)


class NotificationCatchUp:
    def __init__(self, rt: Runtime) -> None:
        self.rt = rt

    def candidates(self, now: datetime, limit: int) -> list[str]:
        """Succeeded/failed jobs dispatched within the window and never notified."""
        ids: list[str] = []
        for state in ("succeeded", "failed"):
            ids += self.rt.store.overdue(
                state, iso(now), limit, dispatched_after_iso=iso(now - NOTIFY_WINDOW), unnotified_only=True
            )
        return ids

    def settle(self, job_id: str) -> str:
        """ "notified" (error.json, status.json and the one notification), "done" (someone else
        notified it meanwhile) or "gone"."""
        job = self.rt.store.get(job_id)
        if job is None:
            return "gone"
        if not job.terminal or job.notified_at:
            return "done"
        finalize_terminal(self.rt, job)
        return "notified"
