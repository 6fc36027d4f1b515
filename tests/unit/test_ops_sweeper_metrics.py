"""The sweeper's job metrics: `StuckJobs` once per run (0 too), and a stopped run is a `timeout`."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta

import pytest
from ops_flow import emf, metric_values
from test_sweeper import SweepServices, dispatch
from vap_shared.jobs import utcnow
from vap_shared.sweeper import sweep
from vap_testkit import MP4, Stack, gpu_result, handlers_on, stack

LATER = timedelta(seconds=5400)  # the stop point of the tests' 4800 s budget


@pytest.fixture
def services() -> SweepServices:
    return SweepServices()


@pytest.fixture
def st(monkeypatch: pytest.MonkeyPatch, services: SweepServices) -> Iterator[Stack]:
    with stack(monkeypatch, services) as s, handlers_on(s, with_sweeper=True):
        yield s


def test_an_idle_sweep_still_reports_zero_stuck_jobs(st: Stack, capsys: pytest.CaptureFixture[str]) -> None:
    report = sweep(st.runtime)
    assert report.outcomes == {} and report.stuck == 0
    assert metric_values(emf(capsys.readouterr().out), "StuckJobs") == [({}, 0.0)]


def test_settled_overdue_jobs_are_counted_as_stuck(
    st: Stack, services: SweepServices, capsys: pytest.CaptureFixture[str]
) -> None:
    recovered = dispatch(st, name="inbox/set/one.json")
    st.put(f"work/{recovered.job_id}/video.mp4", MP4, "video/mp4")
    services.modal_state = {
        "state": "succeeded",
        "result": gpu_result(1),
    }
    capsys.readouterr()
    report = sweep(st.runtime, now=utcnow() + LATER)
    assert report.outcomes == {recovered.job_id: "recovered"} and report.stuck == 1
    assert metric_values(emf(capsys.readouterr().out), "StuckJobs") == [({}, 1.0)]
    st.store_results()  # the store function stores what the sweeper queued
    assert metric_values(emf(capsys.readouterr().out), "JobsSucceeded") == [({"backend": "modal"}, 1.0)]
    # The next run finds nothing: the job is settled.
    sweep(st.runtime, now=utcnow() + LATER)
    assert metric_values(emf(capsys.readouterr().out), "StuckJobs") == [({}, 0.0)]


def test_a_run_stopped_past_the_budget_fails_as_a_timeout(
    st: Stack, services: SweepServices, capsys: pytest.CaptureFixture[str]
) -> None:
    job = dispatch(st, backend="modal")
    services.modal_state = {"state": "running"}
    capsys.readouterr()
    report = sweep(st.runtime, now=utcnow() + LATER)
    assert report.outcomes == {job.job_id: "failed"}
    docs = emf(capsys.readouterr().out)
    assert metric_values(docs, "JobsFailed") == [({"backend": "modal", "error_kind": "timeout"}, 1.0)]
    assert metric_values(docs, "StuckJobs") == [({}, 1.0)]


def test_a_lost_job_the_backend_does_not_know_is_an_internal_failure(
    st: Stack, services: SweepServices, capsys: pytest.CaptureFixture[str]
) -> None:
    job = dispatch(st, backend="modal")
    services.modal_state = None  # the GPU API answers 404: unknown call
    capsys.readouterr()
    assert sweep(st.runtime, now=utcnow() + LATER).outcomes == {job.job_id: "failed"}
    docs = emf(capsys.readouterr().out)
    assert metric_values(docs, "JobsFailed") == [({"backend": "modal", "error_kind": "internal"}, 1.0)]
