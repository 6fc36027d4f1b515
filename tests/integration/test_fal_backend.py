# ruff: noqa: E501  (fal's example JSON is copied verbatim, long lines included)
"""fal's own example input, dropped in as a sidecar with backend fal: accepted, dispatched to the
(local) fal queue with its URLs unchanged, finished through fal's Ed25519-signed webhook."""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from stack_helpers import jobs_for
from vap_shared import routes
from vap_shared.fal_token import fal_webhook_token

from local_stack import LocalStack
from local_stack.fal_server import FalServer

pytestmark = pytest.mark.stack

# Copied verbatim from ../shared/reference/fal-video-as-prompt-api.txt ("Input" example).
FAL_EXAMPLE = json.loads(
    r"""
{
"prompt": "A chestnut-colored horse stands on a grassy hill against a backdrop of distant, snow-dusted mountains. The horse begins to inflate, its defined, muscular body swelling and rounding into a smooth, balloon-like form while retaining its rich, brown hide color. Without changing its orientation, the now-buoyant horse lifts silently from the ground. It begins a steady vertical ascent, rising straight up and eventually floating out of the top of the frame. The camera remains completely static throughout the entire sequence, holding a fixed shot on the landscape as the horse transforms and departs, ensuring the verdant hill and mountain range in the background stay perfectly still.",
"video_url": "https://storage.googleapis.com/falserverless/bytedance-vid2pro/object-725.mp4",
"image_url": "https://storage.googleapis.com/falserverless/bytedance-vid2pro/animal-2.jpg",
"num_frames": 49,
"fps": 16,
"video_description": "A hand holds up a single beige sneaker decorated with gold calligraphy and floral illustrations, with small green plants tucked inside. The sneaker immediately begins to inflate like a balloon, its shape distorting as the decorative details stretch and warp across the expanding surface. It rapidly transforms into a perfectly smooth, matte beige sphere, inheriting the primary color from the original shoe. Once the transformation is complete, the new balloon-like object quickly ascends, moving straight up and exiting the top of the frame. The camera remains completely static and the plain white background is unchanged throughout the entire sequence.",
"enable_safety_checker": true,
"aspect_ratio": "9:16",
"resolution": "480p",
"guidance_scale": 5
}
"""
)


@pytest.fixture(scope="module")
def fal_job(stack: LocalStack) -> dict[str, Any]:
    key = f"inbox/fal-{time.time_ns()}/horse.json"
    before = set(stack.fal.requests) if stack.fal else set()
    stack.put_job(key, {**FAL_EXAMPLE, "backend": "fal"})
    (note,) = stack.wait_for_notification(key, timeout_s=120)
    assert stack.fal is not None
    (request,) = [r for rid, r in stack.fal.requests.items() if rid not in before]
    return {"key": key, "note": note, "request": request}


def test_fal_example_is_dispatched_unchanged(stack: LocalStack, fal_job: dict[str, Any]) -> None:
    request = fal_job["request"]
    assert request.endpoint_id == "fal-ai/video-as-prompt"
    assert request.headers["authorization"] == f"Key {stack.fal_key}"
    for field in ("prompt", "video_description", "video_url", "image_url"):
        assert request.input[field] == FAL_EXAMPLE[field], field
    for field in ("num_frames", "fps", "aspect_ratio", "resolution", "enable_safety_checker"):
        assert request.input[field] == FAL_EXAMPLE[field], field
    assert request.input["guidance_scale"] == 5
    assert "backend" not in request.input
    job_id = fal_job["note"].body["job_id"]
    # The job's webhook URL, with the job's token only we and fal know (vap_shared.fal_token).
    signing = stack.client("secretsmanager").get_secret_value(
        SecretId=stack.deployment.outputs["SigningSecretArn"]
    )
    token = fal_webhook_token(signing["SecretString"].encode(), job_id)
    assert request.webhook_url == f"{routes.url(stack.webhook_url, 'fal', job_id)}?token={token}"


def test_fal_webhook_stores_video_and_notifies_once(stack: LocalStack, fal_job: dict[str, Any]) -> None:
    note = fal_job["note"]
    assert note.body["status"] == "succeeded", note.body
    assert note.body["backend"] == "fal"
    assert note.attributes == {"status": "succeeded", "backend": "fal"}
    data = stack.s3.get_object(Bucket=stack.bucket, Key=note.body["output_key"])["Body"].read()
    assert data[4:8] == b"ftyp"
    assert fal_job["request"].deliveries[0] == 200


def test_repeated_fal_deliveries_notify_once(stack: LocalStack, fal_job: dict[str, Any]) -> None:
    assert stack.fal is not None
    request = fal_job["request"]
    body = stack.fal.webhook_body(request)
    for _ in range(3):
        reply = httpx.post(
            request.webhook_url, content=body, headers=stack.fal.sign(request.request_id, body)
        )
        assert reply.status_code == 200, reply.text
    time.sleep(2)
    assert len(stack.notifications_for(fal_job["key"])) == 1


def test_forged_or_stale_fal_webhook_is_rejected(stack: LocalStack, fal_job: dict[str, Any]) -> None:
    assert stack.fal is not None
    request = fal_job["request"]
    body = stack.fal.webhook_body(request)
    stale = stack.fal.sign(request.request_id, body, timestamp=int(time.time()) - 3600)
    forged = stack.fal.sign(request.request_id, body)
    forged["X-Fal-Webhook-Signature"] = Ed25519PrivateKey.generate().sign(b"anything").hex()
    tampered = stack.fal.sign(request.request_id, body)
    for headers, payload in ((stale, body), (forged, body), (tampered, body.replace(b'"OK"', b'"ERROR"'))):
        reply = httpx.post(request.webhook_url, content=payload, headers=headers)
        assert reply.status_code == 401, reply.text
    assert len(stack.notifications_for(fal_job["key"])) == 1


def test_deliveries_from_another_fal_account_change_nothing(stack: LocalStack, fal: FalServer) -> None:
    """fal signs every account's webhooks alike: deliveries of someone else's request, correctly
    signed, sent to the job's webhook path before fal delivers ours, are refused; the job ends with
    its own result, notified once."""
    fal.behaviour.impostor_deliveries = 2
    key = f"inbox/fal-impostor-{time.time_ns()}/horse.json"
    stack.put_job(key, {**FAL_EXAMPLE, "backend": "fal"})
    (note,) = stack.wait_for_notification(key, timeout_s=120)
    (request,) = [r for r in fal.requests.values() if r.webhook_url and note.body["job_id"] in r.webhook_url]
    assert request.impostor_answers == [401, 401]
    assert note.body["status"] == "succeeded"
    job = jobs_for(stack, key)[0]
    assert job["backend_call_id"]["S"] == request.request_id
    data = stack.s3.get_object(Bucket=stack.bucket, Key=note.body["output_key"])["Body"].read()
    assert data == fal.files[request.output["video"]["url"].split("/", 3)[3]]  # our video, not theirs
    time.sleep(1)
    assert len(stack.notifications_for(key)) == 1


def test_fal_example_as_is_is_accepted_and_dispatched(stack: LocalStack) -> None:
    """Without a `backend` field it goes to the stack default (Modal first), URLs untouched."""
    key = f"inbox/fal-asis-{time.time_ns()}/horse.json"
    stack.put_job(key, FAL_EXAMPLE)
    deadline = time.monotonic() + 60
    job: dict[str, Any] = {}
    while time.monotonic() < deadline:
        items = jobs_for(stack, key)
        if items and "backend_call_id" in items[0]:
            job = items[0]
            break
        time.sleep(0.2)
    assert job, "the job was never dispatched"
    assert job["backend"]["S"] in ("modal", "fal")
    inputs = json.loads(job["inputs"]["S"])
    assert inputs["video_url"] == {"kind": "https", "url": FAL_EXAMPLE["video_url"]}
    assert inputs["image_url"] == {"kind": "https", "url": FAL_EXAMPLE["image_url"]}
    # Offline, the GPU cannot fetch storage.googleapis.com: the job ends (once) either way.
    (note,) = stack.wait_for_notification(key, timeout_s=180)
    assert note.body["status"] in ("succeeded", "failed")
