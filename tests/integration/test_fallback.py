"""Faults are scriptable on the local stack: with the Modal endpoint down, `backend: auto` falls
back to fal (and the fal server's behaviour can be changed per test)."""

from __future__ import annotations

import pytest
from stack_helpers import sidecar

from local_stack import LocalStack
from local_stack.fal_server import FalServer
from local_stack.net import free_port

pytestmark = pytest.mark.stack


def test_modal_down_falls_back_to_fal(stack: LocalStack, sample_media: dict[str, bytes], folder: str) -> None:
    key = f"{folder}/fallback.json"
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    with stack.environment(MODAL_ENDPOINT_URL=dead):
        stack.put_job(key, sidecar(backend="auto"), {f"{folder}/{n}": d for n, d in sample_media.items()})
        (note,) = stack.wait_for_notification(key, timeout_s=120)
    body = note.body
    assert body["status"] == "succeeded", body
    assert (body["backend"], body["fallback_from"]) == ("fal", "modal")


def test_fal_error_fails_the_job(
    stack: LocalStack, fal: FalServer, sample_media: dict[str, bytes], folder: str
) -> None:
    fal.behaviour.webhook_status = "ERROR"
    key = f"{folder}/fal-error.json"
    stack.put_job(key, sidecar(backend="fal"), {f"{folder}/{n}": d for n, d in sample_media.items()})
    (note,) = stack.wait_for_notification(key, timeout_s=120)
    assert note.body["status"] == "failed", note.body
    assert note.body["backend"] == "fal"
    assert note.body["errors"]
