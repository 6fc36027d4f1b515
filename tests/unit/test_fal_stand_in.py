"""The local fal server delivers webhooks as fal does: a delivery not answered in time has failed,
a failed one is retried on fal's schedule (10 times over about 2 hours, time-scaled), and a
delivery correctly signed for another fal account can be sent to any URL."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Any

import httpx
import pytest
from vap_shared.fal_webhook import JwksCache, verify_fal_webhook

from local_stack.fal_server import OTHER_USER_ID, RETRY_DELAYS_S, USER_ID, FalBehaviour, FalRequest, FalServer
from local_stack.net import LoopbackServer

KEY = "fal-test-key"
SCALE = 1e-4  # fal's 2-hour schedule in under a second


@dataclass
class Receiver:
    """A webhook endpoint: answers `statuses` in turn (then 200), after `delays` (s)."""

    statuses: list[int] = field(default_factory=list)
    delays: list[float] = field(default_factory=list)
    received: list[dict[str, Any]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def handler(self) -> type[BaseHTTPRequestHandler]:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with outer.lock:
                    n = len(outer.received)
                    outer.received.append(
                        {
                            "path": self.path,
                            "headers": {k.lower(): v for k, v in self.headers.items()},
                            "body": body,
                        }
                    )
                    status = outer.statuses[n] if n < len(outer.statuses) else 200
                    delay = outer.delays[n] if n < len(outer.delays) else 0.0
                time.sleep(delay)
                try:
                    self.send_response(status)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                except OSError:
                    pass  # the sender gave up waiting

        return Handler


@pytest.fixture
def receiver() -> Iterator[tuple[Receiver, str]]:
    endpoint = Receiver()
    server = LoopbackServer(endpoint.handler())
    server.start()
    yield endpoint, server.url
    server.stop()


@pytest.fixture
def fal() -> Iterator[FalServer]:
    server = FalServer(KEY, time_scale=SCALE)
    server.start()
    yield server
    server.stop()


def _submit(fal: FalServer, webhook: str) -> FalRequest:
    body = {
        "prompt": "p",
        "video_description": "d",
        "video_url": "https://x/v.mp4",
        "image_url": "https://x/i.png",
    }
    response = httpx.post(
        f"{fal.url}/fal-ai/video-as-prompt",
        params={"fal_webhook": webhook},
        json=body,
        headers={"Authorization": f"Key {KEY}"},
    )
    assert response.status_code == 200, response.text
    return fal.requests[response.json()["request_id"]]


def _until(check: Any, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "timed out waiting for the fal server"
        time.sleep(0.02)


def test_a_failed_delivery_is_retried_ten_times_over_about_two_hours(
    fal: FalServer, receiver: tuple[Receiver, str]
) -> None:
    endpoint, url = receiver
    endpoint.statuses = [500] * 20  # never accepted
    request = _submit(fal, f"{url}/callbacks/fal/job?token=t")
    _until(lambda: len(request.deliveries) == 11)
    time.sleep(0.2)
    assert request.deliveries == [500] * 11  # the first delivery and 10 retries, then fal gives up
    assert request.retry_waits == pytest.approx([d * SCALE for d in RETRY_DELAYS_S])
    assert 1.9 * 3600 <= sum(RETRY_DELAYS_S) <= 2 * 3600
    assert tuple(sorted(RETRY_DELAYS_S)) == RETRY_DELAYS_S  # waits grow
    # Each retry is signed afresh (a current timestamp), for the same request.
    assert {r["headers"]["x-fal-webhook-request-id"] for r in endpoint.received} == {request.request_id}


def test_a_delivery_is_retried_until_it_is_accepted(fal: FalServer, receiver: tuple[Receiver, str]) -> None:
    endpoint, url = receiver
    endpoint.statuses = [503, 502]
    request = _submit(fal, f"{url}/callbacks/fal/job")
    _until(lambda: request.deliveries[-1:] == [200])
    assert request.deliveries == [503, 502, 200] and len(request.retry_waits) == 2


def test_a_delivery_not_answered_within_the_timeout_has_failed(
    fal: FalServer, receiver: tuple[Receiver, str]
) -> None:
    assert FalBehaviour().webhook_timeout_s == 15.0  # fal documents none
    fal.behaviour.webhook_timeout_s = 0.3
    endpoint, url = receiver
    endpoint.delays = [1.5]  # the first answer comes too late (a 200 fal never sees)
    request = _submit(fal, f"{url}/callbacks/fal/job")
    _until(lambda: request.deliveries[-1:] == [200])
    assert request.deliveries == [0, 200]
    assert len(endpoint.received) == 2  # delivered twice: at least once, as on fal


def test_a_delivery_from_another_account_is_signed_with_the_same_keys(
    fal: FalServer, receiver: tuple[Receiver, str]
) -> None:
    endpoint, url = receiver
    assert fal.send_as_another_account(f"{url}/callbacks/fal/some-job") == 200
    (got,) = endpoint.received
    headers, body = got["headers"], got["body"]
    assert headers["x-fal-webhook-user-id"] == OTHER_USER_ID != USER_ID
    assert json.loads(body)["request_id"] == headers["x-fal-webhook-request-id"] not in fal.requests
    jwks = JwksCache(lambda: fal.jwks())
    # A valid fal signature: only the user id (or the URL's token) tells it from ours.
    assert verify_fal_webhook(headers, body, jwks) == headers["x-fal-webhook-request-id"]


def test_impostor_deliveries_go_to_the_webhook_path_without_our_token(
    fal: FalServer, receiver: tuple[Receiver, str]
) -> None:
    endpoint, url = receiver
    fal.behaviour.impostor_deliveries = 1
    request = _submit(fal, f"{url}/callbacks/fal/job-1?token=secret")
    _until(lambda: request.deliveries[-1:] == [200])
    impostor, ours = endpoint.received
    assert impostor["path"] == "/callbacks/fal/job-1" and ours["path"] == "/callbacks/fal/job-1?token=secret"
    assert impostor["headers"]["x-fal-webhook-user-id"] == OTHER_USER_ID
    assert ours["headers"]["x-fal-webhook-user-id"] == USER_ID
    assert request.impostor_answers == [200]
