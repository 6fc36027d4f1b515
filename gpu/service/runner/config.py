"""What every part of a run shares: its settings (`RunnerConfig`) and how it fails (`JobFailed`)."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from vap_shared.budget import UPLOAD_MARGIN_S, Budget
from vap_shared.contract import DEFAULT_STEPS
from vap_shared.gpu_contract import ErrorCode, GpuError

from gpu.service.engines.single import DEFAULT_CHECKPOINT_EVERY_S

ALLOW_LOOPBACK_ENV = "VAP_ALLOW_HTTP_LOOPBACK"
MiB = 1024 * 1024

Resolver = Callable[[str, int], list[str]]


def resolve_host(host: str, port: int) -> list[str]:
    """All addresses `host` resolves to, in the resolver's order of preference, without duplicates
    (every one must be public, not just the first; the first is the one connected to)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def _loopback_allowed_from_env() -> bool:
    return os.environ.get(ALLOW_LOOPBACK_ENV, "") == "1"


@dataclass
class RunnerConfig:
    max_video_bytes: int = 256 * MiB
    max_image_bytes: int = 32 * MiB
    connect_timeout_s: float = 10.0
    read_timeout_s: float = 60.0
    default_steps: int = DEFAULT_STEPS
    # Progress callbacks: every N steps, and never closer together than the interval.
    progress_every_steps: int = 5
    progress_min_interval_s: float = 2.0
    progress_timeout_s: float = 5.0
    callback_attempts: int = 5
    upload_attempts: int = 3
    backoff_s: float = 0.5  # doubled after each failed attempt
    # Fail with code "timeout" once the job has run this long (set below the platform's hard
    # timeout so the failure callback still goes out).
    job_timeout_s: float | None = None
    # The job budget (Modal): a run's limit is `budget.runner_limit_s(now, request.deadline_unix)`.
    # Without one, a request's `deadline_unix` still bounds the run (minus the upload margin).
    budget: Budget | None = None
    refresh_attempts: int = 2
    refresh_timeout_s: float = 10.0
    # Save the denoising state at least this often (None: 30 s, under the budget's local time
    # scale); a preempted run's re-run resumes from the last one.
    checkpoint_every_s: float | None = None
    allow_http_loopback: bool = field(default_factory=_loopback_allowed_from_env)
    resolver: Resolver = resolve_host
    sleep: Callable[[float], None] = time.sleep

    def checkpoint_interval_s(self) -> float:
        if self.checkpoint_every_s is not None:
            return self.checkpoint_every_s
        scale = self.budget.time_scale if self.budget is not None else 1.0
        return DEFAULT_CHECKPOINT_EVERY_S * scale

    def run_limit_s(self, now_unix: float, deadline_unix: int | None) -> float | None:
        """How long a job starting at `now_unix` may run (None: no limit)."""
        limits: list[float] = []
        if self.job_timeout_s is not None:
            limits.append(self.job_timeout_s)
        if self.budget is not None:
            limits.append(self.budget.runner_limit_s(now_unix, deadline_unix))
        elif deadline_unix is not None:
            limits.append(deadline_unix - now_unix - UPLOAD_MARGIN_S)
        return min(limits) if limits else None


class JobFailed(Exception):
    """The job failed; `error` is what the failure callback and the status endpoint report.
    `notify=False`: the service no longer wants this run, so no failure callback is sent."""

    def __init__(self, error: GpuError, notify: bool = True) -> None:
        super().__init__(f"{error.code}: {error.message}")
        self.error = error
        self.notify = notify


def fail(code: ErrorCode, message: str, retryable: bool = False, field: str | None = None) -> JobFailed:
    return JobFailed(GpuError(code=code, message=message, retryable=retryable, field=field))


@contextmanager
def about(field: str) -> Iterator[None]:
    """A failure inside the block is about request field `field` (the URL or media it names)."""
    try:
        yield
    except JobFailed as exc:
        if exc.error.field is not None:
            raise
        raise JobFailed(exc.error.model_copy(update={"field": field}), notify=exc.notify) from exc
