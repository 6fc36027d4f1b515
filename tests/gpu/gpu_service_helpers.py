"""Shared pieces of the GPU service tests: a stand-in for S3 + the webhook (callbacks and the URL
refresh route), and request builders."""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from vap_shared import routes
from vap_shared.gpu_contract import GenerationSettings, GpuCallback, GpuJobRequest, UrlRefreshRequest
from vap_shared.signing import SIGNATURE_HEADER, TIMESTAMP_HEADER, SignatureError, verify_callback

from gpu.service import media

KEY_HEX = "ab" * 32
# What S3 answers (403) for a presigned URL past its expiry.
EXPIRED_BODY = b"<Error><Code>AccessDenied</Code><Message>Request has expired</Message></Error>"


@dataclass
class Recorded:
    callbacks: list[GpuCallback] = field(default_factory=list)
    signatures_ok: list[bool] = field(default_factory=list)
    uploads: dict[str, tuple[str, bytes]] = field(default_factory=dict)
    callback_attempts: int = 0
    refreshes: list[UrlRefreshRequest] = field(default_factory=list)
    refresh_signatures_ok: list[bool] = field(default_factory=list)
    downloads: list[str] = field(default_factory=list)  # paths GET, in order


class StubServices:
    """Serves `/media/<name>`, accepts `PUT /upload/<name>`, records POSTs to the `gpu` route
    (`vap_shared.routes`), answers the `urls` route (the URL refresh) from `refresh_answers`.

    `expired`: paths (e.g. "/media/image.png") answered 403 like an expired presigned S3 URL.
    `refresh_answers`: (status, JSON body) per refresh call, in order; the last one repeats.
    """

    def __init__(self, key_hex: str = KEY_HEX) -> None:
        self.key = bytes.fromhex(key_hex)
        self.media: dict[str, bytes] = {}
        self.recorded = Recorded()
        self.callback_failures = 0  # answer 503 to this many callback POSTs first
        self.serve_uploads = False  # True: PUT /upload/<name> also serves GET /media/<name> (S3-like)
        self.expired: set[str] = set()
        self.refresh_answers: list[tuple[int, dict[str, Any] | None]] = [(200, {"expires_at": 0})]
        self.lock = threading.Lock()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _reply(self, code: int, body: bytes = b"") -> None:
                self.send_response(code)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _body(self) -> bytes:
                return self.rfile.read(int(self.headers.get("Content-Length", "0")))

            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                with stub.lock:
                    stub.recorded.downloads.append(path)
                if path in stub.expired:
                    self._reply(403, EXPIRED_BODY)
                    return
                data = stub.media.get(path.removeprefix("/media/"))
                self._reply(404) if data is None else self._reply(200, data)

            def do_PUT(self) -> None:
                body = self._body()
                path = self.path.split("?", 1)[0]
                if path in stub.expired:
                    self._reply(403)
                    return
                with stub.lock:
                    stub.recorded.uploads[path] = (self.headers.get("Content-Type", ""), body)
                    if stub.serve_uploads:
                        stub.media[path.removeprefix("/upload/")] = body
                self._reply(200)

            def _refresh(self, body: bytes) -> None:
                try:
                    verify_callback(
                        stub.key, self.headers.get(TIMESTAMP_HEADER), self.headers.get(SIGNATURE_HEADER), body
                    )
                    ok = True
                except SignatureError:
                    ok = False
                with stub.lock:
                    stub.recorded.refresh_signatures_ok.append(ok)
                    stub.recorded.refreshes.append(UrlRefreshRequest.model_validate_json(body))
                    index = min(len(stub.recorded.refreshes), len(stub.refresh_answers)) - 1
                    status, answer = stub.refresh_answers[index]
                if not ok:
                    self._reply(401)
                    return
                self._reply(status, b"" if answer is None else json.dumps(answer).encode())

            def do_POST(self) -> None:
                body = self._body()
                route = routes.match_route(self.path)
                if route is not None and route[0] == "urls":
                    self._refresh(body)
                    return
                with stub.lock:
                    stub.recorded.callback_attempts += 1
                    if stub.callback_failures > 0:
                        stub.callback_failures -= 1
                        self._reply(503)
                        return
                    try:
                        verify_callback(
                            stub.key,
                            self.headers.get(TIMESTAMP_HEADER),
                            self.headers.get(SIGNATURE_HEADER),
                            body,
                        )
                        ok = True
                    except SignatureError:
                        ok = False
                    stub.recorded.signatures_ok.append(ok)
                    stub.recorded.callbacks.append(GpuCallback.model_validate(json.loads(body)))
                self._reply(200 if ok else 401)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> StubServices:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def events(self) -> list[str]:
        return [c.event for c in self.recorded.callbacks]

    def request(self, job_id: str = "job-1", **settings: Any) -> GpuJobRequest:
        self.media.setdefault("ref.mp4", media.synth_clip_mp4(num_frames=20, width=64, height=48, fps=10))
        self.media.setdefault("image.png", media.synth_image_png(64, 48))
        steps = settings.pop("steps", 10)
        fields: dict[str, Any] = {
            "prompt": "a cat dancing",
            "video_description": "a man dancing",
            "num_frames": 9,
        }
        fields.update(settings)
        return GpuJobRequest(
            job_id=job_id,
            video_url=f"{self.base}/media/ref.mp4",
            image_url=f"{self.base}/media/image.png",
            output_put_url=f"{self.base}/upload/{job_id}.mp4",
            callback_url=routes.url(self.base, "gpu", job_id),
            callback_key=KEY_HEX,
            settings=GenerationSettings(**fields),
            num_inference_steps=steps,
        )


class FakeDict:
    """`modal.Dict`'s put/get/pop semantics (put-if-absent returns whether it created the key)."""

    def __init__(self):
        self.data = {}
        self.lock = threading.Lock()

    def put(self, key, value, *, skip_if_exists=False):
        with self.lock:
            if skip_if_exists and key in self.data:
                return False
            self.data[key] = value
            return True

    def get(self, key, default=None):
        with self.lock:
            return self.data.get(key, default)

    def pop(self, key, default=None):
        with self.lock:
            return self.data.pop(key, default)
