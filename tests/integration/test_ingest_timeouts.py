"""Ingest against a slow backend on the local stack: a full batch never runs past the function's
timeout (Lambda would kill it and return every record with a higher receive count, toward the DLQ);
what cannot finish in time is handed back to the queue and dispatched by the next invocations,
each job submitted once."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from stack_helpers import dlq_depth, jobs_for, sidecar

from local_stack import LocalStack
from local_stack.sqs_poller import to_lambda_record

pytestmark = pytest.mark.stack

INGEST = "IngestFunction"
# Modal accepts each job after 8.5 s (inside the submit's 10 s read timeout): five records in one
# batch need over 42 s, more than the 40 s this test gives the function.
SUBMIT_DELAY_S = 8.5
TIMEOUT_S = 40
ATTEMPTS_ATTRIBUTE = "vap_attempts"


class SlowModal:
    """The GPU API's /submit, answering after a delay; a repeated job id gets the same call id."""

    def __init__(self, delay_s: float) -> None:
        self.submits: dict[str, int] = {}
        lock = threading.Lock()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers.get("content-length", 0))) or b"{}")
                if self.path != "/submit":
                    self._answer(404, {"detail": "not found"})
                    return
                job_id = str(body.get("job_id"))
                with lock:
                    owner.submits[job_id] = owner.submits.get(job_id, 0) + 1
                time.sleep(delay_s)
                self._answer(202, {"call_id": f"slow-{job_id}"})

            def _answer(self, status: int, payload: dict[str, Any]) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def slow_modal(stack: LocalStack, monkeypatch: pytest.MonkeyPatch) -> Iterator[SlowModal]:
    """Modal is slow; the ingest function gets a 40 s timeout; the event source mapping is paused
    so the test forms the batches itself (five records in one, as SQS does under a backlog)."""
    modal = SlowModal(SUBMIT_DELAY_S)
    monkeypatch.setattr(stack.functions[INGEST], "timeout_s", TIMEOUT_S)
    poller = stack.ingest_poller

    def paused() -> list[dict[str, Any]]:
        time.sleep(0.2)
        return []

    monkeypatch.setattr(poller, "_receive", paused)
    time.sleep(poller.wait_seconds + 0.5)  # a receive already waiting ends empty-handed
    try:
        with stack.environment(MODAL_ENDPOINT_URL=modal.url, MODAL_CONTAINERS="10", DEFAULT_BACKEND="auto"):
            yield modal
    finally:
        modal.close()


def _receive(stack: LocalStack, count: int) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = []
    deadline = time.monotonic() + 30
    while len(messages) < count and time.monotonic() < deadline:
        messages += stack.sqs.receive_message(
            QueueUrl=stack.ingest_queue_url,
            MaxNumberOfMessages=count - len(messages),
            WaitTimeSeconds=1,
            AttributeNames=["All"],
            MessageAttributeNames=["All"],
        ).get("Messages", [])
    return messages


def _poll_once(stack: LocalStack, messages: list[dict[str, Any]]) -> tuple[list[str], float]:
    """One batch through the ingest function, as the event source mapping runs it: the ids it
    reports failed (left on the queue) and how long the invocation ran; the rest are deleted."""
    queue_arn = stack.sqs.get_queue_attributes(QueueUrl=stack.ingest_queue_url, AttributeNames=["QueueArn"])[
        "Attributes"
    ]["QueueArn"]
    event = {"Records": [to_lambda_record(m, queue_arn, stack.region) for m in messages]}
    started = time.monotonic()
    response = stack.functions[INGEST].invoke(event)
    ran = time.monotonic() - started
    failed = [f["itemIdentifier"] for f in response.get("batchItemFailures", [])]
    done = [m for m in messages if m["MessageId"] not in failed]
    if done:
        stack.sqs.delete_message_batch(
            QueueUrl=stack.ingest_queue_url,
            Entries=[{"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(done)],
        )
    return failed, ran


def _job(stack: LocalStack, key: str) -> dict[str, Any] | None:
    items = jobs_for(stack, key)
    return {k: next(iter(v.values())) for k, v in items[0].items()} if items else None


def _cancel(stack: LocalStack, job_ids: list[str]) -> None:
    """The slow Modal never runs anything: end the jobs so they hold no Modal capacity afterwards."""
    dynamodb = stack.client("dynamodb")
    for job_id in job_ids:
        dynamodb.update_item(
            TableName=stack.jobs_table,
            Key={"job_id": {"S": job_id}},
            UpdateExpression="SET #s = :c",
            ExpressionAttributeNames={"#s": "state"},
            ExpressionAttributeValues={":c": {"S": "cancelled"}},
        )


def test_a_slow_backend_with_a_full_batch_stays_inside_the_timeout(
    stack: LocalStack, sample_media: dict[str, bytes], folder: str, slow_modal: SlowModal
) -> None:
    media = {f"{folder}/{name}": data for name, data in sample_media.items()}
    keys = [f"{folder}/job-{n}.json" for n in range(5)]
    for n, key in enumerate(keys):
        stack.put_job(key, sidecar(seed=100 + n), media if n == 0 else None)
    batch = _receive(stack, 5)
    assert len(batch) == 5

    failed, ran = _poll_once(stack, batch)
    assert failed == [] and ran < TIMEOUT_S, f"ran {ran:.1f} s of a {TIMEOUT_S} s timeout"
    handed_back = _receive(stack, 4)
    assert len(handed_back) == 4
    for message in handed_back:  # not counted as attempts: they never started
        assert message["MessageAttributes"][ATTEMPTS_ATTRIBUTE]["StringValue"] == "0"
        assert message["Attributes"]["ApproximateReceiveCount"] == "1"

    # The next invocations (the mapping runs up to MaxConcurrency at once) dispatch the rest.
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda m: _poll_once(stack, [m]), handed_back))
    assert all(failed == [] and ran < TIMEOUT_S for failed, ran in results), results

    jobs = [_job(stack, key) for key in keys]
    assert all(job is not None and job["state"] == "dispatched" for job in jobs), jobs
    assert {job["backend"] for job in jobs if job} == {"modal"}
    # Each job was submitted once, none fell back, nothing is left or dead-lettered.
    assert sorted(slow_modal.submits.values()) == [1] * 5
    assert stack.queue_depth(stack.ingest_queue_url) == 0 and dlq_depth(stack) == 0
    _cancel(stack, [job["job_id"] for job in jobs if job])
