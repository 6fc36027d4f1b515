"""A burst bigger than the GPU pool waits in SQS, not in the GPU's queue where the budget runs out.

The local stack with a short job budget (VAP_LOCAL_TIME_SCALE: 9000 s -> 18 s; the sweeper asks
about a job after 3 s of silence and stops it after 20 s), a pool of 2 GPU workers
(ModalContainers 2 -> capacity 4) with a slow fake engine, and 12 sidecars at once: every job
succeeds within the budget, the sweeper (run throughout) never has to stop one, at most 4 are ever
outstanding at the GPU, and the ones waiting show `queued` in status.json. Without the capacity
check all 12 queue at the GPU at once, and a longer burst outlives any budget there.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from stack_helpers import jobs_for, sidecar
from test_backend_faults import quiet
from vap_shared.budget import Budget

from gpu.service.engines.single import FakeEngine
from gpu.service.local_server import LocalGpuServer, start_local_gpu_server
from local_stack import LocalStack

pytestmark = pytest.mark.stack

POOL = 2  # GPU workers = ModalContainers
BURST = 12
TIME_SCALE = 0.002  # JobBudgetSeconds 9000 -> B 18 s
STEP_DELAY_S = 0.4  # 2 steps a job (the local default): each run takes about a second
# Sweeper outcomes that leave a job alone: asked its backend ("running"), or completed the
# notification of a job that had just finished ("notified"/"done").
LEFT_ALONE = {"running", "notified", "done", "not-due"}


class GpuPool:
    """The local GPU server as a pool of POOL containers, recording the most jobs ever
    outstanding at it: calls it has queued or running whose result the service has not stored
    yet. (A call whose result is stored is only waiting for the answer to its callback: the
    webhook frees the place before it answers.) Outstanding only grows at a submit, so the peak is
    measured exactly there."""

    def __init__(self, server: LocalGpuServer, stack: LocalStack) -> None:
        self.server = server
        self.calls: dict[str, str] = {}  # call id -> job id
        self.peak = 0
        self._lock = threading.Lock()
        self._stack = stack
        executor = server.executor
        submit = executor.submit

        def counting_submit(request: Any) -> str:
            with self._lock:
                call_id = submit(request)
                self.calls[call_id] = request.job_id
                outstanding = [c for c, job in self.calls.items() if self._outstanding(c, job)]
                self.peak = max(self.peak, len(outstanding))
                return call_id

        executor.submit = counting_submit  # type: ignore[method-assign]

    def _outstanding(self, call_id: str, job_id: str) -> bool:
        status = self.server.executor.status(call_id)
        if status is None or status.state not in ("queued", "running"):
            return False
        item = self._stack.client("dynamodb").get_item(
            TableName=self._stack.jobs_table, Key={"job_id": {"S": job_id}}, ConsistentRead=True
        )["Item"]
        return item["state"]["S"] not in ("succeeded", "failed", "cancelled")


@pytest.fixture
def pool(stack: LocalStack) -> Iterator[GpuPool]:
    key, secret = stack.modal_token
    # The GPU side derives its limits from the same (scaled) budget, as the Modal app does.
    budget = Budget(modal_containers=POOL, time_scale=TIME_SCALE)
    server = start_local_gpu_server(0, key, secret, "fake", workers=POOL, budget=budget)
    server.executor.engine = FakeEngine(step_delay_s=STEP_DELAY_S)
    try:
        yield GpuPool(server, stack)
    finally:
        server.stop()


def _state(stack: LocalStack, key: str) -> dict[str, Any] | None:
    items = jobs_for(stack, key)
    return {k: next(iter(v.values())) for k, v in items[0].items()} if items else None


def _status_phase(stack: LocalStack, job: dict[str, Any]) -> str | None:
    try:
        body = stack.s3.get_object(Bucket=stack.bucket, Key=job["output_prefix"] + "status.json")["Body"]
    except stack.s3.exceptions.NoSuchKey:
        return None
    return str(json.loads(body.read())["phase"])


def test_a_burst_bigger_than_the_pool_waits_its_turn_and_every_job_succeeds(
    stack: LocalStack, pool: GpuPool, folder: str, sample_media: dict[str, bytes]
) -> None:
    quiet(stack)
    env = {
        "MODAL_ENDPOINT_URL": pool.server.url.rstrip("/"),
        "MODAL_CONTAINERS": str(POOL),
        "VAP_LOCAL_TIME_SCALE": str(TIME_SCALE),
    }
    with stack.environment(**env):
        # Settle what earlier tests left outstanding at "Modal" (their GPU server is not this one),
        # so the pool starts empty.
        stack.run_sweeper()
        media = {f"{folder}/{name}": data for name, data in sample_media.items()}
        keys = [f"{folder}/burst-{i:02d}.json" for i in range(BURST)]
        stack.put_job(keys[0], sidecar(backend="modal"), media)
        for key in keys[1:]:
            stack.put_job(key, sidecar(backend="modal"))

        swept: dict[str, str] = {}
        queued_seen: set[str] = set()
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            states = {key: _state(stack, key) for key in keys}
            for key, job in states.items():
                if job and job["state"] == "received" and _status_phase(stack, job) == "queued":
                    queued_seen.add(key)
            report = stack.run_sweeper()
            ids = {job["job_id"] for job in states.values() if job}
            swept.update({j: o for j, o in report["jobs"].items() if j in ids})
            if all(job and job["state"] == "succeeded" for job in states.values()):
                break
            time.sleep(0.3)

    final = {key: _state(stack, key) for key in keys}
    reasons = {
        key: job and job.get("errors") for key, job in final.items() if not job or job["state"] != "succeeded"
    }
    assert {key: job and job["state"] for key, job in final.items()} == dict.fromkeys(keys, "succeeded"), (
        reasons
    )
    for key in keys:
        (note,) = stack.wait_for_notification(key, timeout_s=30)
        assert note.body["status"] == "succeeded" and note.body["backend"] == "modal"
    # The sweeper may ask about a job or finish one's notification; it never had to stop one.
    stopped = {j: o for j, o in swept.items() if o not in LEFT_ALONE}
    assert stopped == {}, swept
    assert len(pool.calls) == BURST  # every job ran once, on this pool
    assert 0 < pool.peak <= 2 * POOL, pool.peak
    assert len(queued_seen) >= BURST - 2 * POOL - 2, queued_seen  # the wait was visible
    # And the budget held: no job took longer than B from dispatch to its stored result.
    budget_s = Budget(time_scale=TIME_SCALE).total_s
    for job in final.values():
        assert job is not None
        took = _seconds(job["completed_at"]) - _seconds(job["dispatched_at"])
        assert took <= budget_s, (job["job_id"], took)


def _seconds(iso: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()
