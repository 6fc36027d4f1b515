"""Helpers for the ops wiring tests: jobs driven through the real handlers on emulated AWS."""

from __future__ import annotations

import json
import time
from typing import Any

import ingest
import webhook
from vap_testkit import (
    MP4,
    PNG,
    Stack,
    call,
    fal_webhook_event,
    gpu_callback_event,
    gpu_result,
    s3_event,
    sqs_event,
)

PROMPT = "A chestnut horse inflates like a balloon and floats away."
DESCRIPTION = "A sneaker inflates into a smooth beige sphere and floats up."
POSTER = b"\xff\xd8\xff\xe0" + b"jpeg" * 50
PREVIEW = b"RIFF\x00\x00\x00\x00WEBPVP8X" + b"webp" * 50

RESULT: dict[str, Any] = gpu_result(
    42,
    gpu="NVIDIA H100 80GB HBM3",
    timings={"download_s": 1.0, "generate_s": 200.0, "encode_s": 5.0, "upload_s": 2.0, "total_s": 210.0},
)


def submit(
    st: Stack,
    name: str,
    *,
    video: bytes = MP4,
    image: bytes = PNG,
    **fields: Any,
) -> str:
    """Media next to the sidecar (inbox/<dir>/clip.mp4, face.png), then the sidecar
    inbox/<dir>/<name>.json, as a user uploads them; ingest runs. The new job's id."""
    folder = "inbox/" + name.rsplit("/", 1)[0]
    st.put(f"{folder}/clip.mp4", video)
    st.put(f"{folder}/face.png", image)
    sidecar: dict[str, Any] = {
        "prompt": PROMPT,
        "video_description": DESCRIPTION,
        "video_url": "clip.mp4",
        "image_url": "face.png",
        "seed": 42,
        "backend": "modal",
        **fields,
    }
    sidecar = {k: v for k, v in sidecar.items() if v is not None}
    raw = json.dumps(sidecar).encode()
    key = f"inbox/{name}.json"
    etag = st.put(key, raw)
    before = set(st.job_ids())
    call(ingest.handler, sqs_event(s3_event(key, etag, size=len(raw), sequencer=f"{time.time_ns():x}")))
    (job_id,) = set(st.job_ids()) - before
    return job_id


def gpu_succeeds(
    st: Stack, job_id: str, *, previews: bool = True, result: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The GPU uploads its video (and previews) to work/ and calls back `succeeded`, and the store
    function stores what the webhook queued; the webhook's reply."""
    job = st.store.get(job_id)
    st.put(f"work/{job_id}/video.mp4", MP4, "video/mp4")
    body = dict(result or RESULT)
    if previews:
        st.put(f"work/{job_id}/poster.jpg", POSTER, "image/jpeg")
        st.put(f"work/{job_id}/preview.webp", PREVIEW, "image/webp")
        body.update(poster_bytes=len(POSTER), preview_bytes=len(PREVIEW))
    payload = {
        "job_id": job_id,
        "call_id": job.backend_call_id,
        "event": "succeeded",
        "sent_at": int(time.time()),
        "result": body,
    }
    response = call(webhook.handler, gpu_callback_event(st, job_id, payload))
    st.store_results()
    return {"status": response["statusCode"], **json.loads(response["body"] or "{}")}


def gpu_fails(st: Stack, job_id: str, code: str, message: str = "it broke") -> int:
    job = st.store.get(job_id)
    payload = {
        "job_id": job_id,
        "call_id": job.backend_call_id,
        "event": "failed",
        "sent_at": int(time.time()),
        "error": {"code": code, "message": message, "retryable": False},
    }
    return int(call(webhook.handler, gpu_callback_event(st, job_id, payload))["statusCode"])


def emf(out: str) -> list[dict[str, Any]]:
    """The EMF documents among the lines a handler printed (Powertools' logs are JSON too)."""
    docs = []
    for line in out.splitlines():
        if line.startswith("{") and '"_aws"' in line:
            doc = json.loads(line)
            if "CloudWatchMetrics" in doc.get("_aws", {}):
                docs.append(doc)
    return docs


def metric_values(docs: list[dict[str, Any]], name: str) -> list[tuple[dict[str, str], float]]:
    """(dimension values, value) of every `name` datum: dimensions are the line's declared keys."""
    found = []
    for doc in docs:
        (directive,) = doc["_aws"]["CloudWatchMetrics"]
        if any(m["Name"] == name for m in directive["Metrics"]):
            keys = {k for dims in directive["Dimensions"] for k in dims}
            value = doc[name]
            for v in value if isinstance(value, list) else [value]:
                found.append(({k: doc[k] for k in sorted(keys)}, float(v)))
    return found


def fal_delivers(st: Stack, job_id: str, payload: dict[str, Any], status: str = "OK") -> int:
    """fal's signed webhook for the job's request (to the job's webhook URL, token included), and
    the store function storing what it queued."""
    job = st.store.get(job_id)
    delivery = {
        "request_id": job.backend_call_id,
        "gateway_request_id": job.backend_call_id,
        "status": status,
    }
    delivery["payload"] = payload
    body = json.dumps(delivery).encode()
    headers = st.services.fal_keys.headers(job.backend_call_id, body)
    status = int(call(webhook.handler, fal_webhook_event(job_id, body, headers))["statusCode"])
    st.store_results()
    return status
