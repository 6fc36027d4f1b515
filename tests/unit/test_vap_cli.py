"""`vap` pieces that need no stack: backend cancel requests, names, manifest cells, progress lines."""

from __future__ import annotations

import base64
import io
import json
import random
from typing import Any

import httpx
import pytest
from PIL import Image
from vap_shared.config import Settings
from vap_shared.jobs import Job

from vap_cli.cancel import cancel_at_backend
from vap_cli.config import StackInfo
from vap_cli.errors import CliError
from vap_cli.progress import render
from vap_cli.submission import Submission, clean_name, coerce_row, validate


class FakeSecrets:
    def __init__(self, fal_key: str = "fal-123") -> None:
        self.values = {"s/modal-token": json.dumps({"key": "wk-1", "secret": "ws-2"}), "s/fal-key": fal_key}

    def get_secret_value(self, SecretId: str) -> dict[str, str]:
        return {"SecretString": self.values[SecretId]}


def stack(fal_key: str = "fal-123") -> StackInfo:
    info = StackInfo(
        kind="deployed",
        name="s",
        region="us-east-1",
        bucket="b",
        session=None,
        modal_endpoint_url="https://ws--vap.modal.run/",
        modal_token_secret="s/modal-token",
        fal_key_secret="s/fal-key",
    )
    info._clients["secretsmanager"] = FakeSecrets(fal_key)
    return info


def recorder(answer: dict[str, Any], status: int = 200) -> tuple[httpx.Client, list[httpx.Request]]:
    seen: list[httpx.Request] = []

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(status, json=answer)

    return httpx.Client(transport=httpx.MockTransport(handle)), seen


def test_modal_cancel_posts_with_the_proxy_auth_headers() -> None:
    client, seen = recorder({"call_id": "fc-1", "cancelled": True})
    job = Job(job_id="j", state="running", backend="modal", backend_call_id="fc-1")
    assert "cancelled" in cancel_at_backend(stack(), job, client)
    (request,) = seen
    assert request.method == "POST" and str(request.url) == "https://ws--vap.modal.run/cancel/fc-1"
    assert request.headers["Modal-Key"] == "wk-1" and request.headers["Modal-Secret"] == "ws-2"


FAL_CANCEL = "https://queue.fal.run/fal-ai/video-as-prompt/requests/r1/cancel"


def fal_job(cancel_url: str = FAL_CANCEL) -> Job:
    return Job(
        job_id="j",
        state="dispatched",
        backend="fal",
        backend_call_id="r1",
        fal_urls={"cancel_url": cancel_url},
    )


# Every form the Lambdas' `vap_shared.secrets` parser accepts for the fal key secret.
@pytest.mark.parametrize(
    "secret", ["fal-123", " fal-123\n", json.dumps({"key": "fal-123"}), json.dumps({"FAL_KEY": "fal-123"})]
)
def test_fal_cancel_puts_the_cancel_url_with_the_key(secret: str) -> None:
    client, seen = recorder({"status": "CANCELLATION_REQUESTED"}, 202)
    note = cancel_at_backend(stack(fal_key=secret), fal_job(), client)
    assert note == "fal request r1: CANCELLATION_REQUESTED (removed from fal's queue)"
    (request,) = seen
    assert request.method == "PUT" and str(request.url) == FAL_CANCEL
    assert request.headers["Authorization"] == "Key fal-123"


def test_fal_says_a_running_request_cannot_be_removed() -> None:
    client, _ = recorder({"status": "ALREADY_COMPLETED"}, 400)
    assert "runs to its end (and is billed)" in cancel_at_backend(stack(), fal_job(), client)


@pytest.mark.parametrize(
    "cancel_url",
    [
        "https://evil.test/fal-ai/video-as-prompt/requests/r1/cancel",
        "https://queue.fal.run.evil.test/fal-ai/video-as-prompt/requests/r1/cancel",
        "http://queue.fal.run/fal-ai/video-as-prompt/requests/r1/cancel",
        "https://queue.fal.run:8443/fal-ai/video-as-prompt/requests/r1/cancel",
        "https://user@queue.fal.run/fal-ai/video-as-prompt/requests/r1/cancel",
    ],
)
def test_the_fal_key_is_never_sent_to_a_recorded_url_off_the_queue_host(cancel_url: str) -> None:
    client, seen = recorder({"status": "OK"})
    note = cancel_at_backend(stack(), fal_job(cancel_url), client)
    assert seen == []
    assert note == "could not cancel at fal: the recorded cancel_url is not on the configured fal queue host"


def test_the_configured_fal_queue_host_is_the_stacks() -> None:
    info = stack()
    info.fal_queue_url = "https://queue.fal.example"
    client, seen = recorder({"status": "OK"})
    assert "not on the configured fal queue host" in cancel_at_backend(info, fal_job(), client)
    assert seen == []
    cancel_url = "https://queue.fal.example/fal-ai/video-as-prompt/requests/r1/cancel"
    assert "r1: OK" in cancel_at_backend(info, fal_job(cancel_url), client)
    assert [str(r.url) for r in seen] == [cancel_url]


def test_an_unreadable_secret_is_reported_not_raised() -> None:
    client, seen = recorder({"status": "OK"})
    note = cancel_at_backend(stack(fal_key=json.dumps({"other": "x"})), fal_job(), client)
    assert note == "could not cancel at fal: the fal key secret has no 'key'" and seen == []


def test_nothing_to_cancel_before_dispatch_and_errors_are_reported() -> None:
    client, _ = recorder({}, 404)
    assert "not dispatched" in cancel_at_backend(stack(), Job(job_id="j"), client)
    job = Job(job_id="j", state="running", backend="modal", backend_call_id="fc-1")
    assert "HTTP 404" in cancel_at_backend(stack(), job, client)


def test_names_and_manifest_cells() -> None:
    assert clean_name("inbox/balloon/horse.json") == "balloon/horse"
    for bad in ("../x", "a//b", "a b", ""):
        with pytest.raises(CliError):
            clean_name(bad)
    row = coerce_row({"seed": "42", "num_frames": "49", "guidance_scale": "5.5", "fps": "", "prompt": " hi "})
    assert row == {"seed": 42, "num_frames": 49, "guidance_scale": 5.5, "prompt": "hi"}
    assert coerce_row({"enable_safety_checker": "false", "seed": "x"}) == {
        "enable_safety_checker": False,
        "seed": "x",
    }


def test_progress_lines() -> None:
    assert render({"state": "received", "phase": "queued"}) == "queued"
    assert render({"state": "dispatched", "phase": "dispatched", "backend": "modal"}) == "dispatched to modal"
    line = render({"state": "running", "phase": "running", "progress": {"step": 25, "total": 50}})
    assert line == "running [############------------] 25/50"
    assert render({"state": "running", "phase": "storing"}) == "storing"


def test_a_sidecar_the_stacks_defaults_accept_passes_local_validation() -> None:
    """Without the stack's MaxSidecarBytes (a local stack whose emulator does not describe it), `vap`
    checks against the default the functions use, not a smaller one: a sidecar carrying a data: image
    of a few hundred KB, which ingest accepts, is not refused before upload."""
    pixels = random.Random(7).randbytes(256 * 256 * 3)
    png = io.BytesIO()
    Image.frombytes("RGB", (256, 256), pixels).save(png, format="PNG")
    sidecar = {
        "prompt": "p",
        "video_description": "d",
        "video_url": "clip.mp4",
        "image_url": "data:image/png;base64," + base64.b64encode(png.getvalue()).decode("ascii"),
    }
    assert len(json.dumps(sidecar)) > 128 * 1024
    info = stack()
    functions_default = Settings(bucket_name="b", jobs_table="t", topic_arn="a").max_sidecar_bytes
    assert info.max_sidecar_bytes == functions_default
    validate(Submission(name="big", sidecar=sidecar), info)
