"""The local GPU server as Modal's stand-in: transient 5xx on submit and status, and GPU preemption
(the run stops, the same input runs again on a fresh worker with the same call id)."""

from __future__ import annotations

import time
from typing import Any

import httpx
import pytest
from gpu_service_helpers import StubServices
from vap_shared import routes

from gpu.service.local_server import ModalFaults, start_local_gpu_server

AUTH = {"Modal-Key": "wk-local", "Modal-Secret": "ws-local"}


def _server(**kwargs: Any) -> Any:
    return start_local_gpu_server(0, "wk-local", "ws-local", "fake", **kwargs)


def _wait(client: httpx.Client, call_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        response = client.get(f"/status/{call_id}", headers=AUTH)
        if response.status_code == 200 and response.json()["state"] not in ("queued", "running"):
            return response.json()
        time.sleep(0.05)
    raise AssertionError("the call did not finish")


def _request(stub: StubServices, job_id: str = "job-1", steps: int = 6) -> Any:
    return stub.request(job_id=job_id, steps=steps, enable_safety_checker=False)


def test_submit_and_status_fail_transiently_at_the_seeded_rate():
    server = _server(steps=2, faults=ModalFaults(error_rate=0.3, seed=11))
    try:
        with httpx.Client(base_url=server.url, timeout=10) as client:
            codes = [client.get("/status/fc-none", headers=AUTH).status_code for _ in range(300)]
    finally:
        server.stop()
    failed = sum(code >= 500 for code in codes)
    assert 60 <= failed <= 120 and set(codes) <= {404, 502, 503}  # ~30 %; the rest answered normally
    again = ModalFaults(error_rate=0.3, seed=11)
    assert [again.transient_error() is not None for _ in range(300)] == [code >= 500 for code in codes]


def test_without_faults_nothing_fails():
    server = _server(steps=2)
    try:
        with httpx.Client(base_url=server.url, timeout=10) as client:
            codes = {client.get("/status/fc-none", headers=AUTH).status_code for _ in range(100)}
    finally:
        server.stop()
    assert codes == {404}


def test_a_submit_answered_5xx_after_it_took_effect_runs_once():
    with StubServices() as stub:
        server = _server(steps=2, faults=ModalFaults(error_rate=1.0, error_after_share=1.0))
        try:
            with httpx.Client(base_url=server.url, timeout=10) as client:
                body = _request(stub).model_dump(mode="json")
                assert client.post("/submit", json=body, headers=AUTH).status_code == 502  # lost answer
                server.faults.error_rate = 0.0  # the caller retries once the endpoint is back
                call_id = client.post("/submit", json=body, headers=AUTH).json()["call_id"]
                assert _wait(client, call_id)["state"] == "succeeded"
        finally:
            server.stop()
        assert [e for e in stub.events() if e != "progress"] == ["succeeded"]  # one run, not two


def test_a_preempted_run_runs_again_on_a_fresh_worker_and_resumes():
    with StubServices() as stub:
        server = _server(faults=ModalFaults(preempt_rate=1.0, preempt_step=4), checkpoint_every_s=1e-6)
        first_engine = server.executor.engine
        try:
            request = _request(stub).model_copy(
                update={"refresh_url": routes.url(stub.base, "urls", "job-1")}
            )
            urls = {
                "resume_get_url": f"{stub.base}/media/state",
                "resume_put_url": f"{stub.base}/upload/state",
            }
            stub.refresh_answers = [(200, {**urls, "expires_at": 1})]
            stub.serve_uploads = True  # what a run saves, the next attempt reads back (as from S3)
            with httpx.Client(base_url=server.url, timeout=10) as client:
                answer = client.post("/submit", json=request.model_dump(mode="json"), headers=AUTH)
                call_id = answer.json()["call_id"]
                body = _wait(client, call_id)
        finally:
            server.stop()
    assert body["state"] == "succeeded"
    assert body["result"]["timings"]["resumed_at_step"] == 3  # steps 1..3 saved before the stop at 4
    callbacks = stub.recorded.callbacks
    assert {c.call_id for c in callbacks} == {call_id}
    attempts = [c.attempt for c in callbacks]
    assert attempts == sorted(attempts) and attempts[0] == 1  # attempt 1 reported first, then 2
    assert [(c.attempt, c.event) for c in callbacks if c.event != "progress"] == [(2, "succeeded")]
    assert [r.attempt for r in stub.recorded.refreshes] == [1, 2, 2]
    fresh = server.executor.engine_factory
    assert fresh is not None and server.executor.engine is first_engine  # the re-run had its own engine
    assert first_engine.calls and len(first_engine.calls) == 1


def test_preemption_steps_are_seeded_per_job_and_attempt():
    faults = ModalFaults(preempt_rate=1.0, seed=3, max_preemptions=2)
    steps = [faults.at_step(f"job-{i}", 1, 10) for i in range(50)]
    assert all(1 <= s <= 9 for s in steps if s is not None) and len(set(steps)) > 3
    assert steps == [ModalFaults(preempt_rate=1.0, seed=3).at_step(f"job-{i}", 1, 10) for i in range(50)]
    assert faults.at_step("job-1", 3, 10) is None  # at most max_preemptions per call
    assert ModalFaults(preempt_rate=0.0).at_step("job-1", 1, 10) is None
    half = [ModalFaults(preempt_rate=0.5, seed=5).at_step(f"job-{i}", 1, 10) for i in range(400)]
    assert 150 <= sum(s is not None for s in half) <= 250
    with pytest.raises(ValueError, match="preempt_rate"):
        ModalFaults(preempt_rate=1.5)
