"""The sample events in events/ drive the handlers as Lambda would (real AWS and moto shapes)."""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import quote_plus

import pytest
from stack_helpers import jobs_for, sidecar
from vap_shared.signing import derive_callback_key, signed_headers

from local_stack import LocalStack

pytestmark = pytest.mark.stack

EVENTS = Path(__file__).resolve().parents[2] / "events"


def load(name: str) -> dict[str, Any]:
    return dict(json.loads((EVENTS / name).read_text(encoding="utf-8")))


def with_s3_object(
    event: dict[str, Any], bucket: str, encoded_key: str, etag: str, size: int, event_time: str | None = None
) -> dict[str, Any]:
    """The sample with its S3 record pointed at an object in the local bucket."""
    record = event["Records"][0]
    body = json.loads(record["body"])
    if event_time:
        body["Records"][0]["eventTime"] = event_time
    s3 = body["Records"][0]["s3"]
    s3["bucket"].update(name=bucket, arn=f"arn:aws:s3:::{bucket}")
    s3["object"].update(key=encoded_key, eTag=etag, size=size)
    record["body"] = json.dumps(body)
    record["messageId"] = str(uuid.uuid4())
    return event


@pytest.fixture(scope="module")
def uploaded(stack: LocalStack) -> dict[str, Any]:
    """An invalid sidecar (fails fast) whose key has a space, so key decoding matters."""
    key = f"inbox/evt-{uuid.uuid4().hex[:8]}/horse balloon.json"
    body = json.dumps(sidecar(aspect_ratio="4:3")).encode()
    etag = stack.put_job(key, body).strip('"')
    (first,) = stack.wait_for_notification(key, timeout_s=60)
    return {"key": key, "etag": etag, "size": len(body), "first": first}


def test_testevent_is_skipped(stack: LocalStack) -> None:
    result = stack.functions["IngestFunction"].invoke(load("s3-sqs-testevent.json"))
    assert result == {"batchItemFailures": []}


def test_real_shaped_put_event(stack: LocalStack, uploaded: dict[str, Any]) -> None:
    key = uploaded["key"]
    event = with_s3_object(
        load("s3-sqs-put.json"), stack.bucket, quote_plus(key, safe="/"), uploaded["etag"], uploaded["size"]
    )
    assert stack.functions["IngestFunction"].invoke(event) == {"batchItemFailures": []}
    notes = stack.wait_for_notification(key, count=2, timeout_s=60)
    # A different S3 event (it has a sequencer) for the same object is a different job; its id
    # follows the contract: event time + sha256(bucket, key, eTag, sequencer).
    s3 = json.loads(event["Records"][0]["body"])["Records"][0]["s3"]
    digest = hashlib.sha256(
        "\n".join([stack.bucket, key, uploaded["etag"], s3["object"]["sequencer"]]).encode()
    )
    expected = f"20261125T180000Z-{digest.hexdigest()[:10]}"
    assert expected in {n.body["job_id"] for n in notes}
    assert {n.body["sidecar_key"] for n in notes} == {key}


def test_moto_shaped_put_event_is_a_duplicate(stack: LocalStack, uploaded: dict[str, Any]) -> None:
    key = uploaded["key"]
    encoded = quote_plus(key, safe="")  # moto encodes "/" too
    (original,) = [json.loads(b) for b in stack.ingest_poller.received_bodies if f'"key": "{encoded}"' in b]
    before = {item["job_id"]["S"] for item in jobs_for(stack, key)}
    event = with_s3_object(
        load("s3-sqs-put-moto.json"),
        stack.bucket,
        encoded,
        uploaded["etag"],
        uploaded["size"],
        event_time=original["Records"][0]["eventTime"],
    )
    assert stack.functions["IngestFunction"].invoke(event) == {"batchItemFailures": []}
    time.sleep(2)
    # Same event time, bucket, key, eTag and (no) sequencer as the emulator's event: same job.
    assert {item["job_id"]["S"] for item in jobs_for(stack, key)} == before
    assert uploaded["first"].body["job_id"] in before
    assert len(stack.notifications_for(key)) == len(before)


def test_gpu_callback_sample(stack: LocalStack) -> None:
    webhook = stack.functions["WebhookFunction"]
    sample = load("function-url-gpu-callback.json")
    # As stored: its timestamp is long past.
    assert webhook.invoke(sample)["statusCode"] == 401
    # Freshly signed for a job the stack does not know.
    job_id = sample["rawPath"].rsplit("/", 1)[1]
    arn = stack.deployment.secret_arns["SigningSecret"] if stack.deployment else ""
    secret = stack.client("secretsmanager").get_secret_value(SecretId=arn)["SecretString"].encode()
    body = sample["body"].encode()
    headers = {k.lower(): v for k, v in signed_headers(derive_callback_key(secret, job_id), body).items()}
    sample["headers"].update(headers)
    assert webhook.invoke(sample)["statusCode"] == 404


def test_fal_webhook_sample_with_bad_signature(stack: LocalStack) -> None:
    sample = load("function-url-fal-webhook.json")
    sample["headers"]["x-fal-webhook-timestamp"] = str(int(time.time()))
    assert stack.functions["WebhookFunction"].invoke(sample)["statusCode"] in (401, 404)
