"""Job metrics as CloudWatch embedded metric format (EMF) lines, through Powertools Metrics.

One namespace per stack (`POWERTOOLS_METRICS_NAMESPACE`, set in template.yaml). Every metric is
emitted with several dimension sets at once: the empty set (the all-jobs total that alarms watch,
no metric math over dimension values needed) plus the breakdowns the dashboard draws. `SPECS` is the
single list of names, units and dimension sets: the emitters below check against it, and the
template tests check that every alarm and dashboard widget names a metric and dimension set from it.

Emitting never raises (a metric must not fail a job) and costs one `print` per call. Powertools is
imported on first use, not at import time, so importing this module adds nothing to a cold start.
A job's lines also carry its `job_id` as a plain property (not a dimension: no cost, no
cardinality), so Logs Insights finds the lines of one job.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, Literal

from .contract import BACKEND_NAMES, BackendName

if TYPE_CHECKING:
    from aws_lambda_powertools.metrics import EphemeralMetrics

log = logging.getLogger(__name__)

NAMESPACE_ENV: Final = "POWERTOOLS_METRICS_NAMESPACE"
# Where the environment names none (tests, a handler run by hand): still valid EMF.
DEFAULT_NAMESPACE: Final = "VAP"

# Metric names (the dashboard and alarms in template.yaml use these strings).
JOBS_RECEIVED: Final = "JobsReceived"
JOBS_DISPATCHED: Final = "JobsDispatched"
JOBS_SUCCEEDED: Final = "JobsSucceeded"
JOBS_FAILED: Final = "JobsFailed"
FALLBACKS: Final = "Fallbacks"
RESULTS_REUSED: Final = "ResultsReused"
QUEUE_SECONDS: Final = "QueueToDispatchSeconds"
GENERATION_SECONDS: Final = "GenerationSeconds"
JOB_COST_USD: Final = "JobCostUSD"
STUCK_JOBS: Final = "StuckJobs"
INGEST_RECORD_CRASHES: Final = "IngestRecordCrashes"

# Dimension names and their values.
BACKEND: Final = "backend"
ERROR_KIND: Final = "error_kind"
Backend = Literal[BackendName, "reused", "none"]
ErrorKind = Literal["input", "safety", "internal", "timeout"]
BACKENDS: Final[tuple[str, ...]] = (*BACKEND_NAMES, "reused", "none")
ERROR_KINDS: Final[tuple[str, ...]] = ("input", "safety", "internal", "timeout")

Unit = Literal["Count", "Seconds", "None"]
_TOTAL: tuple[str, ...] = ()


@dataclass(frozen=True)
class MetricSpec:
    name: str
    unit: Unit
    dimension_sets: tuple[tuple[str, ...], ...]
    description: str


_SPEC_LIST = (
    MetricSpec(JOBS_RECEIVED, "Count", (_TOTAL,), "sidecars that became a job"),
    MetricSpec(JOBS_DISPATCHED, "Count", (_TOTAL, (BACKEND,)), "dispatches to a backend (a fallback counts)"),
    MetricSpec(JOBS_SUCCEEDED, "Count", (_TOTAL, (BACKEND,)), "jobs stored and notified as succeeded"),
    MetricSpec(
        JOBS_FAILED,
        "Count",
        (_TOTAL, (BACKEND,), (ERROR_KIND,)),
        "jobs that ended failed; backend `none` = failed before reaching one",
    ),
    MetricSpec(FALLBACKS, "Count", (_TOTAL, (BACKEND,)), "re-dispatches to fal; backend = the failed one"),
    MetricSpec(RESULTS_REUSED, "Count", (_TOTAL,), "jobs answered with an earlier job's result"),
    MetricSpec(QUEUE_SECONDS, "Seconds", (_TOTAL, (BACKEND,)), "sidecar event to first dispatch"),
    MetricSpec(GENERATION_SECONDS, "Seconds", (_TOTAL, (BACKEND,)), "dispatch to stored result"),
    MetricSpec(JOB_COST_USD, "None", (_TOTAL, (BACKEND,)), "estimated cost of a finished job, USD"),
    MetricSpec(STUCK_JOBS, "Count", (_TOTAL,), "jobs a sweep had to settle (result or failure never came)"),
    MetricSpec(
        INGEST_RECORD_CRASHES,
        "Count",
        (_TOTAL,),
        "ingest records that raised unexpectedly (a bug or an AWS error; SQS retries them)",
    ),
)
SPECS: Final[dict[str, MetricSpec]] = {s.name: s for s in _SPEC_LIST}
METRIC_NAMES: Final[tuple[str, ...]] = tuple(SPECS)


# Where EMF lines go. None: stdout, which Lambda sends to the function's log group (CloudWatch
# extracts the metrics there). The local stack collects them instead, like a log group, so they
# never mix with what a test reads from the process's stdout.
_output: Callable[[str], None] | None = None


def set_output(write: Callable[[str], None] | None) -> None:
    global _output
    _output = write


def _write(line: str) -> None:
    if _output is not None:
        _output(line)
    else:
        print(line, flush=True)


def namespace() -> str:
    return os.environ.get(NAMESPACE_ENV, "").strip() or DEFAULT_NAMESPACE


def _backend(value: str | None) -> str:
    return value if value in BACKENDS else "none"


def error_kind_of_gpu_code(code: str | None) -> ErrorKind:
    """The dimension value for a GPU error code (`cancelled` jobs are not failures; never passed)."""
    if code == "input":
        return "input"
    if code == "safety":
        return "safety"
    if code == "timeout":
        return "timeout"
    return "internal"


def _new(ns: str | None) -> EphemeralMetrics:
    from aws_lambda_powertools.metrics import EphemeralMetrics

    # service="" keeps Powertools from adding a `service` dimension: the three functions emit the same
    # job metrics (the sweeper settles what the webhook would have), so they must aggregate together.
    return EphemeralMetrics(namespace=ns or namespace(), service="")


def emit(
    values: dict[str, float],
    dimensions: dict[str, str] | None = None,
    ns: str | None = None,
    job_id: str | None = None,
    properties: dict[str, str] | None = None,
) -> None:
    """One EMF line: `values` (metric name -> value) under every dimension set their specs declare;
    `job_id` and `properties` are plain properties of the line (not dimensions).

    All metrics in one call must declare the same dimension sets (EMF applies a line's sets to all
    of its metrics). Never raises: a broken metric is logged and dropped.
    """
    try:
        specs = [SPECS[name] for name in values]
        sets = {s.dimension_sets for s in specs}
        if len(sets) != 1:
            raise ValueError(f"metrics with different dimension sets in one line: {sorted(values)}")
        (dimension_sets,) = sets
        given = dict(dimensions or {})
        wanted = {d for s in dimension_sets for d in s}
        if set(given) != wanted:
            raise ValueError(f"{sorted(values)} need dimensions {sorted(wanted)}, got {sorted(given)}")
        metrics = _new(ns)
        for spec in specs:
            metrics.add_metric(name=spec.name, unit=spec.unit, value=float(values[spec.name]))
        # The first set is the Powertools "primary" one (its keys); the others are added as extra sets.
        primary, *others = dimension_sets
        for key in primary:
            metrics.add_dimension(name=key, value=given[key])
        for extra in others:
            metrics.add_dimensions(**{key: given[key] for key in extra})
        if job_id:
            metrics.add_metadata(key="job_id", value=job_id)
        for key, value in (properties or {}).items():
            metrics.add_metadata(key=key, value=value)
        from aws_lambda_powertools.metrics.functions import is_metrics_disabled

        if not is_metrics_disabled():  # Powertools' own switch (POWERTOOLS_METRICS_DISABLED)
            _write(json.dumps(metrics.serialize_metric_set(), separators=(",", ":")))
    except Exception:
        log.warning("could not emit metrics %s", sorted(values), exc_info=True)


# ---------------------------------------------------------------------------------------------- events


def job_received(job_id: str | None = None) -> None:
    emit({JOBS_RECEIVED: 1}, job_id=job_id)


def job_dispatched(backend: str, queue_s: float | None = None, job_id: str | None = None) -> None:
    """A dispatch; `queue_s` (sidecar event to dispatch) only on a job's first dispatch."""
    values: dict[str, float] = {JOBS_DISPATCHED: 1}
    if queue_s is not None:
        values[QUEUE_SECONDS] = max(0.0, queue_s)
    emit(values, {BACKEND: _backend(backend)}, job_id=job_id)


def fallback(from_backend: str, job_id: str | None = None) -> None:
    emit({FALLBACKS: 1}, {BACKEND: _backend(from_backend)}, job_id=job_id)


def job_succeeded(
    backend: str | None, generation_s: float | None, cost_usd: float | None, job_id: str | None = None
) -> None:
    values: dict[str, float] = {JOBS_SUCCEEDED: 1}
    if generation_s is not None:
        values[GENERATION_SECONDS] = max(0.0, generation_s)
    if cost_usd is not None:
        values[JOB_COST_USD] = cost_usd
    emit(values, {BACKEND: _backend(backend)}, job_id=job_id)


def job_failed(
    backend: str | None, kind: str, cost_usd: float | None = None, job_id: str | None = None
) -> None:
    """A job that ended failed; `kind` is one of ERROR_KINDS (anything else counts as internal)."""
    emit(
        {JOBS_FAILED: 1},
        {BACKEND: _backend(backend), ERROR_KIND: kind if kind in ERROR_KINDS else "internal"},
        job_id=job_id,
    )
    if cost_usd:  # what the job cost still counts (its AWS side; a run billed before it failed)
        emit({JOB_COST_USD: cost_usd}, {BACKEND: _backend(backend)}, job_id=job_id)


def result_reused(cost_usd: float | None = None, job_id: str | None = None) -> None:
    emit({RESULTS_REUSED: 1}, job_id=job_id)
    job_succeeded("reused", None, cost_usd, job_id=job_id)


def stuck_jobs(count: int) -> None:
    """Once per sweep, also when 0, so the alarm and dashboard see the sweeper is running."""
    emit({STUCK_JOBS: count})


def ingest_record_crashed(error: str) -> None:
    """An ingest record raised something other than an expected retry (media not uploaded yet, both
    backends down): Lambda's `Errors` cannot see it (a batch item failure is not a function error).
    `error` (the exception's type) is a plain property, not a dimension."""
    emit({INGEST_RECORD_CRASHES: 1}, properties={"error": error})
