"""The dispatch intent: ingest records the backend before it submits, so a redelivery after Lambda
killed an invocation between the submit and the `dispatched` write (or after a submit's answer was
lost) finds the job instead of running it a second time."""

from __future__ import annotations

from typing import Any

import httpx
import ingest
import pytest
from vap_shared import job_store
from vap_shared.jobs import parse_iso
from vap_testkit import FakeServices, Stack, call, handlers_on, sqs_event, stack, upload_fal_example

NAME = "inbox/set/job.json"


class Killed(BaseException):
    """Lambda stopping the invocation: nothing in the handler catches it, nothing cleans up."""


def kill_at_the_dispatched_write(monkeypatch: pytest.MonkeyPatch) -> None:
    original = job_store.JobStore.transition
    fired = {"done": False}

    def transition(self: Any, job_id: str, target: str, *args: Any, **kwargs: Any) -> Any:
        if target == "dispatched" and not fired["done"]:
            fired["done"] = True
            raise Killed
        return original(self, job_id, target, *args, **kwargs)

    monkeypatch.setattr(job_store.JobStore, "transition", transition)


@pytest.fixture
def services() -> FakeServices:
    return FakeServices()


@pytest.fixture
def st(monkeypatch: pytest.MonkeyPatch, services: FakeServices) -> Any:
    with stack(monkeypatch, services) as s, handlers_on(s):
        yield s


def the_job(st: Stack) -> Any:
    (job_id,) = st.job_ids()
    return st.store.get(job_id)


def deliver(event: dict[str, Any], receive_count: int) -> list[str]:
    response = call(ingest.handler, sqs_event(event, receive_count=receive_count))
    return [f["itemIdentifier"] for f in response["batchItemFailures"]]


def killed(st: Stack, event: dict[str, Any]) -> None:
    """The first delivery, killed at the `dispatched` write; then its dispatch lease runs out (the
    redelivery comes after the 360 s visibility timeout, the lease lasts 120 s)."""
    with pytest.raises(Killed):
        deliver(event, 1)
    st.store.release_dispatch_lease(the_job(st).job_id)


def posts(st: Stack, host: str) -> list[httpx.Request]:
    return [r for r in st.services.calls(host) if r.method == "POST"]


# ---------------------------------------------------------------------------------------------- fal


def test_a_kill_after_the_fal_submit_is_not_submitted_again(
    st: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    event = upload_fal_example(st, NAME, backend="fal")
    kill_at_the_dispatched_write(monkeypatch)
    killed(st, event)
    job = the_job(st)
    assert job.state == "received" and job.dispatch_intent == "fal" and len(posts(st, "queue.fal.test")) == 1
    assert deliver(event, 2) == []
    job = the_job(st)
    assert len(posts(st, "queue.fal.test")) == 1  # fal has it once
    # Dispatched at fal, waiting for its first fal delivery (the webhook URL's per-job token).
    assert (job.state, job.backend, job.backend_call_id) == ("dispatched", "fal", None)
    assert parse_iso(job.dispatched_at) == parse_iso(job.dispatch_intent_at)
    status = st.get_json(f"{job.output_prefix}status.json")
    assert status["phase"] == "dispatched" and status["backend"] == "fal"
    assert deliver(event, 3) == [] and len(posts(st, "queue.fal.test")) == 1


def test_a_lost_fal_answer_is_not_submitted_again(
    monkeypatch: pytest.MonkeyPatch, services: FakeServices
) -> None:
    """fal's answer to the submit timed out: fal may have queued the job, and fal has no lookup by
    our id, so the job waits for fal's webhook rather than being sent twice."""
    services.modal_status = 503
    services.fal_error = httpx.ReadTimeout
    with stack(monkeypatch, services) as st, handlers_on(st):
        event = upload_fal_example(st, NAME, backend="auto")
        assert deliver(event, 1) == []
        job = the_job(st)
        assert (job.state, job.backend, job.backend_call_id) == ("dispatched", "fal", None)
        assert job.fallback_from == "modal" and "HTTP 503" in (job.fallback_reason or "")
        assert len(posts(st, "queue.fal.test")) == 1


def test_a_refused_fal_submit_clears_the_intent(st: Stack, services: FakeServices) -> None:
    """fal answered no (503): it certainly does not have the job, so a retry submits again."""
    services.fal_status = 503
    event = upload_fal_example(st, NAME, backend="fal")
    assert deliver(event, 1) == ["m-0"]
    job = the_job(st)
    assert job.state == "received" and job.dispatch_intent is None and job.dispatch_intent_at is None
    services.fal_status = 200
    assert deliver(event, 2) == []
    job = the_job(st)
    assert job.backend == "fal" and job.backend_call_id and len(posts(st, "queue.fal.test")) == 2


# ---------------------------------------------------------------------------------------------- modal


def test_a_kill_after_the_modal_submit_finds_the_call_instead_of_falling_back(
    st: Stack, services: FakeServices, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Modal is unreachable when the redelivery comes: the job may already be queued there, so it is
    not sent to fal too; once Modal answers, re-submitting the job id finds the first call."""
    event = upload_fal_example(st, NAME, backend="auto")
    kill_at_the_dispatched_write(monkeypatch)
    killed(st, event)
    assert the_job(st).dispatch_intent == "modal"
    services.modal_status = 503
    assert deliver(event, 2) == ["m-0"]  # retried later: no fallback while attempts remain
    assert posts(st, "queue.fal.test") == [] and the_job(st).dispatch_intent == "modal"
    services.modal_status = 202
    assert deliver(event, 3) == []
    job = the_job(st)
    assert (job.state, job.backend, job.backend_call_id) == ("dispatched", "modal", "fc-1")
    assert set(services.modal_calls.values()) == {"fc-1"} and posts(st, "queue.fal.test") == []


def test_the_last_attempt_still_falls_back(
    st: Stack, services: FakeServices, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Better a possible second run than a failed job: the last attempt falls back to fal."""
    event = upload_fal_example(st, NAME, backend="auto")
    kill_at_the_dispatched_write(monkeypatch)
    killed(st, event)
    services.modal_status = 503
    assert deliver(event, st.runtime.settings.ingest_max_attempts) == []
    job = the_job(st)
    assert (job.state, job.backend, job.fallback_from) == ("dispatched", "fal", "modal")


def test_a_job_cancelled_before_its_submit_is_not_submitted(
    st: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`vap cancel` between the checks and the submit: the intent write finds the job no longer
    `received`, and nothing is sent."""
    event = upload_fal_example(st, NAME, backend="modal")
    original = job_store.JobStore.set_dispatch_intent

    def cancel_first(self: Any, job_id: str, *args: Any, **kwargs: Any) -> bool:
        self.transition(job_id, "cancelled", {}, "2026-11-25T18:23:02.000000Z")
        return bool(original(self, job_id, *args, **kwargs))

    monkeypatch.setattr(job_store.JobStore, "set_dispatch_intent", cancel_first)
    assert deliver(event, 1) == []
    assert the_job(st).state == "cancelled" and posts(st, "modal.test") == []
