"""`vap cost` and the COST column of `vap list`: the jobs' estimated costs, from the outputs folder.

Like the other read commands this needs no DynamoDB: a job's `cost` is in its `status.json` (or,
for jobs stored before status objects carried it, in its `metadata.json`). The job id starts with
the upload time, so `--since` selects jobs by their key without reading them.
"""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from vap_shared.cost import by_backend

from .config import StackInfo, discover
from .errors import EXIT_INVALID, CliError
from .jobs import JOB_ID, job_id_of, read_json, status_keys

_SPAN = re.compile(r"^(\d+)\s*([mhdw])$")
_UNITS = {"m": "minutes", "h": "hours", "d": "days", "w": "weeks"}
NOTE = "an estimate from the stack's configured prices (GPU seconds, fal per video, AWS per job), not a bill"


def parse_since(text: str, now: datetime | None = None) -> datetime:
    """`7d`, `24h`, `30m`, `2w`, or an ISO date/time (UTC when no zone is given)."""
    now = now or datetime.now(UTC)
    value = text.strip().lower()
    span = _SPAN.match(value)
    if span:
        return now - timedelta(**{_UNITS[span.group(2)]: int(span.group(1))})
    try:
        moment = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise CliError(
            f"--since {text!r}: give a span like 7d, 24h, 30m, 2w or a date like 2026-11-01.", EXIT_INVALID
        ) from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def job_time(job_id: str) -> datetime | None:
    if not JOB_ID.match(job_id):
        return None
    return datetime.strptime(job_id[:16], "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)


def cost_of(stack: StackInfo, status: dict[str, Any]) -> dict[str, Any] | None:
    """The job's `cost` object: from status.json, else from metadata.json (succeeded jobs)."""
    found = status.get("cost")
    if isinstance(found, dict):
        return found
    if status.get("state") == "succeeded" and status.get("metadata_key"):
        metadata = read_json(stack, str(status["metadata_key"])) or {}
        found = metadata.get("cost")
        if isinstance(found, dict):
            return found
    return None


def format_usd(cost: dict[str, Any] | None) -> str:
    total = (cost or {}).get("total")
    if not isinstance(total, int | float) or isinstance(total, bool):
        return "-"
    return f"~${total:.4f}"


@dataclass
class CostReport:
    since: datetime
    jobs: int = 0
    with_cost: int = 0
    by_backend: dict[str, float] = field(default_factory=dict)

    @property
    def total(self) -> float:
        return round(sum(self.by_backend.values()), 6)

    def as_json(self) -> dict[str, Any]:
        return {
            "since": self.since.isoformat(),
            "jobs": self.jobs,
            "jobs_with_cost": self.with_cost,
            "by_backend": self.by_backend,
            "total": self.total,
            "currency": "USD",
            "estimate": True,
            "note": NOTE,
        }


def cost_report(stack: StackInfo, since: datetime) -> CostReport:
    report = CostReport(since)
    costs = []
    for key in status_keys(stack, stack.outputs_prefix):
        moment = job_time(job_id_of(key))
        if moment is None or moment < since:
            continue
        status = read_json(stack, key)
        if status is None:
            continue
        report.jobs += 1
        found = cost_of(stack, status)
        if found is not None:
            report.with_cost += 1
            costs.append(found)
    report.by_backend = by_backend(costs)
    return report


def cost(args: argparse.Namespace) -> int:
    stack = discover(args.stack, args.profile, args.region, args.local_state)
    report = cost_report(stack, parse_since(args.since))
    if args.json:
        print(json.dumps(report.as_json(), indent=2, sort_keys=True))
        return 0
    print(
        f"jobs uploaded since {report.since:%Y-%m-%d %H:%M} UTC: {report.jobs} "
        f"({report.with_cost} with a recorded cost)"
    )
    order = ["modal", "fal", "aws"]
    rows = sorted(
        report.by_backend.items(), key=lambda kv: (order.index(kv[0]) if kv[0] in order else 9, kv[0])
    )
    width = max([len("BACKEND"), *(len(k) for k, _ in rows)])
    print(f"{'BACKEND'.ljust(width)}  USD")
    for backend, amount in rows:
        print(f"{backend.ljust(width)}  {amount:.4f}")
    print(f"{'total'.ljust(width)}  {report.total:.4f}")
    print(f"({NOTE})")
    return 0
