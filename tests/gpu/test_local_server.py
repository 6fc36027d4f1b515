import time

import httpx
import pytest
from gpu_service_helpers import StubServices

from gpu import media
from gpu.local_server import start_local_gpu_server

AUTH = {"Modal-Key": "wk-local", "Modal-Secret": "ws-local"}


def run_through_server(engine_name, **server_kwargs):
    with StubServices() as stub:
        server = start_local_gpu_server(0, "wk-local", "ws-local", engine_name, **server_kwargs)
        try:
            assert server.url.startswith("http://127.0.0.1:")
            with httpx.Client(base_url=server.url, timeout=10) as client:
                assert client.get("/status/x").status_code == 401
                request = stub.request(num_frames=9, fps=8, aspect_ratio="16:9", steps=None)
                response = client.post("/submit", json=request.model_dump(mode="json"), headers=AUTH)
                assert response.status_code == 202
                call_id = response.json()["call_id"]
                deadline = time.monotonic() + 120
                while time.monotonic() < deadline:
                    body = client.get(f"/status/{call_id}", headers=AUTH).json()
                    if body["state"] not in ("queued", "running"):
                        break
                    time.sleep(0.1)
        finally:
            server.stop()
        assert body["state"] == "succeeded", body
        assert stub.events()[-1] == "succeeded" and all(stub.recorded.signatures_ok)
        content_type, video = stub.recorded.uploads["/upload/job-1.mp4"]
        assert content_type == "video/mp4"
        return body, media.probe_mp4(video)


def test_local_server_fake_engine():
    body, info = run_through_server("fake", steps=3)
    assert body["result"]["steps"] == 3 and body["result"]["gpu"] == "fake"
    assert (info.width, info.height, info.num_frames, info.fps) == (832, 480, 9, 8.0)


@pytest.mark.slow
def test_local_server_tiny_engine():
    body, info = run_through_server("tiny", work_max_side=64)
    assert body["result"]["steps"] == 2 and body["result"]["gpu"] == "cpu"  # local default: 2 steps
    assert (info.width, info.height, info.num_frames, info.fps, info.codec) == (832, 480, 9, 8.0, "h264")
