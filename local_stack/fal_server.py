"""A local server speaking fal.ai's queue protocol, for the fal backend of the local stack.

Routes (fal's queue REST API and webhook protocol, as docs/contracts.md describes):
- `POST /<endpoint-id>?fal_webhook=<url>` (header `Authorization: Key <key>`) →
  `{request_id, status: "IN_QUEUE", queue_position, status_url, response_url, cancel_url}`
- `GET <status_url>` → 202 IN_QUEUE / IN_PROGRESS, 200 COMPLETED; `GET <response_url>` → the output;
  `PUT <cancel_url>` → `{status}`: a queued request is removed (CANCELLATION_REQUESTED); one already
  running or finished answers ALREADY_COMPLETED and runs to its end (fal's documented behaviour)
- `GET /.well-known/jwks.json` → the Ed25519 public key; `GET /files/<id>/<name>` → the "CDN".

Each request produces a synthetic MP4 (no model: fal's example inputs name hosts that are not
reachable offline) and then POSTs the webhook signed exactly as fal does, as fal delivers it: a
delivery not answered 2xx within `webhook_timeout_s` (15 s: fal documents no limit) has failed and
is sent again, up to 10 times over about 2 hours (`RETRY_DELAYS_S`, times the stack's time scale),
each retry signed afresh. `behaviour` lets tests inject fal's failure modes, and a delivery signed
for another fal account (fal signs every account's webhooks with the same keys) can be sent to any
URL (`send_as_another_account`, or `impostor_deliveries` before each real one).
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import random
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from vap_shared.contract import DEFAULT_FPS, DEFAULT_NUM_FRAMES

from local_stack.media import synth_mp4
from local_stack.net import LoopbackServer

log = logging.getLogger("local_stack.fal")

_REQUIRED = ("prompt", "video_url", "image_url", "video_description")
USER_ID = "local-fal-user"
# Another fal account: its webhooks are signed with the same keys as ours.
OTHER_USER_ID = "another-fal-account"
# fal retries a failed delivery 10 times over about 2 hours (fal's webhook documentation); the exact
# schedule is undocumented: here each wait doubles, 7 s to ~1 h, 7161 s in all.
RETRY_DELAYS_S: tuple[float, ...] = tuple(7.0 * 2**n for n in range(10))
WEBHOOK_TIMEOUT_S = 15.0


@dataclass
class FalBehaviour:
    """Knobs for fault tests; the defaults behave like a healthy fal."""

    submit_status: int | None = None  # answer submits with this HTTP status (e.g. 503)
    webhook_status: str = "OK"  # "OK" or "ERROR" in the webhook body
    payload_error: bool = False  # OK webhook whose payload is null with payload_error
    deliver_webhook: bool = True
    extra_deliveries: int = 0  # send the same signed webhook this many more times
    queue_s: float = 0.0  # time a request spends IN_QUEUE before it starts (only then can it be cancelled)
    delay_s: float = 0.0  # time a request spends IN_PROGRESS
    # Render the output this small: the pipeline under test does not care about pixels.
    video_size: tuple[int, int] = (160, 96)
    # A delivery not answered (2xx) within this long has failed (fal documents no limit).
    webhook_timeout_s: float = WEBHOOK_TIMEOUT_S
    # Retries of a failed delivery, waiting RETRY_DELAYS_S (times the server's time scale) between.
    webhook_retries: int = len(RETRY_DELAYS_S)
    # Before each real delivery, this many signed for another fal account (their own request id and
    # video) to the job's webhook path without our URL's query (all an outsider knows is the job id).
    impostor_deliveries: int = 0
    # Chaos (bench.chaos; 0 = off): this share of submits is answered 503 (fal momentarily unable
    # to take a request), and of requests gets one delivery from another fal account before the
    # real one; each draw is seeded by `seed`.
    submit_error_rate: float = 0.0
    impostor_rate: float = 0.0
    seed: int = 0


@dataclass
class FalRequest:
    request_id: str
    endpoint_id: str
    input: dict[str, Any]
    webhook_url: str | None
    headers: dict[str, str]
    status: str = "IN_QUEUE"
    output: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    deliveries: list[int] = field(default_factory=list)  # HTTP statuses of webhook deliveries (0: none)
    # The waits before each retry (s, scaled), and the answers to deliveries from another account.
    retry_waits: list[float] = field(default_factory=list)
    impostor_answers: list[int] = field(default_factory=list)
    cancelled: bool = False


def _b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def fal_signature_message(request_id: str, user_id: str, timestamp: str, body: bytes) -> bytes:
    return "\n".join([request_id, user_id, timestamp, hashlib.sha256(body).hexdigest()]).encode("utf-8")


class FalServer:
    def __init__(
        self, api_key: str, port: int = 0, behaviour: FalBehaviour | None = None, time_scale: float = 1.0
    ) -> None:
        self.api_key = api_key
        self.behaviour = behaviour or FalBehaviour()
        # The local stack's time scale: fal's retry schedule (2 hours) runs this much faster.
        self.time_scale = time_scale
        self.requests: dict[str, FalRequest] = {}
        self.files: dict[str, bytes] = {}
        self._private_key = Ed25519PrivateKey.generate()
        self._kid = uuid.uuid4().hex[:16]
        self._lock = threading.Lock()
        self._draws: dict[str, int] = {}
        self._workers: list[threading.Thread] = []
        self._stopping = threading.Event()
        self._server = LoopbackServer(self._handler_class(), port)

    # ------------------------------------------------------------------ lifecycle
    @property
    def url(self) -> str:
        return self._server.url

    @property
    def jwks_url(self) -> str:
        return f"{self.url}/.well-known/jwks.json"

    @property
    def media_host(self) -> str:
        return "127.0.0.1"

    def start(self) -> None:
        self._server.start()

    def stop(self) -> None:
        self._stopping.set()
        for worker in list(self._workers):
            worker.join(timeout=30)
        self._server.stop()

    def jwks(self) -> dict[str, Any]:
        raw = self._private_key.public_key().public_bytes(
            encoding=serialization.Encoding.Raw, format=serialization.PublicFormat.Raw
        )
        return {"keys": [{"kty": "OKP", "crv": "Ed25519", "x": _b64url(raw), "kid": self._kid, "use": "sig"}]}

    def sign(
        self, request_id: str, body: bytes, timestamp: int | None = None, user_id: str = USER_ID
    ) -> dict[str, str]:
        """fal's webhook headers for `body` (tests use this to forge or replay deliveries); any
        account's deliveries are signed with the same keys."""
        stamp = str(int(time.time()) if timestamp is None else timestamp)
        signature = self._private_key.sign(fal_signature_message(request_id, user_id, stamp, body))
        return {
            "Content-Type": "application/json",
            "X-Fal-Webhook-Request-Id": request_id,
            "X-Fal-Webhook-User-Id": user_id,
            "X-Fal-Webhook-Timestamp": stamp,
            "X-Fal-Webhook-Signature": signature.hex(),
        }

    def wait_for_requests(self, count: int, timeout_s: float = 30.0) -> list[FalRequest]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self._lock:
                if len(self.requests) >= count:
                    return list(self.requests.values())
            time.sleep(0.1)
        raise TimeoutError(f"fal server got {len(self.requests)} of {count} requests")

    # ------------------------------------------------------------------ protocol
    def _urls(self, endpoint_id: str, request_id: str) -> dict[str, str]:
        # Like fal, the request URLs use only owner/app of the endpoint id.
        app = "/".join(endpoint_id.split("/")[:2])
        base = f"{self.url}/{app}/requests/{request_id}"
        return {"status_url": f"{base}/status", "response_url": base, "cancel_url": f"{base}/cancel"}

    def submit(self, endpoint_id: str, body: bytes, query: str, headers: dict[str, str]) -> tuple[int, Any]:
        if headers.get("authorization") != f"Key {self.api_key}":
            return 401, {"detail": "Invalid authentication credentials"}
        status = self.behaviour.submit_status
        if status is None and self._draw("submit") < self.behaviour.submit_error_rate:
            status = 503
        if status is not None:
            return status, {
                "detail": "injected failure",
                "error_type": "runner_scheduling_failure",
            }
        try:
            payload = json.loads(body)
        except ValueError:
            return 422, {
                "detail": [{"loc": ["body"], "msg": "invalid JSON", "type": "value_error.jsondecode"}]
            }
        if not isinstance(payload, dict):
            return 422, {"detail": [{"loc": ["body"], "msg": "not an object", "type": "type_error.dict"}]}
        missing = [{"loc": ["body", name], "msg": "field required", "type": "value_error.missing"}
                   for name in _REQUIRED if name not in payload]  # fmt: skip
        if missing:
            return 422, {"detail": missing}
        webhook = parse_qs(query).get("fal_webhook", [None])[0]
        request = FalRequest(uuid.uuid4().hex, endpoint_id, payload, webhook, headers)
        with self._lock:
            self.requests[request.request_id] = request
        worker = threading.Thread(
            target=self._run, args=(request,), name=f"fal-{request.request_id[:8]}", daemon=True
        )
        self._workers.append(worker)
        worker.start()
        return 200, {
            "request_id": request.request_id,
            "gateway_request_id": request.request_id,
            "status": "IN_QUEUE",
            "queue_position": 0,
            **self._urls(endpoint_id, request.request_id),
        }

    def _run(self, request: FalRequest) -> None:
        if self._stopping.wait(self.behaviour.queue_s):
            return
        with self._lock:
            if request.cancelled:  # removed from the queue: never runs, no webhook
                return
            request.status = "IN_PROGRESS"
        if self._stopping.wait(self.behaviour.delay_s):
            return
        settings = request.input
        if self.behaviour.webhook_status == "ERROR":
            request.error = {"detail": "injected model error", "error_type": "internal_error"}
        else:
            width, height = self.behaviour.video_size
            frames = int(settings.get("num_frames") or DEFAULT_NUM_FRAMES)
            fps = int(settings.get("fps") or DEFAULT_FPS)
            video = synth_mp4(width=width, height=height, frames=frames, fps=fps)
            name = f"{uuid.uuid4().hex[:12]}.mp4"
            path = f"files/{request.request_id}/{name}"
            self.files[path] = video
            request.output = {
                "video": {"url": f"{self.url}/{path}", "content_type": "video/mp4", "file_name": name,
                          "file_size": len(video)}
            }  # fmt: skip
        request.status = "COMPLETED"
        if self.behaviour.deliver_webhook and request.webhook_url:
            self._deliver(request)

    def webhook_body(self, request: FalRequest) -> bytes:
        if request.error is not None:
            body: dict[str, Any] = {
                "status": "ERROR",
                "error": request.error["detail"],
                "payload": request.error,
            }
        elif self.behaviour.payload_error:
            body = {"status": "OK", "payload": None, "payload_error": "output could not be serialised"}
        else:
            body = {"status": "OK", "payload": request.output}
        return json.dumps(
            {"request_id": request.request_id, "gateway_request_id": request.request_id, **body}
        ).encode()

    def _draw(self, kind: str) -> float:
        """A number in [0, 1) for the `kind`-th chaos decision, from the behaviour's seed."""
        with self._lock:
            self._draws[kind] = self._draws.get(kind, 0) + 1
            count = self._draws[kind]
        return random.Random(f"{self.behaviour.seed}:{kind}:{count}").random()

    def _client(self) -> httpx.Client:
        limit = self.behaviour.webhook_timeout_s
        return httpx.Client(timeout=httpx.Timeout(limit, connect=min(limit, 5.0)))

    @staticmethod
    def _post(client: httpx.Client, url: str, body: bytes, headers: dict[str, str]) -> int:
        """The delivery's HTTP status; 0 when none came in time (fal counts that as failed)."""
        try:
            return client.post(url, content=body, headers=headers).status_code
        except httpx.HTTPError:
            return 0

    def _deliver(self, request: FalRequest) -> None:
        assert request.webhook_url is not None
        body = self.webhook_body(request)
        behaviour = self.behaviour
        with self._client() as client:
            impostors = behaviour.impostor_deliveries + (self._draw("impostor") < behaviour.impostor_rate)
            for _ in range(impostors):
                request.impostor_answers.append(
                    self.send_as_another_account(without_query(request.webhook_url))
                )
            for _ in range(1 + behaviour.extra_deliveries):
                for attempt in range(1 + behaviour.webhook_retries):
                    if attempt:
                        wait = RETRY_DELAYS_S[min(attempt, len(RETRY_DELAYS_S)) - 1] * self.time_scale
                        request.retry_waits.append(wait)
                        if self._stopping.wait(wait):
                            return
                    # Signed afresh each time: a retry hours later still carries a current timestamp.
                    status = self._post(
                        client, request.webhook_url, body, self.sign(request.request_id, body)
                    )
                    request.deliveries.append(status)
                    if 200 <= status < 300:
                        break

    def send_as_another_account(self, url: str) -> int:
        """POST `url` a delivery of another fal account's own finished request (its request id, its
        video), correctly signed by fal for that account: what anyone with a fal account can point
        at our webhook. Its HTTP status (0: no answer in time)."""
        request_id = uuid.uuid4().hex
        body = json.dumps(
            {
                "request_id": request_id,
                "gateway_request_id": request_id,
                "status": "OK",
                "payload": {
                    "video": {"url": f"{self.url}/files/{request_id}/theirs.mp4", "content_type": "video/mp4"}
                },
            }
        ).encode()
        with self._client() as client:
            return self._post(client, url, body, self.sign(request_id, body, user_id=OTHER_USER_ID))

    def status_of(self, request: FalRequest, logs: bool) -> tuple[int, Any]:
        body: dict[str, Any] = {"request_id": request.request_id, "status": request.status}
        if request.status == "IN_QUEUE":
            body["queue_position"] = 0
        if logs:
            body["logs"] = []
        if request.status == "COMPLETED":
            if request.error is not None:
                body["error"] = request.error["detail"]
                body["error_type"] = request.error["error_type"]
            body["metrics"] = {"inference_time": self.behaviour.delay_s}
            return 200, body
        return 202, body

    # ------------------------------------------------------------------ HTTP
    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                log.debug("fal: " + format, *args)

            def _send(self, status: int, payload: Any, content_type: str = "application/json") -> None:
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _find(self, path: str) -> tuple[FalRequest | None, str]:
                parts = path.strip("/").split("/")
                if len(parts) >= 4 and parts[2] == "requests":
                    request = outer.requests.get(parts[3])
                    return request, "/".join(parts[4:])
                return None, ""

            def do_POST(self) -> None:
                parts = urlsplit(self.path)
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                headers = {k.lower(): v for k, v in self.headers.items()}
                status, payload = outer.submit(parts.path.strip("/"), body, parts.query, headers)
                self._send(status, payload)

            def do_GET(self) -> None:
                parts = urlsplit(self.path)
                path = parts.path
                if path == "/.well-known/jwks.json":
                    self._send(200, outer.jwks())
                    return
                if path.lstrip("/") in outer.files:
                    self._send(200, outer.files[path.lstrip("/")], "video/mp4")
                    return
                request, rest = self._find(path)
                if request is None:
                    self._send(404, {"detail": "Request not found"})
                elif rest == "status":
                    self._send(*outer.status_of(request, "logs=1" in parts.query))
                elif rest == "":
                    if request.status != "COMPLETED":
                        self._send(400, {"detail": "Request is still in progress"})
                    elif request.error is not None:
                        self._send(500, request.error)
                    else:
                        self._send(200, request.output)
                else:
                    self._send(404, {"detail": "Not found"})

            def do_PUT(self) -> None:
                request, rest = self._find(urlsplit(self.path).path)
                if request is None or rest != "cancel":
                    self._send(404, {"status": "NOT_FOUND"})
                    return
                with outer._lock:
                    queued = request.status == "IN_QUEUE"
                    request.cancelled = request.cancelled or queued
                if queued:
                    self._send(202, {"status": "CANCELLATION_REQUESTED"})
                else:  # running or finished: it runs to its end (and is billed)
                    self._send(400, {"status": "ALREADY_COMPLETED"})

        return Handler


def without_query(url: str) -> str:
    """`url` without its query: the webhook path an outsider can guess from a job id."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}{parts.path}"
