"""A GPU run preempted mid-way on the local Modal stand-in runs again on a fresh worker, resumes from
the denoising state it saved in the job's own storage, and the job succeeds with one notification."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from stack_helpers import jobs_for, sidecar

from gpu.service.engines.single import DownscaledEngine, VideoEngine
from gpu.vap.tiny import build_tiny_pipeline
from local_stack import LocalStack

pytestmark = pytest.mark.stack

STEPS = 4
PREEMPT_AT = 3  # steps 1 and 2 are saved when the run stops at step 3


def _small_tiny_engine() -> DownscaledEngine:
    # The real VAP code path (tiny random weights) at 64 px: the test's time goes to the flow.
    return DownscaledEngine(VideoEngine(build_tiny_pipeline(), "cpu", weights="tiny"), max_side=64)


@pytest.fixture
def preempting_gpu(stack: LocalStack) -> Iterator[Any]:
    gpu = stack.gpu
    assert gpu is not None
    executor, faults = gpu.executor, gpu.faults
    before = (
        executor.engine, executor.engine_factory, executor.config.default_steps,
        executor.config.checkpoint_every_s, faults.preempt_rate, faults.preempt_step,
    )  # fmt: skip
    executor.engine, executor.engine_factory = _small_tiny_engine(), _small_tiny_engine
    executor.config.default_steps, executor.config.checkpoint_every_s = STEPS, 1e-6  # save every step
    faults.preempt_rate, faults.preempt_step = 1.0, PREEMPT_AT
    try:
        yield gpu
    finally:
        (
            executor.engine, executor.engine_factory, executor.config.default_steps,
            executor.config.checkpoint_every_s, faults.preempt_rate, faults.preempt_step,
        ) = before  # fmt: skip


def test_a_preempted_gpu_run_resumes_and_the_job_succeeds_once(
    stack: LocalStack, preempting_gpu: Any, sample_media: dict[str, bytes], folder: str
) -> None:
    key = f"{folder}/preempted.json"
    media = {f"{folder}/{name}": data for name, data in sample_media.items()}
    stack.put_job(key, sidecar(backend="modal"), media)
    (note,) = stack.wait_for_notification(key, timeout_s=240)
    assert note.body["status"] == "succeeded", note.body

    (job,) = jobs_for(stack, key)
    call_id = job["backend_call_id"]["S"]
    status = preempting_gpu.executor.status(call_id)
    assert status is not None and status.state == "succeeded" and status.result is not None
    # The second attempt (same call id) continued after the two saved steps.
    assert status.result.timings["resumed_at_step"] == PREEMPT_AT - 1
    assert preempting_gpu.executor._calls[call_id].attempts == 2
    # The state lived in the job's own storage and was emptied once the job was done.
    state = stack.s3.head_object(Bucket=stack.bucket, Key=f"work/{note.body['job_id']}/resume.bin")
    assert state["ContentLength"] == 0
    assert stack.notifications_for(key) == [note]  # one notification, not one per attempt
    assert job["state"]["S"] == "succeeded"
