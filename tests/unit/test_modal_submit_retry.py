"""A read timeout on Modal's `POST /submit`, against a real local HTTP server.

The submit may have reached Modal (which may have queued the job), so falling back to fal at once
could run the job on two GPUs. The client asks Modal once more with the same job id (the GPU API
answers a repeated job id with the same call id) and falls back only if that times out too.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import boto3
import httpx
import pytest
from vap_shared.backends.base import DispatchRequest
from vap_shared.backends.dispatch import dispatch
from vap_shared.config import Settings
from vap_shared.gpu_contract import GenerationSettings
from vap_shared.media import MediaRef
from vap_shared.runtime import Runtime
from vap_shared.secrets import Secrets

READ_TIMEOUT_S = 0.4
STALL_S = 1.5  # longer than the read timeout


class GpuAndFal:
    """Modal's GPU API under `/modal`, fal's queue under `/fal`; the first `stalls` submits to Modal
    are answered only after `STALL_S` (the client has given up by then)."""

    def __init__(self, stalls: int) -> None:
        self.stalls = stalls
        self.modal_bodies: list[bytes] = []
        self.fal_bodies: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self.path == "/modal/submit":
                    with outer.lock:
                        outer.modal_bodies.append(body)
                        stall = len(outer.modal_bodies) <= outer.stalls
                    if stall:
                        time.sleep(STALL_S)
                    # Idempotent on job_id, as the GPU API is: the same job id, the same call id.
                    answer = {"call_id": "fc-" + json.loads(body)["job_id"]}
                    self._send(202, answer)
                elif self.path.startswith("/fal/fal-ai/video-as-prompt"):
                    outer.fal_bodies.append(json.loads(body))
                    self._send(200, {"request_id": "req-1", "status": "IN_QUEUE"})
                else:
                    self._send(404, {"detail": "Not Found"})

            def _send(self, status: int, answer: dict[str, Any]) -> None:
                data = json.dumps(answer).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:
                    pass  # the client gave up waiting

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def modal_job_ids(self) -> list[str]:
        return [json.loads(b)["job_id"] for b in self.modal_bodies]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def runtime(modal_url: str, fal_url: str) -> Runtime:
    """The Lambdas' runtime with its real httpx client, pointed at loopback services."""
    settings = Settings(
        bucket_name="vap-bucket",
        jobs_table="t",
        topic_arn="",
        modal_endpoint_url=modal_url,
        fal_queue_url=fal_url,
        signing_secret_arn="signing",
        fal_key_secret_arn="fal",
        modal_token_secret_arn="modal",
        allow_http_loopback=True,
    )
    values = {"signing": "stack-secret", "fal": "fal-key", "modal": json.dumps({"key": "k", "secret": "s"})}
    session = boto3.session.Session(
        aws_access_key_id="testing-key-id", aws_secret_access_key="fake", region_name="eu-west-1"
    )
    return Runtime.build(settings, session=session, secrets=Secrets(values.__getitem__))


def request(job_id: str = "20261125T182301Z-0123456789") -> DispatchRequest:
    def media(field: str, url: str) -> MediaRef:
        return MediaRef(field, "https", url, url=url)

    return DispatchRequest(
        job_id=job_id,
        settings=GenerationSettings(prompt="p", video_description="d", seed=7),
        video=media("video_url", "https://media.example.org/clip.mp4"),
        image=media("image_url", "https://media.example.org/face.png"),
        webhook_base_url="https://hooks.example.org",
    )


@pytest.fixture(autouse=True)
def short_read_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        "vap_shared.backends.modal.SUBMIT_TIMEOUT", httpx.Timeout(READ_TIMEOUT_S, connect=2.0, pool=2.0)
    )
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)


@pytest.fixture
def services(request: pytest.FixtureRequest) -> Iterator[GpuAndFal]:
    server = GpuAndFal(stalls=request.param)
    yield server
    server.close()


@pytest.mark.parametrize("services", [1], indirect=True)
def test_a_timed_out_submit_is_retried_with_the_same_job_id_and_stays_on_modal(services: GpuAndFal) -> None:
    rt = runtime(f"{services.url}/modal", f"{services.url}/fal")
    outcome = dispatch(request(), "auto", rt.backends)
    assert (outcome.dispatch.backend, outcome.dispatch.call_id) == ("modal", "fc-20261125T182301Z-0123456789")
    assert outcome.fallback_from is None
    assert services.modal_job_ids() == ["20261125T182301Z-0123456789"] * 2
    # The very same request both times (same job id, URLs and callback key): one job at Modal.
    assert services.modal_bodies[0] == services.modal_bodies[1]
    assert services.fal_bodies == []


@pytest.mark.parametrize("services", [2], indirect=True)
def test_a_second_timeout_falls_back_to_fal(services: GpuAndFal) -> None:
    rt = runtime(f"{services.url}/modal", f"{services.url}/fal")
    outcome = dispatch(request(), "auto", rt.backends)
    assert outcome.dispatch.backend == "fal" and outcome.fallback_from == "modal"
    assert outcome.fallback_reason is not None and "timed out (ReadTimeout)" in outcome.fallback_reason
    assert "tried 2 times with the same job id" in outcome.fallback_reason
    assert services.modal_job_ids() == ["20261125T182301Z-0123456789"] * 2
    assert len(services.fal_bodies) == 1 and services.fal_bodies[0]["seed"] == 7


@pytest.mark.parametrize("services", [0], indirect=True)
def test_a_submit_that_never_connected_falls_back_at_once(services: GpuAndFal) -> None:
    closed = ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler)
    port = closed.server_address[1]
    closed.server_close()  # nothing listens there: the request never reached Modal
    rt = runtime(f"http://127.0.0.1:{port}/modal", f"{services.url}/fal")
    outcome = dispatch(request(), "auto", rt.backends)
    assert outcome.dispatch.backend == "fal"
    assert outcome.fallback_reason == "connection failed (ConnectError)"


def test_a_transient_5xx_is_retried_with_the_same_job_id_and_stays_on_modal() -> None:
    """The local GPU server answers its first submit 502 after spawning the job (Modal's web endpoints
    fail now and then, sometimes after the request took effect): the retry gets the same call."""
    from gpu.service.local_server import ModalFaults, start_local_gpu_server

    faults = ModalFaults(error_rate=1.0, error_after_share=1.0)
    gpu = start_local_gpu_server(0, "k", "s", "fake", faults=faults)
    fal = GpuAndFal(stalls=0)
    try:
        submitted: list[str] = []
        original = gpu.executor.submit

        def counting(*args: Any, **kwargs: Any) -> Any:
            submitted.append("submit")
            faults.error_rate = 0.0  # the blip passes: the retry is answered
            return original(*args, **kwargs)

        gpu.executor.submit = counting  # type: ignore[method-assign]
        rt = runtime(gpu.url.rstrip("/"), f"{fal.url}/fal")
        outcome = dispatch(request(), "auto", rt.backends)
        assert outcome.dispatch.backend == "modal" and outcome.fallback_from is None
        assert fal.fal_bodies == [] and submitted  # the first submit had spawned the job
        status = rt.modal.status(outcome.dispatch.call_id)
        assert status is not None and status.call_id == outcome.dispatch.call_id
    finally:
        gpu.stop()
        fal.close()
