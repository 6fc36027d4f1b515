"""The stack's Modal stand-in fails like Modal by default: some submits and status requests get a
transient 5xx, and some runs are preempted and run again. (Off with VAP_LOCAL_GPU_FAULTS=0, these
fail; the service's handling of both is tested in test_gpu_preemption.py and
tests/unit/test_modal_submit_retry.py.)"""

from __future__ import annotations

import httpx
import pytest

from local_stack import LocalStack

pytestmark = pytest.mark.stack


def test_some_status_requests_get_a_transient_5xx(stack: LocalStack) -> None:
    assert stack.gpu is not None
    headers = {"Modal-Key": stack.modal_token[0], "Modal-Secret": stack.modal_token[1]}
    codes = []
    with httpx.Client(base_url=stack.gpu.url.rstrip("/"), headers=headers, timeout=10) as client:
        for index in range(600):
            codes.append(client.get(f"/status/fc-unknown-{index}").status_code)
    failed = [c for c in codes if c >= 500]
    assert failed and set(failed) <= {502, 503}
    assert len(failed) < len(codes) / 5 and 404 in codes  # now and then, not always


def test_some_runs_are_preempted_once(stack: LocalStack) -> None:
    assert stack.gpu is not None
    faults = stack.gpu.faults
    stops = [faults.at_step(f"job-{index}", 1, 50) for index in range(400)]
    assert any(step is not None for step in stops)
    assert all(step is None or 1 <= step < 50 for step in stops)
    # At most once per job (max_preemptions): a second attempt always runs to its end.
    assert all(faults.at_step(f"job-{index}", 2, 50) is None for index in range(400))
