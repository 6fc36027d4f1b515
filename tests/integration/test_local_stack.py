"""The emulation itself: what moto skipped is applied from the template, and the SQS poller and
Function URL behave like Lambda's (so fault tests built on them mean something)."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from local_stack import LocalStack
from local_stack.function_url import FunctionUrlServer
from local_stack.lambda_runtime import LambdaFunction
from local_stack.sqs_poller import SqsPoller

pytestmark = pytest.mark.stack


def stub(fn: Any, reserved: int | None = None) -> LambdaFunction:
    """A function whose handler is `fn`, run in this process (a test double of the function)."""
    return LambdaFunction(
        logical_id="Stub",
        name="stub",
        arn="arn:aws:lambda:us-east-1:123456789012:function:stub",
        code_dir=Path("."),
        handler="stub.handler",
        timeout_s=30,
        memory_mb=128,
        reserved_concurrency=reserved,
        isolation="thread",
        callable_handler=fn,
    )


def wait_until(predicate: Any, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def test_template_settings_moto_skips_are_applied(stack: LocalStack) -> None:
    s3, sqs = stack.s3, stack.sqs
    (queue_config,) = s3.get_bucket_notification_configuration(Bucket=stack.bucket)["QueueConfigurations"]
    rules = {r["Name"].lower(): r["Value"] for r in queue_config["Filter"]["Key"]["FilterRules"]}
    assert rules == {"prefix": "inbox/", "suffix": ".json"}
    assert all(s3.get_public_access_block(Bucket=stack.bucket)["PublicAccessBlockConfiguration"].values())
    ownership = s3.get_bucket_ownership_controls(Bucket=stack.bucket)["OwnershipControls"]["Rules"]
    assert ownership == [{"ObjectOwnership": "BucketOwnerEnforced"}]
    lifecycle = s3.get_bucket_lifecycle_configuration(Bucket=stack.bucket)["Rules"]
    assert any(r.get("Filter", {}).get("Prefix") == "work/" and "Expiration" in r for r in lifecycle)
    attrs = sqs.get_queue_attributes(QueueUrl=stack.ingest_queue_url, AttributeNames=["All"])["Attributes"]
    policy = json.loads(attrs["Policy"])
    assert policy["Statement"][0]["Principal"] == {"Service": "s3.amazonaws.com"}
    # The policy names the bucket CloudFormation created (same expression, resolved apart).
    assert policy["Statement"][0]["Condition"]["ArnLike"]["aws:SourceArn"] == f"arn:aws:s3:::{stack.bucket}"
    assert json.loads(attrs["RedrivePolicy"])["maxReceiveCount"] == 5
    ttl = stack.client("dynamodb").describe_time_to_live(TableName=stack.jobs_table)["TimeToLiveDescription"]
    assert ttl["AttributeName"] == "expires_at"
    webhook = stack.functions["WebhookFunction"]
    # The template's default is no reservation (None); a reservation given as a parameter is applied.
    assert (
        stack.client("lambda")
        .get_function_concurrency(FunctionName=webhook.name)
        .get("ReservedConcurrentExecutions")
        == webhook.reserved_concurrency
    )
    assert stack.deployment is not None
    sm = stack.client("secretsmanager")
    secrets = {
        k: sm.get_secret_value(SecretId=v)["SecretString"] for k, v in stack.deployment.secret_arns.items()
    }
    assert secrets["FalKeySecret"] == stack.fal_key
    assert json.loads(secrets["ModalTokenSecret"]) == {
        "key": stack.modal_token[0],
        "secret": stack.modal_token[1],
    }
    assert len(secrets["SigningSecret"]) == 64 and secrets["SigningSecret"].isalnum()


def test_handlers_get_the_template_environment(stack: LocalStack) -> None:
    ingest = stack.functions["IngestFunction"].effective_environment()
    assert ingest["BUCKET_NAME"] == stack.bucket
    assert ingest["WEBHOOK_BASE_URL"] == stack.webhook_url.rstrip("/")
    assert ingest["AWS_ENDPOINT_URL"] == stack.endpoint_url
    assert ingest["VAP_ALLOW_HTTP_LOOPBACK"] == "1"
    assert stack.gpu is not None and ingest["MODAL_ENDPOINT_URL"] == stack.gpu.url.rstrip("/")
    assert stack.fal is not None and ingest["FAL_QUEUE_URL"] == stack.fal.url
    # Each function gets only what the template gives it (no union of the three).
    webhook = stack.functions["WebhookFunction"].effective_environment()
    assert webhook["POWERTOOLS_SERVICE_NAME"] == "vap-webhook" and "INGEST_QUEUE_URL" not in webhook
    assert set(stack.describe()) >= {"endpoint_url", "region", "bucket", "inbox_prefix", "outputs_prefix",
                                     "topic_arn", "webhook_url", "notifications_queue_url"}  # fmt: skip


@pytest.fixture
def exactly_once(stack: LocalStack) -> Iterator[None]:
    """No duplicate receives: these tests count the event source mapping's own deliveries."""
    with stack.duplicates.forcing("sqs", rate=0.0):
        yield


def _queue_with_dlq(stack: LocalStack, max_receive: int = 2) -> tuple[str, str, str]:
    sqs, name = stack.sqs, f"poller-{uuid.uuid4().hex[:8]}"
    dlq = sqs.create_queue(QueueName=f"{name}-dlq")["QueueUrl"]
    dlq_arn = sqs.get_queue_attributes(QueueUrl=dlq, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    redrive = json.dumps({"deadLetterTargetArn": dlq_arn, "maxReceiveCount": max_receive})
    url = sqs.create_queue(QueueName=name, Attributes={"VisibilityTimeout": "1", "RedrivePolicy": redrive})[
        "QueueUrl"
    ]
    arn = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    return url, arn, dlq


def test_partial_batch_failures_are_redelivered_then_dead_lettered(
    stack: LocalStack, exactly_once: None
) -> None:
    url, arn, dlq = _queue_with_dlq(stack)
    calls: list[list[str]] = []

    def handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
        assert context.get_remaining_time_in_millis() > 0
        calls.append([r["body"] for r in event["Records"]])
        return {
            "batchItemFailures": [
                {"itemIdentifier": r["messageId"]} for r in event["Records"] if r["body"] == "bad"
            ]
        }

    for body in ("ok-1", "bad", "ok-2"):
        stack.sqs.send_message(QueueUrl=url, MessageBody=body)
    poller = SqsPoller(stack.sqs, url, arn, stack.region, stub(handler), batch_size=10, max_concurrency=2)
    poller.start()
    try:
        wait_until(lambda: stack.queue_depth(dlq) == 1)
        wait_until(lambda: stack.queue_depth(url) == 0)
    finally:
        poller.stop()
    seen = [body for batch in calls for body in batch]
    assert seen.count("ok-1") == 1 and seen.count("ok-2") == 1  # deleted after success
    assert seen.count("bad") == 2  # redelivered after the visibility timeout, then maxReceiveCount
    (dead,) = stack.sqs.receive_message(QueueUrl=dlq)["Messages"]
    assert dead["Body"] == "bad"


def test_raised_error_fails_the_whole_batch(stack: LocalStack, exactly_once: None) -> None:
    url, arn, dlq = _queue_with_dlq(stack, max_receive=1)

    def handler(event: dict[str, Any], context: Any) -> None:
        raise RuntimeError("boom")

    stack.sqs.send_message(QueueUrl=url, MessageBody="a")
    poller = SqsPoller(stack.sqs, url, arn, stack.region, stub(handler), batch_size=10, max_concurrency=2)
    poller.start()
    try:
        wait_until(lambda: stack.queue_depth(dlq) == 1)
    finally:
        poller.stop()
    assert poller.stats.deleted == 0


def test_maximum_concurrency_caps_invocations(stack: LocalStack, exactly_once: None) -> None:
    url, arn, _ = _queue_with_dlq(stack, max_receive=5)
    active, peak, lock = [0], [0], threading.Lock()

    def handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        time.sleep(0.3)
        with lock:
            active[0] -= 1
        return {"batchItemFailures": []}

    stack.sqs.send_message_batch(
        QueueUrl=url, Entries=[{"Id": str(i), "MessageBody": str(i)} for i in range(10)]
    )
    stack.sqs.send_message_batch(
        QueueUrl=url, Entries=[{"Id": str(i), "MessageBody": str(i)} for i in range(10)]
    )
    poller = SqsPoller(stack.sqs, url, arn, stack.region, stub(handler), batch_size=1, max_concurrency=3)
    poller.start()
    try:
        wait_until(lambda: poller.stats.deleted == 20, timeout_s=60)
    finally:
        poller.stop()
    assert peak[0] <= 3
    assert poller.stats.max_in_flight <= 3


def test_function_url_payload_v2() -> None:
    events: list[dict[str, Any]] = []

    def handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
        events.append(event)
        return {"statusCode": 202, "headers": {"X-Echo": "1"}, "body": "accepted"}

    server = FunctionUrlServer(stub(handler))
    server.start()
    try:
        reply = httpx.post(
            server.url + "callbacks/gpu/j1?a=1&a=2", json={"x": 1}, headers={"X-VAP-Timestamp": "5"}
        )
        assert (reply.status_code, reply.text, reply.headers["x-echo"]) == (202, "accepted", "1")
        httpx.put(
            server.url + "bin", content=b"\x00\xff", headers={"Content-Type": "application/octet-stream"}
        )
    finally:
        server.stop()
    text, binary = events
    assert text["version"] == "2.0" and text["rawPath"] == "/callbacks/gpu/j1"
    assert text["rawQueryString"] == "a=1&a=2" and text["queryStringParameters"] == {"a": "1,2"}
    assert text["headers"]["x-vap-timestamp"] == "5"  # lower-cased
    assert text["requestContext"]["http"]["method"] == "POST"
    assert json.loads(text["body"]) == {"x": 1} and text["isBase64Encoded"] is False
    assert binary["isBase64Encoded"] is True and binary["body"] == "AP8="


def test_function_url_throttles_at_reserved_concurrency() -> None:
    release = threading.Event()

    def handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
        release.wait(10)
        return {"statusCode": 200, "body": "ok"}

    server = FunctionUrlServer(stub(handler, reserved=1))
    server.start()
    try:
        first = threading.Thread(target=httpx.post, args=(server.url,), kwargs={"content": b"{}"})
        first.start()
        wait_until(lambda: server.function.environments == 1)
        assert httpx.post(server.url, content=b"{}").status_code == 429
        release.set()
        first.join()
    finally:
        server.stop()
