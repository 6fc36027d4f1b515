"""Secrets never reach the logs: a full run on the local stack (a GPU job, a fal job, a fallback, a
bad sidecar, forged webhooks, a sweep) with every log record and everything written to
stdout/stderr captured, then searched for each secret value."""

from __future__ import annotations

import json
import logging

import httpx
import pytest
from stack_helpers import sidecar
from test_backend_faults import quiet
from vap_shared.fal_token import fal_webhook_token
from vap_shared.signing import derive_callback_key

from local_stack import LocalStack
from local_stack.fal_server import FalServer
from local_stack.net import free_port

pytestmark = pytest.mark.stack


def _secrets(stack: LocalStack, job_ids: list[str]) -> dict[str, str]:
    sm = stack.client("secretsmanager")
    assert stack.deployment is not None
    signing = sm.get_secret_value(SecretId=stack.deployment.secret_arns["SigningSecret"])["SecretString"]
    found = {
        "fal key": stack.fal_key,
        "modal token key": stack.modal_token[0],
        "modal token secret": stack.modal_token[1],
        "signing secret": signing,
    }
    for job_id in job_ids:
        # The per-job callback key the GPU receives (hex, as in the GPU request).
        found[f"callback key {job_id}"] = derive_callback_key(signing.encode(), job_id).hex()
        # The token in the job's fal webhook URL (vap_shared.fal_token).
        found[f"fal webhook token {job_id}"] = fal_webhook_token(signing.encode(), job_id)
    return found


def test_a_full_run_logs_no_secret(
    stack: LocalStack,
    fal: FalServer,
    sample_media: dict[str, bytes],
    folder: str,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    caplog.set_level(logging.DEBUG, logger="local_stack")
    caplog.set_level(logging.DEBUG, logger="gpu")
    caplog.set_level(logging.INFO)
    media = {f"{folder}/{n}": d for n, d in sample_media.items()}
    keys = {name: f"{folder}/{name}.json" for name in ("gpu", "fal", "fallback", "bad")}
    stack.put_job(keys["gpu"], sidecar(backend="modal"), media)
    stack.put_job(keys["fal"], sidecar(backend="fal"), media)
    stack.put_job(keys["bad"], sidecar(num_frames=500), media)
    notes = {
        name: stack.wait_for_notification(key, timeout_s=300)[0]
        for name, key in keys.items()
        if name != "fallback"
    }
    quiet(stack)
    with stack.environment(MODAL_ENDPOINT_URL=f"http://127.0.0.1:{free_port()}"):
        stack.put_job(keys["fallback"], sidecar(backend="auto"), media)
        (notes["fallback"],) = stack.wait_for_notification(keys["fallback"], timeout_s=120)
    assert [notes[n].body["status"] for n in ("gpu", "fal", "fallback", "bad")] == [
        "succeeded",
        "succeeded",
        "succeeded",
        "failed",
    ]
    # Rejected deliveries (their reasons are logged) and a sweep.
    job_id = notes["gpu"].body["job_id"]
    for kind in ("gpu", "fal"):
        response = httpx.post(
            f"{stack.webhook_url.rstrip('/')}/callbacks/{kind}/{job_id}",
            content=b'{"job_id": "x"}',
            headers={"content-type": "application/json", "x-vap-signature": "v1=00", "x-vap-timestamp": "1"},
        )
        assert response.status_code == 401
    stack.run_sweeper()

    captured = capfd.readouterr()
    records = [
        json.dumps({k: v for k, v in r.__dict__.items() if k not in ("args", "exc_info")}, default=str)
        + (r.getMessage() if r.args else "")
        + (logging.Formatter().formatException(r.exc_info) if r.exc_info else "")
        for r in caplog.records
    ]
    text = "\n".join([captured.out, captured.err, *records])
    assert len(records) > 10, "the run should have logged something to search"
    assert "rejected a GPU request" in text and "job dispatched" in text
    assert job_id in text
    job_ids = [n.body["job_id"] for n in notes.values()]
    leaked = {name: value for name, value in _secrets(stack, job_ids).items() if value and value in text}
    assert not leaked, f"secrets in the logs: {sorted(leaked)}"
    # Presigned URLs carry a signature: they must not be logged either (only hosts are).
    assert "X-Amz-Signature=" not in text
    assert "X-Amz-Credential=" not in text
