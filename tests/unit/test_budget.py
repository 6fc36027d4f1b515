"""The job budget's invariants, for the defaults and for every value template.yaml accepts.

One setting (JobBudgetSeconds B) and the pool sizes decide every time limit (vap_shared.budget);
these properties are what keeps a dispatched job from meeting an expired URL, a Modal timeout or
the sweeper before its own deadline.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from vap_shared import budget as budget_module
from vap_shared.budget import (
    MIN_RUN_S,
    PREEMPTION_LOSS_S,
    STARTUP_S,
    Budget,
    BudgetError,
)
from vap_shared.config import Settings
from vap_shared.settings_parser import SettingsError
from vap_shared.sweeper.deadline import DeadlineSweep

from local_stack.cfn import load_template

TEMPLATE = load_template(Path(__file__).resolve().parents[2] / "template.yaml")
PARAMS: dict[str, Any] = TEMPLATE["Parameters"]
SIGV4_MAX_EXPIRES_S = 7 * 24 * 3600  # the longest X-Amz-Expires S3 accepts
MODAL_MAX_TIMEOUT_S = 24 * 3600
BASE_ENV = {"BUCKET_NAME": "b", "JOBS_TABLE": "t", "TOPIC_ARN": "arn:aws:sns:us-east-1:1:t"}


def _range(name: str) -> st.SearchStrategy[int]:
    p = PARAMS[name]
    return st.integers(min_value=int(p["MinValue"]), max_value=int(p["MaxValue"]))


budgets = st.builds(
    lambda b, p, f: Budget(job_s=b, modal_containers=p, fal_max_outstanding=f),
    _range("JobBudgetSeconds"),
    _range("ModalContainers"),
    _range("FalMaxOutstanding"),
)
# Local stack only: the same invariants must hold for a shrunken clock.
scales = st.sampled_from([1.0, 0.5, 0.1, 0.01, 0.001, 0.0001])


def test_template_range_is_the_code_range() -> None:
    p = PARAMS["JobBudgetSeconds"]
    minimum = 2 * STARTUP_S + 2 * MIN_RUN_S + PREEMPTION_LOSS_S
    assert int(p["MinValue"]) == budget_module.MIN_BUDGET_S == minimum
    assert int(p["MaxValue"]) == budget_module.MAX_BUDGET_S
    assert int(p["Default"]) == budget_module.DEFAULT_BUDGET_S
    assert int(PARAMS["ModalContainers"]["Default"]) == budget_module.DEFAULT_MODAL_CONTAINERS
    assert int(PARAMS["FalMaxOutstanding"]["Default"]) == budget_module.DEFAULT_FAL_MAX_OUTSTANDING
    for name in ("ModalContainers", "FalMaxOutstanding"):
        assert int(PARAMS[name]["MinValue"]) >= 1


def check_invariants(b: Budget, now: float = 1_800_000_000.0) -> None:
    B, S, R, L = b.total_s, b.startup_allowance_s, b.run_s, b.preemption_loss_s
    # Modal: per-run timeout + start-up allowance within the budget, and a run long enough to matter.
    assert S + R <= B
    assert R >= 1 and R <= MODAL_MAX_TIMEOUT_S
    if b.time_scale == 1:
        assert R >= MIN_RUN_S
    # Capacity x run time fits: with 2P outstanding on P containers a job waits for at most one run
    # before its own, so the last one admitted ends by S + 2R; one preemption on its way costs
    # another start-up and what the preempted run had not saved, and it still ends by B.
    assert b.capacity("modal") == 2 * b.modal_containers
    worst_wait_runs = b.capacity("modal") // b.modal_containers - 1
    assert S + (worst_wait_runs + 1) * R <= B
    if b.time_scale == 1:  # (whole seconds under a tiny local scale leave no room for it)
        assert 2 * S + (worst_wait_runs + 1) * R + L <= B
        # L covers a save interval of the denoising state (at most a minute) and then some.
        assert 60 <= L < R
    assert b.capacity("fal") == b.fal_max_outstanding
    # URLs sent at dispatch outlive everything a dispatched job can need, within SigV4's limit.
    assert b.url_ttl_s >= S + 2 * R and b.url_ttl_s >= B
    assert b.url_ttl_s <= SIGV4_MAX_EXPIRES_S
    # The GPU side stops itself by the deadline; the sweeper never stops a job before that (and
    # the callbacks sent at the deadline have grace to arrive).
    deadline = b.deadline_unix(now)
    assert deadline - int(now) == B
    assert b.stop_after_s > B
    assert 0 < b.silence_s < b.stop_after_s
    # A run starting anywhere within its allowance (a re-run after a preemption too) never outlives
    # Modal's timeout nor the deadline.
    for started in (now, now + S, now + S + R, now + 2 * S + R + L):
        limit = b.runner_limit_s(started, deadline)
        assert limit <= R - b.runner_margin_s
        assert started + limit + b.upload_margin_s <= deadline


def test_defaults() -> None:
    b = Budget()
    check_invariants(b)
    assert (b.total_s, b.startup_allowance_s, b.preemption_loss_s, b.run_s) == (9000, 1200, 600, 3000)
    assert b.capacity("modal") == 4 and b.url_ttl_s == 9000 and b.stop_after_s == 9600


@settings(max_examples=300, deadline=None)
@given(budgets, scales)
def test_every_accepted_parameter_value(b: Budget, scale: float) -> None:
    check_invariants(b)
    try:
        scaled = Budget(b.job_s, b.modal_containers, b.fal_max_outstanding, time_scale=scale)
    except BudgetError:
        assume(False)  # a scale that leaves no run time is refused (local stack only)
    check_invariants(scaled)


@settings(max_examples=200, deadline=None)
@given(budgets)
def test_settings_build_the_same_budget_and_the_sweeper_waits_for_it(b: Budget) -> None:
    env = {
        **BASE_ENV,
        "JOB_BUDGET_SECONDS": str(b.job_s),
        "MODAL_CONTAINERS": str(b.modal_containers),
        "FAL_MAX_OUTSTANDING": str(b.fal_max_outstanding),
    }
    s = Settings.from_env(env)
    assert s.budget == b
    # Every presigned URL the service hands out lives the budget.
    assert s.presign_ttl_seconds == b.url_ttl_s
    # The sweeper stops a still-running job only after the budget's stop time (the GPU side's own
    # deadline + grace), and asks about a silent one well before that.
    sweep = DeadlineSweep(SimpleNamespace(settings=s))  # type: ignore[arg-type]
    assert sweep.stop_after_s == b.stop_after_s > b.total_s
    assert sweep.ask_after_s == b.silence_s < b.run_s


@pytest.mark.parametrize(
    "name,value",
    [
        ("JOB_BUDGET_SECONDS", str(budget_module.MIN_BUDGET_S - 1)),
        ("JOB_BUDGET_SECONDS", str(budget_module.MAX_BUDGET_S + 1)),
        ("MODAL_CONTAINERS", "0"),
        ("VAP_LOCAL_TIME_SCALE", "2"),
        ("VAP_LOCAL_TIME_SCALE", "fast"),
    ],
)
def test_values_outside_the_invariants_are_refused_at_cold_start(name: str, value: str) -> None:
    with pytest.raises(SettingsError, match=name):
        Settings.from_env({**BASE_ENV, name: value})


def test_budget_refuses_what_breaks_the_invariants() -> None:
    for kwargs in ({"job_s": 4799}, {"job_s": 86401}, {"modal_containers": 0}, {"time_scale": 0.0}):
        with pytest.raises(BudgetError):
            Budget(**kwargs)  # type: ignore[arg-type]


def test_the_local_time_scale_is_never_deployed() -> None:
    # Local stack only: no function of the template and nothing forwarded to Modal sets it.
    for resource in TEMPLATE["Resources"].values():
        variables = resource.get("Properties", {}).get("Environment", {}).get("Variables", {})
        assert budget_module.LOCAL_TIME_SCALE_ENV not in variables
    modal_app = Path(__file__).resolve().parents[2] / "gpu" / "service" / "modal_app.py"
    assert budget_module.LOCAL_TIME_SCALE_ENV not in modal_app.read_text(encoding="utf-8")
