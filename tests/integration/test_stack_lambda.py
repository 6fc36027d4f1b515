"""The local stack runs functions as Lambda does: execution environments that are processes with the
function's own environment, reused while warm, replaced after a crash, killed at the Timeout (the
invocation reported as Lambda reports it, an SQS batch coming back, a Function URL answering 502),
with a real deadline in the context and one invocation per environment at a time.

Each test here fails with `VAP_LOCAL_LAMBDA_ISOLATION=thread` (handlers in the test process)."""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from stack_helpers import probe_function, wait_until

from local_stack import LocalStack
from local_stack.function_url import FunctionUrlServer
from local_stack.lambda_runtime import FunctionError, InvocationTimeout, LambdaFunction, RuntimeExit
from local_stack.sqs_poller import SqsPoller

pytestmark = pytest.mark.stack


@pytest.fixture
def probe(stack: LocalStack) -> Iterator[LambdaFunction]:
    function = probe_function(stack, timeout_s=1.0, PROBE_SLOW_S="3", PROBE_MARK="probe-only")
    yield function
    function.stop()


def test_a_function_runs_in_its_own_process_with_only_its_own_environment(
    stack: LocalStack, probe: LambdaFunction
) -> None:
    os.environ["HARNESS_ONLY"] = "the test process's"
    try:
        seen = probe.invoke(
            {"action": "echo", "variables": ["PROBE_MARK", "HARNESS_ONLY", "AWS_LAMBDA_FUNCTION_NAME"]}
        )
    finally:
        del os.environ["HARNESS_ONLY"]
    assert seen["pid"] != os.getpid()
    assert seen["env"] == {
        "PROBE_MARK": "probe-only",
        "HARNESS_ONLY": None,
        "AWS_LAMBDA_FUNCTION_NAME": "probe",
    }
    # The template's functions too: each environment has its own function's variables only.
    ingest = stack.functions["IngestFunction"].effective_environment()
    assert "FAL_JWKS_URL" not in ingest and ingest["POWERTOOLS_SERVICE_NAME"] == "vap-ingest"


def test_a_warm_environment_is_reused_and_a_crashed_one_replaced(probe: LambdaFunction) -> None:
    first = probe.invoke({"action": "echo"})
    again = probe.invoke({"action": "echo"})
    assert (again["pid"], again["invocations"]) == (first["pid"], first["invocations"] + 1)  # warm
    with pytest.raises(FunctionError) as raised:
        probe.invoke({"action": "raise"})
    assert raised.value.payload["errorType"] == "ValueError"
    assert probe.invoke({"action": "echo"})["pid"] == first["pid"]  # a handler's error keeps it
    with pytest.raises(RuntimeExit) as crashed:
        probe.invoke({"action": "exit"})
    assert crashed.value.error_type == "Runtime.ExitError" and "exit status 3" in str(crashed.value)
    fresh = probe.invoke({"action": "echo"})
    assert fresh["pid"] != first["pid"] and fresh["invocations"] == 1  # a new environment, cold


def test_an_invocation_past_its_timeout_is_killed_and_its_environment_replaced(probe: LambdaFunction) -> None:
    before = probe.invoke({"action": "echo"})
    started = time.monotonic()
    with pytest.raises(InvocationTimeout) as raised:
        probe.invoke({"action": "sleep", "seconds": 30})
    assert time.monotonic() - started < 10  # killed, not waited for
    assert "Task timed out after 1.00 seconds" in str(raised.value)
    assert any("Task timed out after 1.00 seconds" in line for line in probe.log.lines())
    assert (probe.timeouts, probe.errors) == (1, 1)
    after = probe.invoke({"action": "echo"})
    assert after["pid"] != before["pid"] and after["invocations"] == 1


def test_the_remaining_time_is_the_invocation_deadline(probe: LambdaFunction) -> None:
    at_start = probe.invoke({"action": "echo"})["remaining_ms"]
    later = probe.invoke({"action": "echo", "wait_s": 0.4})["remaining_ms"]
    assert 800 < at_start <= 1000
    assert later <= at_start - 350


def test_the_function_log_goes_to_the_log_and_its_metrics_to_the_metric_log(
    stack: LocalStack, probe: LambdaFunction
) -> None:
    name = f"ProbeMetric{uuid.uuid4().hex[:6]}"
    probe.log.metrics = stack.metric_log.write
    probe.invoke({"action": "metric", "name": name})
    assert any(name in doc for doc in stack.metric_log.documents())
    with pytest.raises(FunctionError):
        probe.invoke({"action": "raise"})
    assert any("ValueError: the probe was asked to fail" in line for line in probe.log.lines())


@pytest.mark.parametrize("body", ["slow-once", "exit-once"])
def test_a_killed_or_crashed_batch_comes_back_whole_with_its_receive_count_raised(
    stack: LocalStack, probe: LambdaFunction, body: str
) -> None:
    """The first invocation of a batch is killed at the Timeout (or its process dies): nothing of the
    batch is deleted, every message comes back after the visibility timeout with receive count 2,
    and the next invocation gets them."""
    sqs = stack.sqs
    url = sqs.create_queue(QueueName=f"probe-{uuid.uuid4().hex[:8]}", Attributes={"VisibilityTimeout": "2"})[
        "QueueUrl"
    ]
    arn = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    sqs.send_message_batch(
        QueueUrl=url, Entries=[{"Id": "0", "MessageBody": body}, {"Id": "1", "MessageBody": "plain"}]
    )
    poller = SqsPoller(
        sqs, url, arn, stack.region, probe, batch_size=10, max_concurrency=1, batching_window_s=1
    )
    poller.start()
    try:
        wait_until(lambda: stack.queue_depth(url) == 0, timeout_s=30)
    finally:
        poller.stop()
    seen = [json.loads(line) for line in probe.log.lines() if line.startswith('{"seen"')]
    counts = {(s["seen"], s["count"]) for s in seen}
    assert {(body, 1), ("plain", 1), (body, 2), ("plain", 2)} <= counts, seen
    assert poller.stats.failed >= 2 and poller.stats.deleted >= 2


def test_the_function_url_answers_502_when_the_function_times_out(probe: LambdaFunction) -> None:
    server = FunctionUrlServer(probe)
    server.start()
    try:
        ok = httpx.post(server.url, json={"action": "echo"}, timeout=30)
        killed = httpx.post(server.url, json={"action": "sleep", "seconds": 30}, timeout=30)
    finally:
        server.stop()
    assert ok.status_code == 200
    assert killed.status_code == 502
    assert probe.timeouts == 1


def test_one_invocation_per_environment_and_reserved_concurrency_throttles(stack: LocalStack) -> None:
    function = probe_function(stack, timeout_s=10.0)
    function.reserved_concurrency = 1
    server = FunctionUrlServer(function)
    server.start()
    results: list[Any] = []
    try:
        first = threading.Thread(
            target=lambda: results.append(
                httpx.post(server.url, json={"action": "echo", "wait_s": 2}, timeout=30)
            )
        )
        first.start()
        wait_until(lambda: function.environments == 1 and function.invocations == 1)
        throttled = httpx.post(server.url, json={"action": "echo"}, timeout=30)
        first.join()
        function.reserved_concurrency = None
        parallel = [
            threading.Thread(
                target=lambda: results.append(
                    httpx.post(server.url, json={"action": "echo", "wait_s": 1}, timeout=30)
                )
            )
            for _ in range(3)
        ]
        for thread in parallel:
            thread.start()
        for thread in parallel:
            thread.join()
    finally:
        server.stop()
        function.stop()
    assert throttled.status_code == 429 and function.throttles == 1
    pids = [json.loads(r.text)["pid"] for r in results[1:]]
    assert len(set(pids)) == 3  # three at once: three environments, never two invocations in one


def test_stack_environment_and_the_sweepers_time_scale_reach_new_environments(stack: LocalStack) -> None:
    sweeper = stack.functions["SweeperFunction"]
    with stack.environment(MODAL_ENDPOINT_URL="http://127.0.0.1:9"):
        assert all(
            f.effective_environment()["MODAL_ENDPOINT_URL"] == "http://127.0.0.1:9"
            for f in stack.functions.values()
        )
        stack.run_sweeper(time_scale=0.5)
        assert sweeper.overrides == {"MODAL_ENDPOINT_URL": "http://127.0.0.1:9"}
    assert (
        stack.functions["IngestFunction"].effective_environment()["MODAL_ENDPOINT_URL"]
        != "http://127.0.0.1:9"
    )
    assert sweeper.overrides == {}
