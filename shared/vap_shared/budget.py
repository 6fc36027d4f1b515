"""Every time limit of a job, derived from one setting: the job budget.

`JobBudgetSeconds` (B) is how long a dispatched job may take until its result is stored. Both sides
derive their limits from it here, so they cannot contradict each other:

- Modal start-up allowance S (a cold container loads ~66 GB of weights): Modal's `startup_timeout`.
- Preemption loss L: Modal stops a GPU container when it must and runs the input again on a new
  one (GPU functions cannot be made non-preemptible). The re-run starts again (another S) and
  continues from the denoising state the run saved last (at least once a minute, after a step:
  `gpu.vap.resume`), so what the preemption loses is L: the steps since that save, the step in
  progress, and the work a re-run repeats before its loop (downloads, encoders, VAE encodes).
- Per-run limit R = (B - 2S - L) // 2: Modal's `timeout` (per attempt); the runner stops itself a
  minute earlier, and never later than the job's deadline (dispatch + B) minus the time an upload
  needs.
- Ingest keeps at most 2 x P jobs outstanding at Modal (P = containers): each container has one job
  running and at most one waiting, so every job starts by S + R and, with one preemption among the
  runs it waits for and its own, ends by 2S + 2R + L <= B (without one: by S + 2R).
- URLs sent at dispatch live B (the GPU also fetches fresh ones when it starts and before it uploads).
- The sweeper asks a backend about a job it has heard nothing from for `silence_s`, and stops a job
  only after `stop_after_s` (B + grace): by then the GPU side has reported or is dead.

Local stack only: `VAP_LOCAL_TIME_SCALE` (a factor in (0, 1], never set by the template or on Modal)
multiplies every duration a budget gives, so a load test lives through a whole budget in seconds.
The parameter itself keeps its deployable range; only the derived durations shrink (each rounded up
to a whole second, so at tiny scales only S + 2R <= B still holds, not the preemption allowance).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass

from .contract import BackendName
from .settings_parser import number

STARTUP_S = 1200  # Modal startup_timeout: a cold container loading the weights
MIN_RUN_S = 900  # the smallest per-run limit a budget may give (a 720p job needs many minutes)
# L: a save interval (<= 60 s, gpu.vap.resume.MAX_EVERY_S) plus the step in progress (a 720p/121
# step on one GPU takes minutes) plus the re-run's work before its loop.
PREEMPTION_LOSS_S = 600
MIN_BUDGET_S = 2 * STARTUP_S + 2 * MIN_RUN_S + PREEMPTION_LOSS_S  # 4800
MAX_BUDGET_S = 24 * 3600  # Modal's longest timeout; presigned URLs may live up to 7 days
DEFAULT_BUDGET_S = 9000  # R = 3000 s per run
RUNNER_MARGIN_S = 60  # the runner stops this long before Modal's hard timeout (its callback goes out)
UPLOAD_MARGIN_S = 120  # time kept for encode + upload + callback before the deadline
SWEEP_GRACE_S = 600  # after the budget: callbacks in flight, retries of the webhook
DEFAULT_MODAL_CONTAINERS = 2
MAX_MODAL_CONTAINERS = 100  # template.yaml's ModalContainers MaxValue (a test compares them)
DEFAULT_FAL_MAX_OUTSTANDING = 20
SILENCE_MIN_S, SILENCE_MAX_S = 300, 1800
LOCAL_TIME_SCALE_ENV = "VAP_LOCAL_TIME_SCALE"


class BudgetError(ValueError):
    """A budget or pool size outside what the invariants allow."""


@dataclass(frozen=True)
class Budget:
    job_s: int = DEFAULT_BUDGET_S
    modal_containers: int = DEFAULT_MODAL_CONTAINERS
    fal_max_outstanding: int = DEFAULT_FAL_MAX_OUTSTANDING
    startup_s: int = STARTUP_S
    # Local stack only (see the module docstring): 1.0 everywhere else.
    time_scale: float = 1.0

    def __post_init__(self) -> None:
        if not MIN_BUDGET_S <= self.job_s <= MAX_BUDGET_S:
            raise BudgetError(
                f"the job budget must be between {MIN_BUDGET_S} and {MAX_BUDGET_S} s, got {self.job_s}"
            )
        if self.modal_containers < 1 or self.fal_max_outstanding < 1:
            raise BudgetError("pool sizes must be at least 1")
        if not 0 < self.time_scale <= 1:
            raise BudgetError(f"the local time scale must be in (0, 1], got {self.time_scale}")
        # Whole seconds under a local time scale: a tiny scale can leave no room for even the
        # run a job waits for and its own (the preemption allowance then no longer fits either).
        if self.startup_allowance_s + 2 * self.run_s > self.total_s:
            raise BudgetError(f"the local time scale {self.time_scale} leaves no time for a run")

    def _t(self, seconds: int) -> int:
        """A duration under the local time scale (whole seconds, at least 1)."""
        if self.time_scale == 1:
            return seconds
        return max(1, math.ceil(seconds * self.time_scale))

    @property
    def total_s(self) -> int:
        """B: dispatch to stored result (the parameter, under the local time scale)."""
        return self._t(self.job_s)

    @property
    def startup_allowance_s(self) -> int:
        """S: Modal's `startup_timeout`."""
        return self._t(self.startup_s)

    @property
    def preemption_loss_s(self) -> int:
        """L: what one preemption costs a job beyond another start-up."""
        return self._t(PREEMPTION_LOSS_S)

    @property
    def run_s(self) -> int:
        """R: Modal's per-run `timeout`, from 2S + 2R + L <= B (then under the local time scale)."""
        return self._t((self.job_s - 2 * self.startup_s - PREEMPTION_LOSS_S) // 2)

    @property
    def runner_margin_s(self) -> int:
        return self._t(RUNNER_MARGIN_S)

    @property
    def upload_margin_s(self) -> int:
        return self._t(UPLOAD_MARGIN_S)

    @property
    def url_ttl_s(self) -> int:
        """Lifetime of the presigned URLs sent at dispatch (and of refreshed ones)."""
        return self.total_s

    @property
    def silence_s(self) -> int:
        """The sweeper asks the backend about a job it has heard nothing from for this long."""
        return max(self._t(SILENCE_MIN_S), min(self._t(SILENCE_MAX_S), self.run_s // 2))

    @property
    def stop_after_s(self) -> int:
        """The sweeper stops a job still queued/running this long after its dispatch."""
        return self.total_s + self._t(SWEEP_GRACE_S)

    def capacity(self, backend: BackendName) -> int:
        """Jobs that may be outstanding (dispatched or running) at `backend` at once."""
        return 2 * self.modal_containers if backend == "modal" else self.fal_max_outstanding

    def deadline_unix(self, dispatched_unix: float) -> int:
        return int(dispatched_unix) + self.total_s

    def runner_limit_s(self, now_unix: float, deadline_unix: int | None) -> float:
        """How long a run that starts now may generate: within Modal's timeout and the deadline."""
        limit = float(self.run_s - self.runner_margin_s)
        if deadline_unix is not None:
            limit = min(limit, deadline_unix - now_unix - self.upload_margin_s)
        return limit


def local_time_scale(env: Mapping[str, str] | None = None) -> float:
    """`VAP_LOCAL_TIME_SCALE` (local stack only; 1.0 when unset); raises `SettingsError`."""
    return number(os.environ if env is None else env, LOCAL_TIME_SCALE_ENV, 1.0, above=0, high=1)
