import time

import pytest
from fastapi.testclient import TestClient
from gpu_service_helpers import StubServices

from gpu import api
from gpu.api import LocalExecutor, ModalExecutor, create_app, outcome_to_status
from gpu.engine import FakeEngine
from gpu.runner import RunnerConfig

AUTH = {"Modal-Key": "wk-test", "Modal-Secret": "ws-test"}


class NoFlags:
    def __call__(self, images):
        return [False] * len(images)


@pytest.fixture
def stub():
    with StubServices() as services:
        yield services


def make_client(step_delay_s=0.0):
    config = RunnerConfig(allow_http_loopback=True, backoff_s=0.01, default_steps=3)
    executor = LocalExecutor(FakeEngine(step_delay_s=step_delay_s), safety=NoFlags(), config=config)
    return TestClient(create_app(executor, auth=("wk-test", "ws-test"))), executor


def wait_for(client, call_id, states=("succeeded", "failed", "cancelled"), timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = client.get(f"/status/{call_id}", headers=AUTH).json()
        if body["state"] in states:
            return body
        time.sleep(0.05)
    raise AssertionError(f"still {body['state']}")


def test_auth_required_everywhere_before_validation():
    client, executor = make_client()
    try:
        assert client.post("/submit", json={}).status_code == 401  # 401, not 422
        assert client.get("/status/x", headers={"Modal-Key": "wk-test"}).status_code == 401
        wrong = {"Modal-Key": "wk-test", "Modal-Secret": "nope"}
        assert client.post("/cancel/x", headers=wrong).status_code == 401
        assert client.post("/submit", json={}, headers=AUTH).status_code == 422
    finally:
        executor.shutdown()


def test_submit_status_result(stub):
    client, executor = make_client()
    try:
        request = stub.request(seed=5, steps=None)  # server default: 3
        response = client.post("/submit", json=request.model_dump(mode="json"), headers=AUTH)
        assert response.status_code == 202
        call_id = response.json()["call_id"]
        body = wait_for(client, call_id)
        assert body["state"] == "succeeded" and body["error"] is None, body
        assert body["result"]["seed"] == 5 and body["result"]["steps"] == 3
        assert body["progress"] == {"step": 3, "total": 3}
        assert stub.events()[-1] == "succeeded" and stub.recorded.callbacks[-1].call_id == call_id
        assert client.post(f"/cancel/{call_id}", headers=AUTH).json() == {
            "call_id": call_id,
            "cancelled": False,
        }
    finally:
        executor.shutdown()


def test_failed_job_status_carries_error(stub):
    client, executor = make_client()
    try:
        request = stub.request().model_copy(update={"image_url": f"{stub.base}/media/missing.png"})
        call_id = client.post("/submit", json=request.model_dump(mode="json"), headers=AUTH).json()["call_id"]
        body = wait_for(client, call_id)
        assert body["state"] == "failed" and body["error"]["code"] == "input" and body["result"] is None
    finally:
        executor.shutdown()


def test_cancel_running_and_queued(stub):
    client, executor = make_client(step_delay_s=0.05)
    try:
        first = stub.request(job_id="job-a", steps=200)
        second = stub.request(job_id="job-b", steps=200)
        a = client.post("/submit", json=first.model_dump(mode="json"), headers=AUTH).json()["call_id"]
        b = client.post("/submit", json=second.model_dump(mode="json"), headers=AUTH).json()["call_id"]
        wait_for(client, a, states=("running",))
        assert client.get(f"/status/{b}", headers=AUTH).json()["state"] == "queued"  # one worker
        assert client.post(f"/cancel/{b}", headers=AUTH).json()["cancelled"] is True
        assert client.post(f"/cancel/{a}", headers=AUTH).json()["cancelled"] is True
        body = wait_for(client, a)
        assert body["state"] == "cancelled" and body["error"]["code"] == "cancelled"
        assert wait_for(client, b)["state"] == "cancelled"
        assert not stub.recorded.uploads
    finally:
        executor.shutdown()


def test_unknown_call_is_404():
    client, executor = make_client()
    try:
        assert client.get("/status/fc-nope", headers=AUTH).status_code == 404
        assert client.post("/cancel/fc-nope", headers=AUTH).status_code == 404
    finally:
        executor.shutdown()


def test_no_auth_configured_means_open_app():
    _client, executor = make_client()
    try:
        open_client = TestClient(create_app(executor, auth=None))
        assert open_client.get("/status/unknown").status_code == 404
    finally:
        executor.shutdown()


# --- the Modal executor, with Modal's objects faked (no network) ---------------------------


class FakeCall:
    def __init__(self, outcome=None, raises=None):
        self.object_id = "fc-modal-1"
        self.outcome, self.raises = outcome, raises
        self.cancelled = False

    def get(self, timeout=None):
        assert timeout == 0
        if self.raises is not None:
            raise self.raises
        return self.outcome

    def cancel(self, terminate_containers=False):
        self.cancelled = True


RESULT = {"seed": 1, "width": 480, "height": 832, "num_frames": 49, "fps": 16, "bytes": 10, "steps": 50,
          "gpu": "NVIDIA H100 80GB HBM3", "timings": {"total_s": 1.0}}  # fmt: skip


def test_modal_executor_submit_status_cancel(monkeypatch):
    import modal

    spawned = []
    running = FakeCall(raises=TimeoutError())
    executor = ModalExecutor(lambda payload: spawned.append(payload) or running)
    calls = {"fc-modal-1": running}

    def from_id(call_id):
        if call_id not in calls:
            raise modal.exception.NotFoundError("no such call")
        return calls[call_id]

    monkeypatch.setattr(modal.FunctionCall, "from_id", staticmethod(from_id))
    client = TestClient(create_app(executor))
    with StubServices() as stub:
        request = stub.request()
    response = client.post("/submit", json=request.model_dump(mode="json"))
    assert response.status_code == 202 and response.json() == {"call_id": "fc-modal-1"}
    assert spawned[0]["job_id"] == "job-1"
    assert client.get("/status/fc-modal-1").json()["state"] == "running"
    assert client.post("/cancel/fc-modal-1").json()["cancelled"] is True and running.cancelled
    assert client.get("/status/fc-other").status_code == 404

    calls["fc-done"] = FakeCall(outcome={"result": RESULT, "error": None})
    body = client.get("/status/fc-done").json()
    assert body["state"] == "succeeded" and body["result"]["gpu"].startswith("NVIDIA")
    assert client.post("/cancel/fc-done").json()["cancelled"] is False

    calls["fc-timeout"] = FakeCall(raises=modal.exception.FunctionTimeoutError("timeout"))
    assert client.get("/status/fc-timeout").json()["error"]["code"] == "timeout"
    calls["fc-cancelled"] = FakeCall(raises=modal.exception.InputCancellation("cancelled"))
    assert client.get("/status/fc-cancelled").json()["state"] == "cancelled"


def test_outcome_to_status_mapping():
    assert outcome_to_status("c", {"result": RESULT}).state == "succeeded"
    failed = outcome_to_status("c", {"error": {"code": "safety", "message": "flagged", "retryable": False}})
    assert failed.state == "failed" and failed.error.code == "safety"
    cancelled = outcome_to_status("c", {"error": {"code": "cancelled", "message": "x"}})
    assert cancelled.state == "cancelled"
    assert outcome_to_status("c", None).error.code == "internal"


def test_constant_time_auth_helper_uses_both_headers():
    assert api.KEY_HEADER == "Modal-Key" and api.SECRET_HEADER == "Modal-Secret"
