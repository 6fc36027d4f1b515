"""Shared pieces of the GPU service tests: a stand-in for S3 + the webhook, and request builders."""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from vap_shared.gpu_contract import GenerationSettings, GpuCallback, GpuJobRequest
from vap_shared.signing import SIGNATURE_HEADER, TIMESTAMP_HEADER, SignatureError, verify_callback

from gpu import media

KEY_HEX = "ab" * 32


@dataclass
class Recorded:
    callbacks: list[GpuCallback] = field(default_factory=list)
    signatures_ok: list[bool] = field(default_factory=list)
    uploads: dict[str, tuple[str, bytes]] = field(default_factory=dict)
    callback_attempts: int = 0


class StubServices:
    """Serves `/media/<name>`, accepts `PUT /upload/<name>`, records `POST /callbacks/gpu/<job>`."""

    def __init__(self, key_hex: str = KEY_HEX) -> None:
        self.key = bytes.fromhex(key_hex)
        self.media: dict[str, bytes] = {}
        self.recorded = Recorded()
        self.callback_failures = 0  # answer 503 to this many callback POSTs first
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
                name = self.path.removeprefix("/media/")
                data = stub.media.get(name)
                self._reply(404) if data is None else self._reply(200, data)

            def do_PUT(self) -> None:
                body = self._body()
                with stub.lock:
                    stub.recorded.uploads[self.path] = (self.headers.get("Content-Type", ""), body)
                self._reply(200)

            def do_POST(self) -> None:
                body = self._body()
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
            callback_url=f"{self.base}/callbacks/gpu/{job_id}",
            callback_key=KEY_HEX,
            settings=GenerationSettings(**fields),
            num_inference_steps=steps,
        )
