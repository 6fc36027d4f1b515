"""Shared helpers for the Lambda-layer unit tests: moto resources, fake Modal/fal over
httpx.MockTransport, keys generated per test, event builders."""

from __future__ import annotations

import base64
import hashlib
import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import boto3
import httpx
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from media_kit import mp4, png
from moto import mock_aws
from vap_shared import routes
from vap_shared.config import Settings
from vap_shared.runtime import Runtime
from vap_shared.signing import derive_callback_key, signed_headers

REGION = "us-east-1"
BUCKET = "vap-test-bucket"
TABLE = "vap-jobs"
SIGNING_SECRET = "test-stack-secret-0123456789abcdef"
FAKE_FAL_API_KEY = "fal-test-key-abc"
MODAL_KEY, MODAL_SECRET = "wk-test", "ws-test"
MODAL_URL = "https://modal.test"
FAL_QUEUE = "https://queue.fal.test"
JWKS_URL = "https://jwks.test/.well-known/jwks.json"
WEBHOOK_BASE = "https://hooks.test"
# Structurally complete media (ingest checks an upload's MP4 boxes / PNG header before dispatch).
PNG = png()
MP4 = mp4()

FAL_EXAMPLE: dict[str, Any] = {
    "prompt": "A chestnut-colored horse stands on a grassy hill against a backdrop of distant, snow-dusted "
    "mountains. The horse begins to inflate, its defined, muscular body swelling and rounding into a smooth, "
    "balloon-like form while retaining its rich, brown hide color.",
    "video_url": "https://storage.googleapis.com/falserverless/bytedance-vid2pro/object-725.mp4",
    "image_url": "https://storage.googleapis.com/falserverless/bytedance-vid2pro/animal-2.jpg",
    "num_frames": 49,
    "fps": 16,
    "video_description": "A hand holds up a single beige sneaker decorated with gold calligraphy and floral "
    "illustrations, with small green plants tucked inside.",
    "enable_safety_checker": True,
    "aspect_ratio": "9:16",
    "resolution": "480p",
    "guidance_scale": 5,
}


def b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


@dataclass
class FalKeys:
    private: Ed25519PrivateKey = field(default_factory=Ed25519PrivateKey.generate)

    def jwks(self) -> dict[str, Any]:
        raw = self.private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        return {"keys": [{"kty": "OKP", "crv": "Ed25519", "x": b64url(raw)}]}

    def headers(
        self, request_id: str, body: bytes, now: float | None = None, user: str = "user-1"
    ) -> dict[str, str]:
        ts = str(int(time.time() if now is None else now))
        message = "\n".join([request_id, user, ts, hashlib.sha256(body).hexdigest()]).encode()
        return {
            "content-type": "application/json",
            "x-fal-webhook-request-id": request_id,
            "x-fal-webhook-user-id": user,
            "x-fal-webhook-timestamp": ts,
            "x-fal-webhook-signature": self.private.sign(message).hex(),
        }


@dataclass
class FakeServices:
    """Modal, fal queue, fal CDN and JWKS behind one MockTransport; tweak the attributes per test."""

    fal_keys: FalKeys = field(default_factory=FalKeys)
    modal_status: int = 202
    modal_error: type[Exception] | None = None
    fal_status: int = 200
    fal_error: type[Exception] | None = None
    fal_body: dict[str, Any] | None = None
    cdn_body: bytes = MP4
    cdn_status: int = 200
    requests: list[httpx.Request] = field(default_factory=list)
    counter: int = 0
    modal_calls: dict[str, str] = field(default_factory=dict)  # job id -> call id (GPU API's memory)
    on_modal_submit: Callable[[dict[str, Any]], None] | None = None

    def calls(self, host: str) -> list[httpx.Request]:
        return [r for r in self.requests if r.url.host == host]

    def handler(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        host = request.url.host
        if host == "modal.test":
            if self.modal_error:
                raise self.modal_error("boom", request=request)
            if (
                request.headers.get("modal-key") != MODAL_KEY
                or request.headers.get("modal-secret") != MODAL_SECRET
            ):
                return httpx.Response(401)
            if request.url.path == "/submit" and self.modal_status < 300:
                # Like the GPU API: a repeated job id is answered with that job's call, nothing new runs.
                job_id = json.loads(request.content).get("job_id", "")
                if job_id in self.modal_calls:
                    return httpx.Response(self.modal_status, json={"call_id": self.modal_calls[job_id]})
            self.counter += 1
            call_id = f"fc-{self.counter}"
            if self.modal_status < 300 and request.url.path == "/submit":
                self.modal_calls[json.loads(request.content).get("job_id", "")] = call_id
            if self.on_modal_submit and self.modal_status < 300:
                self.on_modal_submit({**json.loads(request.content), "call_id": call_id})
            return httpx.Response(self.modal_status, json={"call_id": call_id})
        if host == "queue.fal.test":
            if self.fal_error:
                raise self.fal_error("boom", request=request)
            if request.headers.get("authorization") != f"Key {FAKE_FAL_API_KEY}":
                return httpx.Response(401)
            self.counter += 1
            rid = f"req-{self.counter}"
            body = self.fal_body or {
                "request_id": rid,
                "status": "IN_QUEUE",
                "status_url": f"{FAL_QUEUE}/fal-ai/video-as-prompt/requests/{rid}/status",
                "response_url": f"{FAL_QUEUE}/fal-ai/video-as-prompt/requests/{rid}",
                "cancel_url": f"{FAL_QUEUE}/fal-ai/video-as-prompt/requests/{rid}/cancel",
            }
            return httpx.Response(self.fal_status, json=body)
        if host == "jwks.test":
            return httpx.Response(200, json=self.fal_keys.jwks())
        if host.endswith("fal.media"):
            return httpx.Response(self.cdn_status, content=self.cdn_body)
        return httpx.Response(404)

    def client(self) -> httpx.Client:
        return httpx.Client(transport=httpx.MockTransport(self.handler))


def env(**overrides: str) -> dict[str, str]:
    values = {
        "AWS_DEFAULT_REGION": REGION,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "BUCKET_NAME": BUCKET,
        "INBOX_PREFIX": "inbox/",
        "OUTPUTS_PREFIX": "outputs/",
        "WORK_PREFIX": "work/",
        "JOBS_TABLE": TABLE,
        "TOPIC_ARN": "",
        "DEFAULT_BACKEND": "auto",
        "MODAL_ENDPOINT_URL": MODAL_URL,
        "FAL_ENDPOINT_ID": "fal-ai/video-as-prompt",
        "FAL_QUEUE_URL": FAL_QUEUE,
        "FAL_JWKS_URL": JWKS_URL,
        "FAL_MEDIA_HOSTS": "*.fal.media",
        "ALLOWED_MEDIA_HOSTS": "storage.googleapis.com,*.example.org",
        "WEBHOOK_BASE_URL": WEBHOOK_BASE,
        "MAX_SIDECAR_BYTES": "65536",
        "MAX_DATA_URI_BYTES": "4096",
        "MAX_OUTPUT_BYTES": str(50 * 1024 * 1024),
        "JOB_TTL_DAYS": "30",
        # The smallest budget: the sweeper stops a job after 5400 s (its tests' clock).
        "JOB_BUDGET_SECONDS": "4800",
        # Room for every job a test dispatches (the fakes never finish them); capacity tests set less.
        "MODAL_CONTAINERS": "50",
        "FAL_MAX_OUTSTANDING": "100",
        "CAPACITY_RECHECK_SECONDS": "30",
        "POWERTOOLS_SERVICE_NAME": "vap-test",
    }
    values.update(overrides)
    return values


@dataclass
class Stack:
    runtime: Runtime
    services: FakeServices
    s3: Any
    sqs: Any
    notify_queue_url: str
    topic_arn: str
    # Store requests handed back for a retry: message id -> receipt handle of that receive.
    store_retries: dict[str, str] = field(default_factory=dict)

    @property
    def store(self):  # type: ignore[no-untyped-def]
        return self.runtime.store

    def put(self, key: str, body: bytes | str, content_type: str = "application/octet-stream") -> str:
        data = body.encode() if isinstance(body, str) else body
        return str(self.s3.put_object(Bucket=BUCKET, Key=key, Body=data, ContentType=content_type)["ETag"])

    def notifications(self) -> list[dict[str, Any]]:
        out = []
        while True:
            got = self.sqs.receive_message(
                QueueUrl=self.notify_queue_url, MaxNumberOfMessages=10, MessageAttributeNames=["All"]
            ).get("Messages", [])
            if not got:
                return out
            for m in got:
                envelope = json.loads(m["Body"])
                body = json.loads(envelope["Message"])
                body["_subject"] = envelope.get("Subject")
                body["_attributes"] = {
                    k: v["Value"] for k, v in envelope.get("MessageAttributes", {}).items()
                }
                out.append(body)
                self.sqs.delete_message(QueueUrl=self.notify_queue_url, ReceiptHandle=m["ReceiptHandle"])

    def handed_back(self) -> list[dict[str, Any]]:
        """Messages ingest sent back to its own queue (with their attributes), received and deleted as
        the next poll would."""
        url = self.runtime.settings.ingest_queue_url
        out: list[dict[str, Any]] = []
        while got := self.sqs.receive_message(
            QueueUrl=url,
            MaxNumberOfMessages=10,
            AttributeNames=["All"],
            MessageAttributeNames=["All"],
            WaitTimeSeconds=0,
        ).get("Messages", []):
            for m in got:
                out.append(m)
                self.sqs.delete_message(QueueUrl=url, ReceiptHandle=m["ReceiptHandle"])
        return out

    def serialize_moto(self) -> None:
        """DynamoDB applies each conditional write atomically and S3 objects are safe to copy
        concurrently; moto's in-process backends lock neither, so concurrent tests serialise
        their calls to get the real semantics."""
        import threading

        lock = threading.RLock()
        targets = {
            self.runtime.store._client: ("get_item", "put_item", "update_item"),
            self.runtime.s3: ("get_object", "put_object", "head_object", "copy_object"),
        }
        for client, names in targets.items():
            for name in names:
                original = getattr(client, name)

                def locked(*args: Any, _original: Any = original, **kwargs: Any) -> Any:
                    with lock:
                        return _original(*args, **kwargs)

                setattr(client, name, locked)

    def store_requests_waiting(self) -> int:
        """How many store requests the store queue holds (visible or in flight)."""
        url = self.runtime.settings.store_queue_url
        names = ["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"]
        attrs = self.sqs.get_queue_attributes(QueueUrl=url, AttributeNames=names)["Attributes"]
        return sum(int(attrs[n]) for n in names)

    def store_results(self, remaining_ms: int = 300_000) -> dict[str, Any]:
        """Run the store function, as its SQS event source would, on every visible store request
        (one per invocation, BatchSize 1); the ones it stored are deleted, the others stay for
        SQS (with the visibility the function gave them). Returns the handler's answers."""
        import store

        url = self.runtime.settings.store_queue_url
        answers: dict[str, Any] = {}
        while True:
            got = self.sqs.receive_message(
                QueueUrl=url, MaxNumberOfMessages=1, AttributeNames=["All"], VisibilityTimeout=1800
            ).get("Messages", [])
            if not got:
                return answers
            message = got[0]
            event = sqs_event(
                message["Body"], receive_count=int(message["Attributes"]["ApproximateReceiveCount"])
            )
            record = event["Records"][0]
            record.update(
                messageId=message["MessageId"],
                receiptHandle=message["ReceiptHandle"],
                eventSourceARN=f"arn:aws:sqs:{REGION}:123456789012:store",
            )
            answer = store.handler(event, Context(remaining_ms))
            answers[message["MessageId"]] = answer
            if not answer["batchItemFailures"]:
                self.sqs.delete_message(QueueUrl=url, ReceiptHandle=message["ReceiptHandle"])
            else:
                self.store_retries[message["MessageId"]] = message["ReceiptHandle"]

    def end_store_retry_delays(self) -> None:
        """Let the store requests handed back for a retry come back now (their delay over)."""
        url = self.runtime.settings.store_queue_url
        for receipt in self.store_retries.values():
            self.sqs.change_message_visibility(QueueUrl=url, ReceiptHandle=receipt, VisibilityTimeout=0)
        self.store_retries.clear()

    def job_ids(self) -> list[str]:
        items = self.runtime.store._client.scan(TableName=TABLE)["Items"]
        # Jobs only: the table also holds one admission record per backend (no `state`).
        return [item["job_id"]["S"] for item in items if "state" in item]

    def get_json(self, key: str) -> Any:
        return json.loads(self.s3.get_object(Bucket=BUCKET, Key=key)["Body"].read())

    def object_keys(self, prefix: str = "") -> list[str]:
        return [o["Key"] for o in self.s3.list_objects_v2(Bucket=BUCKET, Prefix=prefix).get("Contents", [])]

    def gpu_key(self, job_id: str) -> bytes:
        return derive_callback_key(SIGNING_SECRET.encode(), job_id)


_session: boto3.session.Session | None = None


def jobs_table_spec() -> dict[str, Any]:
    """The jobs table's keys and indexes exactly as template.yaml declares them."""
    from pathlib import Path

    from local_stack.cfn import load_template

    template = load_template(Path(__file__).resolve().parents[2] / "template.yaml")
    props = template["Resources"]["JobsTable"]["Properties"]
    keys = ("AttributeDefinitions", "KeySchema", "GlobalSecondaryIndexes", "BillingMode")
    return {k: props[k] for k in keys}


def session() -> boto3.session.Session:
    """One session for all tests: botocore then loads its service models once (fast setup)."""
    global _session
    if _session is None:
        _session = boto3.session.Session(region_name=REGION)
    return _session


@contextmanager
def stack(monkeypatch: Any, services: FakeServices | None = None, **overrides: str) -> Iterator[Stack]:
    for k, v in env(**overrides).items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.delenv("VAP_ALLOW_HTTP_LOOPBACK", raising=False)
    services = services or FakeServices()
    with mock_aws():
        s3 = session().client("s3")
        s3.create_bucket(Bucket=BUCKET)
        ddb = session().client("dynamodb")
        ddb.create_table(TableName=TABLE, **jobs_table_spec())
        sns = session().client("sns")
        topic = sns.create_topic(Name="vap-notify")["TopicArn"]
        sqs = session().client("sqs")
        ingest_queue = sqs.create_queue(QueueName="ingest")["QueueUrl"]
        monkeypatch.setenv("INGEST_QUEUE_URL", ingest_queue)
        store_queue = sqs.create_queue(QueueName="store", Attributes={"VisibilityTimeout": "1800"})[
            "QueueUrl"
        ]
        monkeypatch.setenv("STORE_QUEUE_URL", store_queue)
        queue_url = sqs.create_queue(QueueName="notify-sub")["QueueUrl"]
        queue_arn = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"])["Attributes"][
            "QueueArn"
        ]
        sns.subscribe(TopicArn=topic, Protocol="sqs", Endpoint=queue_arn)
        sm = session().client("secretsmanager")
        arns = {
            "SIGNING_SECRET_ARN": sm.create_secret(Name="signing", SecretString=SIGNING_SECRET)["ARN"],
            "FAL_KEY_SECRET_ARN": sm.create_secret(Name="fal", SecretString=FAKE_FAL_API_KEY)["ARN"],
            "MODAL_TOKEN_SECRET_ARN": sm.create_secret(
                Name="modal", SecretString=json.dumps({"key": MODAL_KEY, "secret": MODAL_SECRET})
            )["ARN"],
        }
        for k, v in {**arns, "TOPIC_ARN": topic}.items():
            monkeypatch.setenv(k, v)
        runtime = Runtime.build(Settings.from_env(), session=session(), http=services.client())
        yield Stack(runtime, services, s3, sqs, queue_url, topic)


def s3_event(
    key: str,
    etag: str,
    *,
    moto_shape: bool = False,
    sequencer: str = "0065A1B2C3D4E5F601",
    event_time: str = "2026-11-25T18:23:01.123Z",
    size: int = 100,
    bucket: str = BUCKET,
) -> dict[str, Any]:
    from urllib.parse import quote, quote_plus

    obj: dict[str, Any] = {"size": size, "eTag": etag.strip('"')}
    record: dict[str, Any] = {
        "eventVersion": "2.1",
        "eventSource": "aws:s3",
        "awsRegion": REGION,
        "eventTime": event_time,
        "eventName": "ObjectCreated:Put",
        "s3": {"s3SchemaVersion": "1.0", "configurationId": "c", "bucket": {"name": bucket}, "object": obj},
    }
    if moto_shape:
        obj["key"] = quote_plus(key)  # moto encodes '/' as %2F too
    else:
        obj["key"] = quote(key, safe="/").replace("%20", "+")
        obj["sequencer"] = sequencer
        obj["versionId"] = "null"
        record["userIdentity"] = {"principalId": "AWS:EXAMPLE"}
        record["requestParameters"] = {"sourceIPAddress": "127.0.0.1"}
        record["responseElements"] = {"x-amz-request-id": "R", "x-amz-id-2": "I"}
        record["s3"]["bucket"].update(
            {"ownerIdentity": {"principalId": "A"}, "arn": f"arn:aws:s3:::{bucket}"}
        )
    return {"Records": [record]}


def sqs_event(*bodies: dict[str, Any] | str, receive_count: int = 1) -> dict[str, Any]:
    records = []
    for i, body in enumerate(bodies):
        records.append(
            {
                "messageId": f"m-{i}",
                "receiptHandle": f"rh-{i}",
                "body": body if isinstance(body, str) else json.dumps(body),
                "attributes": {
                    "ApproximateReceiveCount": str(receive_count),
                    "SentTimestamp": "1700000000000",
                    "SenderId": "S3",
                    "ApproximateFirstReceiveTimestamp": "1700000000000",
                },
                "messageAttributes": {},
                "md5OfBody": "x",
                "eventSource": "aws:sqs",
                "eventSourceARN": f"arn:aws:sqs:{REGION}:123456789012:ingest",
                "awsRegion": REGION,
            }
        )
    return {"Records": records}


def url_event(
    path: str,
    body: bytes,
    headers: dict[str, str],
    base64_body: bool = False,
    query: dict[str, str] | None = None,
) -> dict[str, Any]:
    from urllib.parse import urlencode

    event: dict[str, Any] = {
        "version": "2.0",
        "routeKey": "$default",
        "rawPath": path,
        "rawQueryString": urlencode(query or {}),
        "headers": {"host": "hooks.test", **headers},
        "requestContext": {
            "accountId": "anonymous",
            "apiId": "abc",
            "domainName": "hooks.test",
            "domainPrefix": "abc",
            "http": {
                "method": "POST",
                "path": path,
                "protocol": "HTTP/1.1",
                "sourceIp": "1.2.3.4",
                "userAgent": "t",
            },
            "requestId": "r",
            "routeKey": "$default",
            "stage": "$default",
            "time": "25/Nov/2026:18:23:01 +0000",
            "timeEpoch": 1700000000000,
        },
        "body": base64.b64encode(body).decode() if base64_body else body.decode(),
        "isBase64Encoded": base64_body,
    }
    if query:
        event["queryStringParameters"] = dict(query)
    return event


def fal_token(job_id: str) -> str:
    """The token of the job's fal webhook URL, as the stack derives it."""
    from vap_shared.fal_token import fal_webhook_token

    return fal_webhook_token(SIGNING_SECRET.encode(), job_id)


def fal_webhook_event(
    job_id: str, body: bytes, headers: dict[str, str], token: str | None = "derive"
) -> dict[str, Any]:
    """A fal delivery to the job's webhook URL; `token` "derive" = the job's own, None = no token."""
    if token == "derive":
        token = fal_token(job_id)
    return url_event(routes.path("fal", job_id), body, headers, query={"token": token} if token else None)


def gpu_callback_event(st: Stack, job_id: str, payload: dict[str, Any], **kw: Any) -> dict[str, Any]:
    body = json.dumps(payload).encode()
    headers = {k.lower(): v for k, v in signed_headers(st.gpu_key(job_id), body).items()}
    return url_event(routes.path("gpu", job_id), body, headers, **kw)


def gpu_result(seed: int, **overrides: Any) -> dict[str, Any]:
    """The `result` of a succeeded GPU callback for the default 480p/49-frame job on the test MP4."""
    result: dict[str, Any] = {
        "seed": seed,
        "width": 480,
        "height": 832,
        "num_frames": 49,
        "fps": 16,
        "bytes": len(MP4),
        "steps": 4,
        "gpu": "cpu",
        "timings": {"total_s": 2.0},
    }
    return {**result, **overrides}


class Context:
    function_name = "test"
    memory_limit_in_mb = 256
    invoked_function_arn = "arn:aws:lambda:us-east-1:123456789012:function:test"
    aws_request_id = "req-1"

    def __init__(self, remaining_ms: int = 60_000) -> None:
        self.remaining_ms = remaining_ms

    def get_remaining_time_in_millis(self) -> int:
        return self.remaining_ms


def call(fn: Callable[[dict[str, Any], Any], Any], event: dict[str, Any]) -> Any:
    return fn(event, Context())


def upload_fal_example(st: Stack, name: str = "inbox/set/job.json", backend: str = "modal") -> dict[str, Any]:
    """Media, then a sidecar (fal's example pointing at them), as a user uploads them; the S3 event."""
    st.put("inbox/set/clip.mp4", MP4)
    st.put("inbox/set/face.png", PNG)
    sidecar = {**FAL_EXAMPLE, "video_url": "clip.mp4", "image_url": "face.png", "backend": backend}
    raw = json.dumps(sidecar).encode()
    etag = st.put(name, raw)
    return s3_event(name, etag, size=len(raw))


@contextmanager
def handlers_on(st: Stack, with_sweeper: bool = False) -> Iterator[Stack]:
    """Point the handler modules' cached clients at this stack; forget them afterwards."""
    import ingest
    import store
    import webhook
    from vap_shared.ingest_logic import Ingestor

    ingest._ingestor = Ingestor(st.runtime)
    webhook._runtime = st.runtime
    store._runtime = st.runtime
    if with_sweeper:
        import sweeper

        sweeper._runtime = st.runtime
    try:
        yield st
    finally:
        ingest.reset()
        webhook.reset()
        store.reset()
        if with_sweeper:
            sweeper.reset()
