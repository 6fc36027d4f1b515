"""The backend clients send their credentials only to the configured hosts.

The fal key goes only to the configured fal queue host: a `status_url`/`response_url`/`cancel_url`
recorded on a job (from fal's submit answer, kept in DynamoDB) that points anywhere else is refused
before any request is made. The Modal token goes only to the configured endpoint: call ids from a
record can only name a path there.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import httpx
import pytest
from vap_shared.backends.base import BackendError
from vap_shared.backends.fal import FalBackend
from vap_shared.backends.modal import ModalBackend

QUEUE = "https://queue.fal.run"
APP = f"{QUEUE}/fal-ai/video-as-prompt/requests/r1"
MODAL = "https://ws--vap-gpu-api.modal.run"


class Recorder:
    def __init__(self, status: int = 200, body: dict[str, Any] | None = None) -> None:
        self.status, self.body = status, body if body is not None else {}
        self.seen: list[httpx.Request] = []

    def client(self) -> httpx.Client:
        def handle(request: httpx.Request) -> httpx.Response:
            self.seen.append(request)
            return httpx.Response(self.status, json=self.body)

        return httpx.Client(transport=httpx.MockTransport(handle))


def fal(recorder: Recorder, queue_url: str = QUEUE) -> FalBackend:
    return FalBackend(recorder.client(), queue_url, "fal-ai/video-as-prompt", lambda: "fal-secret")


OFF_HOST = [
    "https://evil.test/fal-ai/video-as-prompt/requests/r1/status",
    "https://queue.fal.run.evil.test/fal-ai/video-as-prompt/requests/r1/status",
    "https://evil.test/?https://queue.fal.run/fal-ai/video-as-prompt/requests/r1/status",
    "http://queue.fal.run/fal-ai/video-as-prompt/requests/r1/status",  # not over TLS
    "https://queue.fal.run:444/fal-ai/video-as-prompt/requests/r1/status",
    "https://user:pw@queue.fal.run/fal-ai/video-as-prompt/requests/r1/status",
    "https://evil.test@queue.fal.run.evil.test/x",
    "not a url",
]


@pytest.mark.parametrize("url", OFF_HOST)
@pytest.mark.parametrize("kind", ["status_url", "response_url", "cancel_url"])
def test_fal_key_is_never_sent_to_a_recorded_url_off_the_queue_host(url: str, kind: str) -> None:
    recorder = Recorder(200, {"status": "OK"})
    client = fal(recorder)
    call = {"status_url": client.status, "response_url": client.result, "cancel_url": client.cancel}[kind]
    with pytest.raises(BackendError) as raised:
        call("r1", {kind: url})
    assert raised.value.reason == f"the recorded {kind} is not on the configured fal queue host"
    assert recorder.seen == []


def test_fal_calls_the_recorded_urls_on_the_queue_host_with_the_key() -> None:
    recorder = Recorder(202, {"status": "IN_PROGRESS"})
    client = fal(recorder)
    urls = {"status_url": f"{APP}/status", "response_url": APP, "cancel_url": f"{APP}/cancel"}
    status = client.status("r1", urls)
    assert status is not None and status.status == "IN_PROGRESS"
    recorder.status, recorder.body = 400, {"status": "ALREADY_COMPLETED"}
    assert client.cancel("r1", urls) == "ALREADY_COMPLETED"
    recorder.status, recorder.body = 200, {"video": {"url": "https://v3.fal.media/files/x.mp4"}}
    assert client.result("r1", urls).video_url == "https://v3.fal.media/files/x.mp4"
    assert [(r.method, str(r.url)) for r in recorder.seen] == [
        ("GET", f"{APP}/status"),
        ("PUT", f"{APP}/cancel"),
        ("GET", APP),
    ]
    assert {r.headers["Authorization"] for r in recorder.seen} == {"Key fal-secret"}


def test_fal_urls_default_to_the_documented_ones_on_the_queue_host() -> None:
    recorder = Recorder(404, {"detail": "Request not found"})
    assert fal(recorder).status("r/1?x") is None  # unknown to fal
    (request,) = recorder.seen
    assert str(request.url) == f"{QUEUE}/fal-ai/video-as-prompt/requests/r%2F1%3Fx/status"


def test_a_fal_queue_url_that_is_not_https_is_refused_before_sending_the_key() -> None:
    recorder = Recorder()
    with pytest.raises(BackendError) as raised:
        fal(recorder, "http://queue.fal.run").cancel("r1")
    assert raised.value.kind == "auth" and recorder.seen == []


@pytest.mark.parametrize(
    "call_id", ["fc-1", "../../evil", "@evil.test", "x?y=https://evil.test", "//evil.test"]
)
def test_modal_token_only_goes_to_the_configured_endpoint(call_id: str) -> None:
    recorder = Recorder(200, {"call_id": call_id, "cancelled": True})
    client = ModalBackend(recorder.client(), MODAL + "/", lambda: ("wk", "ws"))
    assert client.cancel(call_id) is True
    recorder.body = {"call_id": call_id, "state": "running"}
    status = client.status(call_id)
    assert status is not None and status.state == "running"
    # The call id is one escaped path segment on the configured host, whatever it holds.
    escaped = quote(call_id, safe="")
    assert [r.url.raw_path.decode() for r in recorder.seen] == [f"/cancel/{escaped}", f"/status/{escaped}"]
    for request in recorder.seen:
        assert (request.url.scheme, request.url.host) == ("https", "ws--vap-gpu-api.modal.run")
        assert (request.headers["Modal-Key"], request.headers["Modal-Secret"]) == ("wk", "ws")


def test_modal_without_an_endpoint_or_token_is_unusable_not_a_crash() -> None:
    recorder = Recorder()
    with pytest.raises(BackendError) as raised:
        ModalBackend(recorder.client(), "", lambda: ("wk", "ws")).status("fc-1")
    assert raised.value.kind == "auth" and "MODAL_ENDPOINT_URL" in raised.value.reason

    def broken() -> tuple[str, str]:
        raise ValueError("the secret holds the key 'wk-123'")

    with pytest.raises(BackendError) as raised:
        ModalBackend(recorder.client(), MODAL, broken).cancel("fc-1")
    assert raised.value.reason == "credentials unavailable (ValueError)"  # never the secret's text
    assert recorder.seen == []


def test_modal_status_tells_an_unknown_call_from_a_missing_app() -> None:
    unknown = Recorder(404, {"detail": "unknown call"})
    assert ModalBackend(unknown.client(), MODAL, lambda: ("wk", "ws")).status("fc-1") is None

    def stopped(request: httpx.Request) -> httpx.Response:
        return httpx.Response(404, text="modal-http: app for invoked web endpoint is stopped")

    client = ModalBackend(httpx.Client(transport=httpx.MockTransport(stopped)), MODAL, lambda: ("wk", "ws"))
    with pytest.raises(BackendError) as raised:
        client.status("fc-1")
    assert raised.value.reason.startswith("status request answered HTTP 404, text/plain; is the app deployed")


def test_modal_status_asks_again_once_after_a_5xx_blip() -> None:
    """A status request is safe to repeat; the sweeper at a job's stop point would otherwise end a
    job that finished fine because Modal's endpoint answered one 503."""
    answers = [httpx.Response(503, text="upstream blip")]

    def endpoint(request: httpx.Request) -> httpx.Response:
        if answers:
            return answers.pop()
        return httpx.Response(200, json={"call_id": "fc-1", "state": "succeeded"})

    client = ModalBackend(httpx.Client(transport=httpx.MockTransport(endpoint)), MODAL, lambda: ("wk", "ws"))
    status = client.status("fc-1")
    assert status is not None and status.state == "succeeded"

    down = httpx.Client(transport=httpx.MockTransport(lambda request: httpx.Response(502)))
    always_down = ModalBackend(down, MODAL, lambda: ("wk", "ws"))
    with pytest.raises(BackendError) as raised:
        always_down.status("fc-1")
    assert raised.value.kind == "transient"
