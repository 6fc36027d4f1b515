import time

import httpx
import pytest
from gpu_service_helpers import StubServices
from vap_shared import routes

from gpu.service import media
from gpu.service.local_server import start_local_gpu_server

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


def test_local_server_idempotent_submit_refresh_and_previews():
    """The local stack's GPU runs the same app as Modal's: one run per job id, URLs refreshed at
    start and before upload, previews next to the video."""
    with StubServices() as stub:
        server = start_local_gpu_server(0, "wk-local", "ws-local", "fake", steps=2)
        try:
            request = stub.request(job_id="job-p", num_frames=9, steps=None).model_copy(
                update={
                    "refresh_url": routes.url(stub.base, "urls", "job-p"),
                    "output_put_url": f"{stub.base}/upload/expired.mp4",
                    "poster_put_url": f"{stub.base}/upload/poster.jpg",
                    "preview_put_url": f"{stub.base}/upload/preview.webp",
                }
            )
            stub.expired = {"/upload/expired.mp4"}
            stub.refresh_answers = [
                (200, {"expires_at": 1}),
                (200, {"output_put_url": f"{stub.base}/upload/video.mp4", "expires_at": 2}),
            ]
            with httpx.Client(base_url=server.url, timeout=10, headers=AUTH) as client:
                body = request.model_dump(mode="json")
                call_id = client.post("/submit", json=body).json()["call_id"]
                assert client.post("/submit", json=body).json()["call_id"] == call_id
                deadline = time.monotonic() + 60
                while (status := client.get(f"/status/{call_id}").json())["state"] in ("queued", "running"):
                    assert time.monotonic() < deadline
                    time.sleep(0.05)
        finally:
            server.stop()
    assert status["state"] == "succeeded", status
    assert [r.purpose for r in stub.recorded.refreshes] == ["start", "upload"]
    assert set(stub.recorded.uploads) == {"/upload/video.mp4", "/upload/poster.jpg", "/upload/preview.webp"}
    assert status["result"]["poster_bytes"] == len(stub.recorded.uploads["/upload/poster.jpg"][1])
    assert [c.event for c in stub.recorded.callbacks].count("succeeded") == 1


def test_local_server_workers_run_jobs_at_once():
    with StubServices() as stub:
        server = start_local_gpu_server(0, "wk-local", "ws-local", "fake", workers=2, fake_step_delay_s=0.05)
        try:
            with httpx.Client(base_url=server.url, timeout=10, headers=AUTH) as client:
                bodies = [
                    stub.request(job_id=j, steps=60).model_dump(mode="json") for j in ("job-a", "job-b")
                ]
                ids = [client.post("/submit", json=body).json()["call_id"] for body in bodies]
                deadline = time.monotonic() + 30
                while not all(client.get(f"/status/{i}").json()["state"] == "running" for i in ids):
                    assert time.monotonic() < deadline, "two workers should run two jobs at once"
                    time.sleep(0.05)
                for call_id in ids:
                    assert client.post(f"/cancel/{call_id}").json()["cancelled"] is True
        finally:
            server.stop()
