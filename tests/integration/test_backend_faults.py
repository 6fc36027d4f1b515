"""Backend faults on the local stack: a Modal endpoint that is down, slow or failing falls back to
fal; fal's own failures end the job with fal's reason; both down fails the job with both reasons.
(Modal refusing the connection, and an ERROR webhook, are in test_fallback.py.)"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from stack_helpers import dlq_depth, get_json, settle, sidecar

from local_stack import LocalStack
from local_stack.fal_server import FalServer
from local_stack.moto_server import AwsFault
from local_stack.net import LOOPBACK

pytestmark = pytest.mark.stack


class FaultyModal:
    """A loopback stand-in for the Modal endpoint that answers `status` or hangs `delay_s`."""

    def __init__(self, status: int = 503, delay_s: float = 0.0) -> None:
        self.status, self.delay_s, self.hits = status, delay_s, 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                outer.hits += 1
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if outer.delay_s:
                    time.sleep(outer.delay_s)
                body = b'{"detail": "injected"}'
                try:
                    self.send_response(outer.status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except OSError:
                    pass  # the client gave up (timeout)

        self.server = ThreadingHTTPServer((LOOPBACK, 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://{LOOPBACK}:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def quiet(stack: LocalStack, timeout_s: float = 30.0) -> None:
    """Wait until ingest is idle: `stack.environment` resets the handlers' cached clients, and an
    invocation already running (e.g. the stack's s3:TestEvent right after start) could otherwise
    cache clients built from the previous environment."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if stack.queue_depth(stack.ingest_queue_url) == 0 and not stack.ingest_poller.busy:
            return
        time.sleep(0.1)


@pytest.fixture
def media(folder: str, sample_media: dict[str, bytes]) -> dict[str, bytes]:
    return {f"{folder}/{n}": d for n, d in sample_media.items()}


@pytest.fixture
def faulty_modal(request: pytest.FixtureRequest) -> Iterator[FaultyModal]:
    server = FaultyModal(**request.param)
    yield server
    server.close()


@pytest.mark.parametrize(
    ("faulty_modal", "reason"),
    [
        ({"status": 503}, "unavailable (HTTP 503)"),
        ({"status": 500}, "unavailable (HTTP 500)"),
        ({"status": 401}, "authentication failed (HTTP 401)"),
        # Longer than the submit's 10 s read timeout.
        ({"status": 202, "delay_s": 12.0}, "timed out"),
    ],
    indirect=["faulty_modal"],
    ids=["503", "500", "401", "slow"],
)
def test_modal_fault_falls_back_to_fal(
    stack: LocalStack, media: dict[str, bytes], folder: str, faulty_modal: FaultyModal, reason: str
) -> None:
    key = f"{folder}/modal-fault.json"
    quiet(stack)
    with stack.environment(MODAL_ENDPOINT_URL=faulty_modal.url):
        stack.put_job(key, sidecar(backend="auto"), media)
        (note,) = stack.wait_for_notification(key, timeout_s=120)
    body = note.body
    assert body["status"] == "succeeded", body
    assert (body["backend"], body["fallback_from"]) == ("fal", "modal")
    assert faulty_modal.hits >= 1
    meta = get_json(stack, body["metadata_key"])
    assert reason in meta["fallback_reason"], meta["fallback_reason"]


def test_fal_422_at_submit_fails_with_fals_reason(
    stack: LocalStack, fal: FalServer, media: dict[str, bytes], folder: str
) -> None:
    fal.behaviour.submit_status = 422
    key = f"{folder}/fal-422.json"
    stack.put_job(key, sidecar(backend="fal"), media)
    (note,) = stack.wait_for_notification(key, timeout_s=60)
    assert note.body["status"] == "failed"
    assert [e["message"] for e in note.body["errors"]] == ["fal.ai rejected the request: injected failure"]


def test_fal_payload_error_fails_with_fals_reason(
    stack: LocalStack, fal: FalServer, media: dict[str, bytes], folder: str
) -> None:
    fal.behaviour.payload_error = True
    key = f"{folder}/fal-payload-error.json"
    stack.put_job(key, sidecar(backend="fal"), media)
    (note,) = stack.wait_for_notification(key, timeout_s=60)
    assert note.body["status"] == "failed" and note.body["backend"] == "fal"
    (error,) = note.body["errors"]
    assert "output could not be serialised" in error["message"]
    assert get_json(stack, note.body["error_report_key"])["errors"] == note.body["errors"]


def test_fal_error_webhook_carries_fals_reason(
    stack: LocalStack, fal: FalServer, media: dict[str, bytes], folder: str
) -> None:
    fal.behaviour.webhook_status = "ERROR"
    key = f"{folder}/fal-error-reason.json"
    stack.put_job(key, sidecar(backend="fal"), media)
    (note,) = stack.wait_for_notification(key, timeout_s=60)
    assert note.body["status"] == "failed"
    assert all(
        e["message"].startswith(("fal.ai", "Generation failed on fal.ai")) for e in note.body["errors"]
    )


def test_fal_5xx_is_retried_then_fails_with_fals_reason(
    stack: LocalStack, fal: FalServer, media: dict[str, bytes], folder: str
) -> None:
    fal.behaviour.submit_status = 503
    before = dlq_depth(stack)
    key = f"{folder}/fal-503.json"
    stack.put_job(key, sidecar(backend="fal"), media)
    (note,) = stack.wait_for_notification(key, timeout_s=120)
    messages = [e["message"] for e in note.body["errors"]]
    assert note.body["status"] == "failed"
    assert "The fal.ai backend could not take the job: unavailable (HTTP 503)." in messages
    assert any(m.startswith("Gave up after") for m in messages)
    assert dlq_depth(stack) == before  # a clear failure, not a dead letter


def test_both_backends_down_fails_with_both_reasons(
    stack: LocalStack, fal: FalServer, media: dict[str, bytes], folder: str
) -> None:
    fal.behaviour.submit_status = 502
    dead = FaultyModal(status=503)
    key = f"{folder}/both-down.json"
    quiet(stack)
    try:
        with stack.environment(MODAL_ENDPOINT_URL=dead.url):
            stack.put_job(key, sidecar(backend="auto"), media)
            (note,) = stack.wait_for_notification(key, timeout_s=120)
    finally:
        dead.close()
    messages = [e["message"] for e in note.body["errors"]]
    assert note.body["status"] == "failed" and note.body["backend"] is None
    assert "The Modal backend could not take the job: unavailable (HTTP 503)." in messages
    assert "The fal.ai backend could not take the job: unavailable (HTTP 502)." in messages


# ---------------------------------------------------------------------------------------------- storage


@pytest.mark.parametrize("operation", ["UploadPart", "PutObject"])
def test_s3_error_while_storing_a_fal_result_is_retried_without_partial_objects(
    stack: LocalStack, fal: FalServer, media: dict[str, bytes], folder: str, operation: str
) -> None:
    """S3 fails while the store function stores the result (the video part, or metadata.json), through
    the SDK's own retries: the webhook had answered fal at once, the store request comes back from the
    store queue after its retry delay, and the job ends stored once and notified once."""
    outputs = f"outputs/{folder.removeprefix('inbox/')}/"
    fault = AwsFault(
        "s3",
        operation,
        match=lambda r: (
            r.key.startswith(outputs) and (operation == "UploadPart" or r.key.endswith("metadata.json"))
        ),
        times=3,  # every attempt of one SDK call (standard retry mode): the store attempt fails
    )
    quiet(stack)
    key = f"{folder}/s3-fault.json"
    # The stack's time scale shortens the store queue's retry delay (30 s) to well under a second.
    with stack.environment(VAP_LOCAL_TIME_SCALE="0.01"), stack.aws_fault(fault):
        stack.put_job(key, sidecar(backend="fal"), media)
        (note,) = stack.wait_for_notification(key, timeout_s=120)
    assert len(fault.hits) == 3, "the fault was not injected"
    assert note.body["status"] == "succeeded", note.body
    (request,) = [r for r in fal.requests.values() if r.webhook_url and note.body["job_id"] in r.webhook_url]
    assert request.deliveries[-1] == 200 and 500 not in request.deliveries, request.deliveries
    prefix = note.body["output_key"].rsplit("/", 1)[0] + "/"
    listing = stack.s3.list_objects_v2(Bucket=stack.bucket, Prefix=prefix).get("Contents", [])
    names = sorted(o["Key"].rsplit("/", 1)[1] for o in listing)
    assert {"video.mp4", "metadata.json"} <= set(names), names
    head = stack.s3.head_object(Bucket=stack.bucket, Key=note.body["output_key"])
    assert head["ContentLength"] > 0
    uploads = stack.s3.list_multipart_uploads(Bucket=stack.bucket, Prefix=prefix).get("Uploads", [])
    assert uploads == [], "an aborted upload must not linger"
    settle(1.0)
    assert len(stack.notifications_for(key)) == 1
