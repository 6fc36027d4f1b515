"""Load (the 100-job version of `python -m bench.load`): sidecars dropped at once all reach a
terminal state, none is lost or notified twice, and dispatch concurrency stays within the cap."""

from __future__ import annotations

import pytest

from bench.load import run_load
from local_stack import LocalStack

pytestmark = pytest.mark.stack


def test_100_jobs_at_once(stack: LocalStack) -> None:
    result = run_load(stack, 100, backend="fal", timeout_s=300)
    summary = result.summary()
    assert not result.lost, summary
    assert not result.notified_twice, summary
    assert not result.not_notified, summary
    assert result.states == {"succeeded": 100}, summary
    assert result.max_dispatch_concurrency <= result.cap, summary
    assert result.max_ingest_in_flight <= result.cap, summary
    assert len(result.upload_to_dispatch_s) == 100 and min(result.upload_to_dispatch_s) >= 0, summary
    assert result.ok
