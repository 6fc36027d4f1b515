"""What one sweeper run did, and the limits every part of a run shares."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from ..backends.modal import SUBMIT_ATTEMPTS
from ..http_limits import SUBMIT_TIMEOUT
from ..jobs import Job

MAX_JOBS_PER_RUN = 200

# What one backend request may take at worst (s): connecting, waiting for a pooled connection and
# the read limit (every backend client uses SUBMIT_TIMEOUT).
REQUEST_S = SUBMIT_TIMEOUT.connect + SUBMIT_TIMEOUT.pool + SUBMIT_TIMEOUT.read
# The AWS calls that record and announce one job's outcome (job record, S3 objects, SNS, SQS).
AWS_WORK_S = 15.0
# A piece of a run starts only while the invocation has at least its worst case left (ms):
# - an overdue job: its backend asked (status, result, cancel: one request each), then a fallback
#   dispatch to the other backend (a Modal submit is sent at most SUBMIT_ATTEMPTS times); a result
#   is only queued for the store function, never downloaded here;
# - a finished job missing its notification or status, and an ingest dead letter: AWS calls only.
OVERDUE_JOB_MS = int((3 * REQUEST_S + SUBMIT_ATTEMPTS * REQUEST_S + AWS_WORK_S) * 1000)
SETTLE_JOB_MS = int(AWS_WORK_S * 1000)

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


def out_of_time(time_left_ms: TimeLeft, need_ms: int = SETTLE_JOB_MS) -> bool:
    """Whether less than `need_ms` (a piece of work's worst case) is left of the invocation."""
    return time_left_ms is not None and time_left_ms() < need_ms


def outcome_of(updated: Job | None) -> str:
    """A job's state after the sweeper acted, as the report names it."""
    if updated is None:
        return "gone"
    if updated.state == "dispatched":
        return "fell-back"
    return updated.state
