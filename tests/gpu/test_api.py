import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import modal
import pytest
from fastapi.testclient import TestClient
from gpu_service_helpers import FakeDict, StubServices
from modal._functions import _FunctionCall
from modal._serialization import serialize
from modal._utils.async_utils import synchronizer
from modal.types import InputStatus
from modal_proto import api_pb2

from gpu.service import routing
from gpu.service.api import app as api
from gpu.service.api.app import create_app
from gpu.service.api.executors import LocalExecutor, ModalExecutor, outcome_to_status
from gpu.service.engines.single import FakeEngine
from gpu.service.routing import SubmitRejected
from gpu.service.runner.config import RunnerConfig

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


def test_submit_is_idempotent_on_job_id(stub):
    client, executor = make_client()
    try:
        body = stub.request(job_id="job-twice", steps=2).model_dump(mode="json")
        first = client.post("/submit", json=body, headers=AUTH)
        # The caller's read timed out and it retries the same job: same call, nothing new runs.
        second = client.post("/submit", json=body, headers=AUTH)
        assert first.status_code == second.status_code == 202
        call_id = first.json()["call_id"]
        assert second.json()["call_id"] == call_id
        assert wait_for(client, call_id)["state"] == "succeeded"
        assert client.post("/submit", json=body, headers=AUTH).json()["call_id"] == call_id  # also after
        other = stub.request(job_id="job-other", steps=2).model_dump(mode="json")
        other_id = client.post("/submit", json=other, headers=AUTH).json()["call_id"]
        assert other_id != call_id
        wait_for(client, other_id)
        assert len(executor.engine.calls) == 2  # one run per job
        assert list(stub.recorded.uploads) == ["/upload/job-twice.mp4", "/upload/job-other.mp4"]
        succeeded = [c.job_id for c in stub.recorded.callbacks if c.event == "succeeded"]
        assert succeeded == ["job-twice", "job-other"]
    finally:
        executor.shutdown()


def test_concurrent_submits_of_one_job_start_one_run(stub):
    _client, executor = make_client()
    try:
        request = stub.request(job_id="job-race", steps=2)
        with ThreadPoolExecutor(max_workers=8) as pool:
            ids = set(pool.map(lambda _: executor.submit(request), range(8)))
        assert len(ids) == 1
        call_id = ids.pop()
        deadline = time.monotonic() + 30
        while executor.status(call_id).state != "succeeded" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(executor.engine.calls) == 1
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


# --- the Modal executor: the real modal SDK's FunctionCall over a stand-in transport --------------
#
# `modal.FunctionCall.from_id` returns the SDK's own FunctionCall, hydrated with a client whose gRPC
# stub answers like Modal's server would. So `get()`, `get_call_graph()` and `cancel()` run the SDK's
# code: the exceptions (RemoteError for a cancelled input, FunctionTimeoutError, OutputExpiredError)
# and the call graph's InputStatus are what modal 1.6.4 itself produces from those answers.

GENERIC = api_pb2.GenericResult
RESULT = {"seed": 1, "width": 480, "height": 832, "num_frames": 49, "fps": 16, "bytes": 10, "steps": 50,
          "gpu": "NVIDIA H100 80GB HBM3", "timings": {"total_s": 1.0}}  # fmt: skip


class ModalServer:
    """What Modal's server answers about function calls (the stub the SDK's FunctionCall calls)."""

    def __init__(self):
        self.results = {}  # call id -> GenericResult; absent: still queued/running
        self.input_status = {}  # call id -> InputStatus value in the call graph
        self.known = set()
        self.cancel_requests = []
        self.expired = set()

    def finish(self, call_id, status, data=b""):
        self.results[call_id] = GENERIC(status=status, data=data)
        self.input_status[call_id] = status

    async def FunctionGetOutputs(self, request, **_):
        call_id = request.function_call_id
        if call_id not in self.known:
            raise modal.exception.NotFoundError(f"Function call {call_id} not found")
        if call_id in self.expired:
            return api_pb2.FunctionGetOutputsResponse(num_unfinished_inputs=0)
        if call_id not in self.results:
            return api_pb2.FunctionGetOutputsResponse(num_unfinished_inputs=1)
        item = api_pb2.FunctionGetOutputsItem(
            result=self.results[call_id], data_format=api_pb2.DATA_FORMAT_PICKLE
        )
        return api_pb2.FunctionGetOutputsResponse(outputs=[item])

    async def FunctionGetCallGraph(self, request, **_):
        call_id = request.function_call_id
        # The job was spawned from an input of the web function: it is that input's child.
        return api_pb2.FunctionGetCallGraphResponse(
            inputs=[
                api_pb2.InputCallGraphInfo(input_id="in-web", function_call_id="fc-web", task_id="ta-web"),
                api_pb2.InputCallGraphInfo(
                    input_id="in-job", function_call_id=call_id, task_id="ta-gpu",
                    status=self.input_status.get(call_id, 0),
                ),
            ],
            function_calls=[
                api_pb2.FunctionCallCallGraphInfo(function_call_id="fc-web", function_name="api"),
                api_pb2.FunctionCallCallGraphInfo(
                    function_call_id=call_id, parent_input_id="in-web", function_name="VapH100.generate",
                ),
            ],
        )  # fmt: skip

    async def FunctionCallCancel(self, request, **_):
        # What Modal does: the input is interrupted and its output is a bare TERMINATED result.
        self.cancel_requests.append(request.function_call_id)
        self.finish(request.function_call_id, GENERIC.GENERIC_STATUS_TERMINATED)


class ModalClient:
    _snapshotted = False

    def __init__(self, server):
        self._stub = server

    @property
    def stub(self):
        return self._stub


class DoesNotFit(Exception):
    pass


def choose_gpu(width, height, num_frames, gpus=1):
    """Stand-in for gpu.service.routing.choose_gpu (same signature): 720p beyond 81 frames needs an H200;
    4 GPUs are refused; 2 GPUs name a GPU the deployment does not have."""
    choose_gpu.calls.append((width, height, num_frames, gpus))
    if gpus == 4:
        raise DoesNotFit("720p x 121 frames does not fit 4 x H100 in this plan")
    if gpus == 2:
        return SimpleNamespace(modal_gpu="B200:2")
    if gpus > 1:  # the plan pins the type ("H100!:8"); the deployment offers "H100:8"
        return SimpleNamespace(modal_gpu=f"H100!:{gpus}")
    return SimpleNamespace(modal_gpu="H200" if width * height == 1280 * 720 and num_frames > 81 else "H100!")


@pytest.fixture
def modal_setup(monkeypatch):
    server = ModalServer()
    client = ModalClient(server)

    def from_id(call_id, client_=None):
        return synchronizer._translate_out(_FunctionCall._new_hydrated(call_id, client, None))

    monkeypatch.setattr(modal.FunctionCall, "from_id", staticmethod(from_id))
    spawned = []

    def spawner(gpu):
        def spawn(payload):
            call_id = f"fc-{len(spawned) + 1}"
            spawned.append((gpu, payload["job_id"]))
            server.known.add(call_id)
            return from_id(call_id)

        return spawn

    choose_gpu.calls = []
    registry = FakeDict()
    spawners = {gpu: spawner(gpu) for gpu in ("H100!", "H200", "H100:8")}
    executor = ModalExecutor(spawners, registry, choose=(choose_gpu, DoesNotFit), wait_s=0.5, poll_s=0.01)
    return SimpleNamespace(
        server=server, spawned=spawned, registry=registry, executor=executor,
        client=TestClient(create_app(executor)),
    )  # fmt: skip


def job(job_id="job-1", **settings):
    with StubServices() as stub:
        return stub.request(job_id=job_id, **settings)


@pytest.mark.parametrize(
    ("settings", "gpus", "expected", "plan_args"),
    [
        ({"resolution": "480p", "num_frames": 49}, 1, "H100!", (480, 832, 49, 1)),
        ({"resolution": "720p", "num_frames": 121}, 1, "H200", (720, 1280, 121, 1)),
        ({"resolution": "720p", "aspect_ratio": "16:9", "num_frames": 120}, 1, "H200", (1280, 720, 121, 1)),
        ({"resolution": "720p", "num_frames": 49}, 8, "H100:8", (720, 1280, 49, 8)),
    ],
)
def test_modal_submit_spawns_on_the_class_the_plan_names(modal_setup, settings, gpus, expected, plan_args):
    request = job(**settings).model_copy(update={"gpus": gpus})
    response = modal_setup.client.post("/submit", json=request.model_dump(mode="json"))
    assert response.status_code == 202 and response.json() == {"call_id": "fc-1"}
    assert modal_setup.spawned == [(expected, "job-1")]
    assert choose_gpu.calls == [plan_args]  # target size and 4k+1 frames, as the GPU will run them
    assert modal_setup.registry.get("job:job-1") == {"call_id": "fc-1", "gpu": expected}


def test_modal_submit_refuses_what_no_offered_gpu_runs(modal_setup):
    too_big = job().model_copy(update={"gpus": 4})
    response = modal_setup.client.post("/submit", json=too_big.model_dump(mode="json"))
    assert response.status_code == 422 and "does not fit" in response.json()["detail"]
    missing = job(job_id="job-2").model_copy(update={"gpus": 2})
    response = modal_setup.client.post("/submit", json=missing.model_dump(mode="json"))
    assert response.status_code == 503 and "B200:2" in response.json()["detail"]
    assert modal_setup.spawned == [] and modal_setup.registry.data == {}


def test_modal_submit_is_idempotent_on_job_id(modal_setup):
    body = job().model_dump(mode="json")
    first = modal_setup.client.post("/submit", json=body).json()["call_id"]
    again = modal_setup.client.post("/submit", json=body).json()["call_id"]
    assert first == again == "fc-1" and modal_setup.spawned == [("H100!", "job-1")]


def test_modal_concurrent_submits_spawn_once(modal_setup):
    inner = modal_setup.executor._spawners["H100!"]

    def slow_spawn(payload):
        time.sleep(0.2)  # while the first submit spawns, the others find the reservation
        return inner(payload)

    modal_setup.executor._spawners["H100!"] = slow_spawn
    request = job()
    with ThreadPoolExecutor(max_workers=4) as pool:
        ids = list(pool.map(lambda _: modal_setup.executor.submit(request), range(4)))
    assert ids == ["fc-1"] * 4 and len(modal_setup.spawned) == 1


def test_modal_failed_spawn_lets_a_retry_spawn(modal_setup):
    def broken(payload):
        raise modal.exception.ConnectionError("Modal unreachable")

    working = modal_setup.executor._spawners["H100!"]
    modal_setup.executor._spawners["H100!"] = broken
    with pytest.raises(modal.exception.ConnectionError):
        modal_setup.executor.submit(job())
    assert modal_setup.registry.data == {}  # the reservation was released
    modal_setup.executor._spawners["H100!"] = working
    assert modal_setup.executor.submit(job()) == "fc-1"


def test_modal_submit_waits_for_a_reservation_then_takes_over_a_stale_one(modal_setup):
    registry, executor = modal_setup.registry, modal_setup.executor
    registry.put("job:job-1", {"pending_since": time.time()})  # another container is spawning
    with pytest.raises(SubmitRejected) as info:
        executor.submit(job())
    assert info.value.status_code == 503 and modal_setup.spawned == []
    registry.put("job:job-1", {"pending_since": time.time() - 3600})  # that container died long ago
    assert executor.submit(job()) == "fc-1" and registry.get("job:job-1")["call_id"] == "fc-1"


def test_two_submits_that_find_the_same_stale_reservation_spawn_once(modal_setup):
    # Both API containers read the stale reservation before either acts on it: only the one that
    # creates its takeover key (put-if-absent) replaces it and spawns; the other waits for its call.
    registry, executor = modal_setup.registry, modal_setup.executor
    registry.put("job:job-1", {"pending_since": time.time() - 3600, "token": "old"})
    both_read = threading.Barrier(2, timeout=5)
    read = registry.get

    def get(key, default=None):
        value = read(key, default)
        if key == "job:job-1" and value is not None and value.get("token") == "old":
            both_read.wait()  # each thread holds the stale record before anyone takes it over
        return value

    registry.get = get
    results: list[str] = []
    threads = [threading.Thread(target=lambda: results.append(executor.submit(job()))) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert results == ["fc-1", "fc-1"] and modal_setup.spawned == [("H100!", "job-1")]
    assert registry.data["job:job-1"]["call_id"] == "fc-1" and "takeover:job-1:old" in registry.data


def test_attempts_of_a_call_are_counted_with_put_if_absent(modal_setup):
    from gpu.service.api.executors import claim_attempt

    registry = modal_setup.registry
    assert [claim_attempt(registry, "fc-7") for _ in range(3)] == [1, 2, 3]
    assert claim_attempt(registry, "fc-8") == 1
    counted: list[int] = []
    threads = [
        threading.Thread(target=lambda: counted.append(claim_attempt(registry, "fc-9"))) for _ in range(8)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert sorted(counted) == list(range(1, 9))  # concurrent executions never share a number


def test_modal_status_running_succeeded_unknown(modal_setup):
    call_id = modal_setup.executor.submit(job())
    assert modal_setup.client.get(f"/status/{call_id}").json()["state"] == "running"
    modal_setup.server.finish(
        call_id, GENERIC.GENERIC_STATUS_SUCCESS, serialize({"result": RESULT, "error": None})
    )
    body = modal_setup.client.get(f"/status/{call_id}").json()
    assert body["state"] == "succeeded" and body["result"]["gpu"].startswith("NVIDIA")
    assert modal_setup.client.post(f"/cancel/{call_id}").json()["cancelled"] is False
    assert modal_setup.client.get("/status/fc-unknown").status_code == 404
    assert modal_setup.client.post("/cancel/fc-unknown").status_code == 404


def test_modal_cancel_through_the_api_reads_as_cancelled(modal_setup):
    call_id = modal_setup.executor.submit(job())
    assert modal_setup.client.post(f"/cancel/{call_id}").json() == {"call_id": call_id, "cancelled": True}
    assert modal_setup.server.cancel_requests == [call_id]
    assert modal_setup.registry.get(f"cancel:{call_id}") is not None
    # modal 1.6.4: the cancelled input's get() raises RemoteError with an empty message.
    with pytest.raises(modal.exception.RemoteError, match=r"^$"):
        modal.FunctionCall.from_id(call_id).get(timeout=0)
    body = modal_setup.client.get(f"/status/{call_id}").json()
    assert body["state"] == "cancelled" and body["error"]["code"] == "cancelled"


def test_modal_cancel_that_fails_leaves_no_cancel_record(modal_setup, monkeypatch):
    call_id = modal_setup.executor.submit(job())

    async def unreachable(request, **_):
        raise modal.exception.ConnectionError("Modal unreachable")

    monkeypatch.setattr(modal_setup.server, "FunctionCallCancel", unreachable)
    with pytest.raises(modal.exception.ConnectionError):
        modal_setup.executor.cancel(call_id)
    assert modal_setup.registry.get(f"cancel:{call_id}") is None
    # So a later crash of that call reads as the failure it is.
    modal_setup.server.finish(call_id, GENERIC.GENERIC_STATUS_FAILURE)
    assert modal_setup.client.get(f"/status/{call_id}").json()["error"]["code"] == "internal"


def test_modal_cancelled_elsewhere_reads_as_cancelled_from_modals_call_status(modal_setup):
    # Cancelled from Modal's dashboard/CLI: no record of ours, but the input is TERMINATED.
    call_id = modal_setup.executor.submit(job())
    modal_setup.server.finish(call_id, GENERIC.GENERIC_STATUS_TERMINATED)
    graph = modal.FunctionCall.from_id(call_id).get_call_graph()
    assert graph[0].children[0].status == InputStatus.TERMINATED
    assert modal_setup.client.get(f"/status/{call_id}").json()["state"] == "cancelled"


@pytest.mark.parametrize(
    ("status", "data"),
    [
        (GENERIC.GENERIC_STATUS_FAILURE, b""),  # a crash without an exception: RemoteError("")
        (GENERIC.GENERIC_STATUS_INIT_FAILURE, b""),
        # An uncaught error whose text mentions "cancel" is still a failure, not a cancellation.
        (GENERIC.GENERIC_STATUS_FAILURE, serialize(RuntimeError("could not cancel the pending upload"))),
    ],
    ids=["crash", "init-failure", "error-mentioning-cancel"],
)
def test_modal_failures_are_internal_whatever_their_message(modal_setup, status, data):
    call_id = modal_setup.executor.submit(job())
    modal_setup.server.finish(call_id, status, data)
    body = modal_setup.client.get(f"/status/{call_id}").json()
    assert body["state"] == "failed"
    assert body["error"]["code"] == "internal" and body["error"]["retryable"] is True


def test_modal_timeout_and_expired_outputs(modal_setup):
    timed_out = modal_setup.executor.submit(job())
    modal_setup.server.finish(timed_out, GENERIC.GENERIC_STATUS_TIMEOUT)
    body = modal_setup.client.get(f"/status/{timed_out}").json()
    assert body["state"] == "failed" and body["error"]["code"] == "timeout"
    expired = modal_setup.executor.submit(job(job_id="job-2"))
    modal_setup.server.expired.add(expired)
    assert (
        modal_setup.client.get(f"/status/{expired}").json()["error"]["message"]
        == "the call's result has expired"
    )


def test_outcome_to_status_mapping():
    assert outcome_to_status("c", {"result": RESULT}).state == "succeeded"
    failed = outcome_to_status("c", {"error": {"code": "safety", "message": "flagged", "retryable": False}})
    assert failed.state == "failed" and failed.error.code == "safety"
    cancelled = outcome_to_status("c", {"error": {"code": "cancelled", "message": "x"}})
    assert cancelled.state == "cancelled"
    assert outcome_to_status("c", None).error.code == "internal"


def test_constant_time_auth_helper_uses_both_headers():
    assert api.KEY_HEADER == "Modal-Key" and api.SECRET_HEADER == "Modal-Secret"


def test_the_real_plan_routes_every_accepted_job_to_a_default_class():
    """`gpu.service.routing.choose_gpu` against the classes a default deployment offers: every
    accepted size, frame count and GPU count lands on one of them (none is refused, none names a
    missing class)."""
    from vap_shared.gpu_contract import GenerationSettings

    from gpu.service.modal_settings import DEFAULT_GPUS
    from gpu.tools.plan import GPU_COUNTS, accepted_sizes, gpu_frame_counts

    routed: dict[int, set[str]] = {}
    for resolution, aspect, _, _ in accepted_sizes():
        for frames in gpu_frame_counts():
            settings = GenerationSettings(prompt="p", video_description="v", resolution=resolution,
                                          aspect_ratio=aspect, num_frames=frames)  # fmt: skip
            for gpus in GPU_COUNTS:
                routed.setdefault(gpus, set()).add(routing.choose_class(settings, gpus, DEFAULT_GPUS))
    assert routed == {1: {"H100!"}, 2: {"H100:2"}, 4: {"H100:4"}, 8: {"H100:8"}}


def test_plan_and_deployment_spellings_of_one_class_match():
    from gpu.service.modal_settings import offered_class

    offered = ["H100!", "H200", "H100:2", "H100!:8"]
    assert offered_class("H100!:2", offered) == "H100:2"
    assert offered_class("H100:8", offered) == "H100!:8"
    assert offered_class("H100", offered) == "H100!" and offered_class("H200", offered) == "H200"
    assert offered_class("H100!:4", offered) is None and offered_class("B200", offered) is None
    assert offered_class("not a gpu", offered) is None


def test_a_job_too_slow_for_one_run_goes_to_more_gpus_within_the_budget():
    """With the default budget's run limit, every accepted job routes to a class whose ESTIMATED
    generation fits one run: the default job stays on one H100, 720p/121 frames (estimated over the
    limit on one GPU) moves to the fewest GPUs that finish it; the sidecar's `gpus` is a minimum."""
    from vap_shared.budget import Budget
    from vap_shared.gpu_contract import GenerationSettings

    from gpu.service.generation import target_size
    from gpu.service.modal_settings import DEFAULT_GPUS, parse_gpu
    from gpu.tools.plan import accepted_sizes, gpu_frame_counts
    from gpu.tools.scaling import JobShape, estimate

    budget = Budget()
    limit = budget.run_s - budget.runner_margin_s - budget.upload_margin_s

    def route(resolution: str, aspect: str, frames: int, gpus: int = 1) -> int:
        settings = GenerationSettings(prompt="p", video_description="v", resolution=resolution,
                                      aspect_ratio=aspect, num_frames=frames)  # fmt: skip
        return parse_gpu(routing.choose_class(settings, gpus, DEFAULT_GPUS, run_limit_s=limit)).count

    assert route("480p", "16:9", 49) == 1
    slow = JobShape(1280, 720, 121, 50)
    assert estimate(slow, 1).total_s > limit  # the premise: one GPU would time out
    assert route("720p", "16:9", 121) == 2
    assert route("480p", "16:9", 49, gpus=4) == 4  # never fewer than asked
    for resolution, aspect, _, _ in accepted_sizes():
        width, height = target_size(aspect, resolution)  # type: ignore[arg-type]
        for frames in gpu_frame_counts():
            count = route(resolution, aspect, frames)
            assert estimate(JobShape(width, height, frames, 50), count).total_s <= limit
    # Without a limit (e.g. the local server) the requested count is kept.
    settings = GenerationSettings(prompt="p", video_description="v", resolution="720p", num_frames=121)
    assert parse_gpu(routing.choose_class(settings, 1, DEFAULT_GPUS)).count == 1
