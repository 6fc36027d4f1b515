"""What one sweeper run did, and the limits every part of a run shares."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from ..jobs import Job

MAX_JOBS_PER_RUN = 200
# Stop picking up new work when the invocation has less than this left (ms).
MIN_TIME_LEFT_MS = 15_000

TimeLeft = Callable[[], int] | None


@dataclass
class SweepReport:
    outcomes: dict[str, str] = field(default_factory=dict)  # job id -> what the sweeper did
    # Ingest dead letters: what happened to each message (counts), and how many were left.
    dead_letters: dict[str, int] = field(default_factory=dict)
    dead_letters_left: int | None = None
    # Overdue jobs this run settled (recovered, fell back, failed): the StuckJobs metric.
    stuck: int = 0

    def count(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for outcome in self.outcomes.values():
            counts[outcome] = counts.get(outcome, 0) + 1
        return counts


def out_of_time(time_left_ms: TimeLeft) -> bool:
    return time_left_ms is not None and time_left_ms() < MIN_TIME_LEFT_MS


def outcome_of(updated: Job | None) -> str:
    """A job's state after the sweeper acted, as the report names it."""
    if updated is None:
        return "gone"
    if updated.state == "dispatched":
        return "fell-back"
    return updated.state
