"""IAM on the local stack as on AWS: every request is authorized; each function signs with its own
role from template.yaml (so what its policy lacks is AccessDenied here too), the harness with an
admin user; presigned URLs carry their signer's permissions and expire.

Each test here fails with `VAP_LOCAL_IAM=0`."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import boto3
import httpx
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError
from stack_helpers import probe_function

from local_stack import LocalStack
from local_stack.lambda_runtime import LambdaFunction

pytestmark = pytest.mark.stack


@pytest.fixture
def as_ingest(stack: LocalStack) -> Iterator[LambdaFunction]:
    """The probe handler running with the ingest function's role."""
    function = probe_function(stack, timeout_s=20.0, role_of="IngestFunction")
    yield function
    function.stop()


def _call(function: LambdaFunction, service: str, operation: str, **params: object) -> str:
    result = function.invoke({"action": "aws", "service": service, "operation": operation, "params": params})
    return str(result["code"])


def test_unknown_credentials_are_refused(stack: LocalStack) -> None:
    stranger = boto3.client(
        "sqs",
        endpoint_url=stack.endpoint_url,
        region_name=stack.region,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    with pytest.raises(ClientError) as raised:
        stranger.list_queues()
    assert "InvalidClientTokenId" in str(raised.value) or "InvalidAccessKeyId" in str(raised.value)


def test_each_function_calls_aws_as_its_own_role(stack: LocalStack) -> None:
    for logical_id in ("IngestFunction", "WebhookFunction", "SweeperFunction"):
        function = probe_function(stack, role_of=logical_id)
        try:
            identity = function.invoke(
                {"action": "aws", "service": "sts", "operation": "get_caller_identity"}
            )["result"]
        finally:
            function.stop()
        assert stack.deployment is not None
        spec = stack.deployment.functions[logical_id]
        role_name = spec.role_arn.rsplit("/", 1)[1]
        assert identity["Arn"] == f"arn:aws:sts::123456789012:assumed-role/{role_name}/probe"
        # What the function's own environments get: its role, in a session named after it.
        own = stack.client_as("sts", stack.role_credentials(logical_id)).get_caller_identity()
        assert own["Arn"] == f"arn:aws:sts::123456789012:assumed-role/{role_name}/{spec.name}"


def test_a_function_is_denied_what_its_role_does_not_allow(
    stack: LocalStack, as_ingest: LambdaFunction
) -> None:
    key = f"inbox/iam-{uuid.uuid4().hex[:8]}/x.json"
    stack.s3.put_object(Bucket=stack.bucket, Key=key, Body=b"{}")
    before = len(stack.denied)
    # What the ingest role allows ...
    assert _call(as_ingest, "s3", "get_object", Bucket=stack.bucket, Key=key) == "ok"
    assert (
        _call(as_ingest, "dynamodb", "get_item", TableName=stack.jobs_table, Key={"job_id": {"S": "x"}})
        == "ok"
    )
    # ... and what it does not: writing the inbox, scanning the table, the DLQ, another topic.
    assert _call(as_ingest, "s3", "put_object", Bucket=stack.bucket, Key=key, Body="{}") == "AccessDenied"
    assert _call(as_ingest, "dynamodb", "scan", TableName=stack.jobs_table) == "AccessDeniedException"
    assert _call(as_ingest, "sqs", "receive_message", QueueUrl=stack.dlq_url) == "AccessDeniedException"
    operator_topic = stack.deployment.outputs["OperatorTopicArn"] if stack.deployment else ""
    assert _call(as_ingest, "sns", "publish", TopicArn=operator_topic, Message="x") == "AccessDenied"
    # Each refusal is recorded (the stack tests fail on any of a template function's own).
    refused = {(d.action, d.principal.rsplit("/", 1)[-1]) for d in stack.denied[before:]}
    assert {("s3:PutObject", "probe"), ("dynamodb:Scan", "probe"), ("sqs:ReceiveMessage", "probe")} <= refused


def _presigning(stack: LocalStack, logical_id: str) -> object:
    credentials = stack.role_credentials(logical_id, "presigner")
    return boto3.session.Session(
        aws_access_key_id=credentials["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=credentials["AWS_SECRET_ACCESS_KEY"],
        aws_session_token=credentials["AWS_SESSION_TOKEN"],
        region_name=stack.region,
    ).client(
        "s3",
        endpoint_url=stack.endpoint_url,
        config=Config(signature_version="s3v4", s3={"addressing_style": "path"}),
    )


def test_a_presigned_url_carries_its_signers_permissions_and_expires(stack: LocalStack) -> None:
    folder = f"iam-{uuid.uuid4().hex[:8]}"
    readable, unreadable = f"inbox/{folder}/clip.mp4", f"elsewhere/{folder}/clip.mp4"
    for key in (readable, unreadable):
        stack.s3.put_object(Bucket=stack.bucket, Key=key, Body=b"media")
    s3 = _presigning(stack, "WebhookFunction")  # may read inbox/ and work/, write outputs/

    def url(key: str, expires: int = 60, method: str = "get_object") -> str:
        return str(
            s3.generate_presigned_url(method, Params={"Bucket": stack.bucket, "Key": key}, ExpiresIn=expires)
        )  # type: ignore[attr-defined]

    assert httpx.get(url(readable)).content == b"media"
    assert httpx.get(url(unreadable)).status_code == 403
    assert httpx.put(url(f"inbox/{folder}/new.json", method="put_object"), content=b"{}").status_code == 403
    assert httpx.put(url(f"outputs/{folder}/video.mp4", method="put_object"), content=b"v").status_code == 200
    tampered = url(readable).replace("X-Amz-Signature=", "X-Amz-Signature=0")
    assert "SignatureDoesNotMatch" in httpx.get(tampered).text
    short = url(readable, expires=1)
    time.sleep(1.5)
    expired = httpx.get(short)
    assert expired.status_code == 403 and "Request has expired" in expired.text
