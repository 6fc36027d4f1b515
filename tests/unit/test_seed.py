"""The seed used is always reported: fal's output carries no seed, so ingest
draws one when the sidecar has none, records it, and sends it to whichever backend runs the job."""

from __future__ import annotations

import json
import time
from typing import Any

import ingest
import pytest
import webhook
from vap_shared.contract import SEED_MAX
from vap_testkit import (
    FAL_EXAMPLE,
    FakeServices,
    call,
    fal_webhook_event,
    gpu_callback_event,
    handlers_on,
    s3_event,
    sqs_event,
    stack,
    upload_fal_example,
)


@pytest.fixture
def services() -> FakeServices:
    return FakeServices()


@pytest.fixture
def st(monkeypatch, services):  # type: ignore[no-untyped-def]
    with stack(monkeypatch, services) as s, handlers_on(s):
        yield s


def the_job(st):  # type: ignore[no-untyped-def]
    (job_id,) = st.job_ids()
    return st.store.get(job_id)


def fal_submits(st) -> list[dict[str, Any]]:  # type: ignore[no-untyped-def]
    return [json.loads(r.content) for r in st.services.calls("queue.fal.test") if r.method == "POST"]


def deliver_fal_success(st, job) -> None:  # type: ignore[no-untyped-def]
    """fal's webhook: its payload has a video and no seed (fal's output never has one)."""
    delivery = {
        "request_id": job.backend_call_id,
        "gateway_request_id": job.backend_call_id,
        "status": "OK",
        "payload": {"video": {"url": "https://v3.fal.media/files/a/out.mp4", "content_type": "video/mp4"}},
    }
    body = json.dumps(delivery).encode()
    headers = st.services.fal_keys.headers(job.backend_call_id, body)
    response = call(webhook.handler, fal_webhook_event(job.job_id, body, headers))
    assert response["statusCode"] == 200, response
    st.store_results()


def test_a_fal_job_without_a_seed_reports_the_seed_fal_was_sent(st):
    assert "seed" not in FAL_EXAMPLE
    call(ingest.handler, sqs_event(upload_fal_example(st, backend="fal")))
    job = the_job(st)
    (sent,) = fal_submits(st)
    seed = sent["seed"]
    assert isinstance(seed, int) and 0 <= seed <= SEED_MAX
    assert job.seed == seed and job.settings["seed"] == seed
    deliver_fal_success(st, job)
    done = the_job(st)
    assert done.state == "succeeded" and done.seed == seed
    (note,) = st.notifications()
    assert note["status"] == "succeeded" and note["seed"] == seed
    assert st.get_json(done.metadata_key)["seed"] == seed
    assert st.get_json(f"{done.output_prefix}status.json")["seed"] == seed


def test_the_seed_sent_to_modal_is_the_one_a_fallback_sends_to_fal(monkeypatch):
    services = FakeServices()
    with stack(monkeypatch, services) as st, handlers_on(st):
        call(ingest.handler, sqs_event(upload_fal_example(st, backend="auto")))
        job = the_job(st)
        (modal,) = [json.loads(r.content) for r in services.calls("modal.test")]
        seed = modal["settings"]["seed"]
        assert isinstance(seed, int) and job.seed == seed
        st.put(f"work/{job.job_id}/video.mp4", b"not an mp4")  # the GPU's upload is unusable: fal
        body = {
            "job_id": job.job_id,
            "call_id": job.backend_call_id,
            "event": "succeeded",
            "sent_at": int(time.time()),
        }
        assert call(webhook.handler, gpu_callback_event(st, job.job_id, body))["statusCode"] == 200
        assert the_job(st).backend == "fal"
        assert [s["seed"] for s in fal_submits(st)] == [seed]


def test_a_retried_dispatch_keeps_the_seed_it_drew(monkeypatch):
    services = FakeServices(modal_status=503)  # Modal down: the message is retried
    with stack(monkeypatch, services) as st, handlers_on(st):
        event = upload_fal_example(st, backend="modal")
        assert call(ingest.handler, sqs_event(event))["batchItemFailures"]
        services.modal_status = 202
        assert call(ingest.handler, sqs_event(event, receive_count=2)) == {"batchItemFailures": []}
        seeds = [json.loads(r.content)["settings"]["seed"] for r in services.calls("modal.test")]
        # The first delivery asks twice (a 503 is asked again once), the retry once: one seed throughout.
        assert len(seeds) == 3 and set(seeds) == {the_job(st).seed}


def test_a_sidecar_seed_is_sent_unchanged(st):
    call(ingest.handler, sqs_event(upload_fal_example(st, backend="fal")))
    first = fal_submits(st)[0]["seed"]
    sidecar = {**FAL_EXAMPLE, "video_url": "clip.mp4", "image_url": "face.png", "backend": "fal", "seed": 42}
    raw = json.dumps(sidecar).encode()
    etag = st.put("inbox/set/seeded.json", raw)
    call(ingest.handler, sqs_event(s3_event("inbox/set/seeded.json", etag, size=len(raw))))
    assert [s["seed"] for s in fal_submits(st)] == [first, 42]
