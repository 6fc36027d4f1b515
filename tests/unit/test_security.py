"""Security posture: least privilege read from the *transformed* template (what CloudFormation
deploys), encryption of every stateful resource, and presigned URLs short-lived and scoped to one
object. (test_template.py checks the individual grants; this file fails on anything extra.)"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from template_kit import transformed_template
from vap_testkit import BUCKET, FAL_EXAMPLE, MP4, PNG, FakeServices, call, s3_event, sqs_event, stack

from local_stack.cfn import Template

ROOT = Path(__file__).resolve().parents[2]

# What each function needs, action by action. A new grant must be added here with its reason.
NEEDED: dict[str, set[str]] = {
    "IngestRole": {
        "logs:CreateLogStream",
        "logs:PutLogEvents",
        # the SQS event source mapping
        "sqs:ReceiveMessage",
        "sqs:DeleteMessage",
        "sqs:ChangeMessageVisibility",
        "sqs:GetQueueAttributes",
        "sqs:SendMessage",  # a job waiting for backend capacity goes back to its own queue
        # sidecar + media (inbox/), decoded data: media and the GPU's presigned PUT (work/), error.json;
        # GetObject on outputs/: an earlier job's metadata.json and copy source (result reuse)
        "s3:GetObject",
        "s3:PutObject",
        "s3:ListBucket",  # a missing object reads 404, not 403
        # conditional create / transitions; no Scan, DeleteItem
        "dynamodb:GetItem",
        "dynamodb:PutItem",
        "dynamodb:UpdateItem",
        "dynamodb:Query",  # only the backend-state index: jobs outstanding at a backend
        "dynamodb:BatchGetItem",  # re-reading the few jobs admitted in the last minutes
        "sns:Publish",
        "secretsmanager:GetSecretValue",
    },
    "WebhookRole": {
        "logs:CreateLogStream",
        "logs:PutLogEvents",
        "s3:GetObject",  # inbox/ + work/; outputs/: the presigned output_url/poster_url it signs
        "s3:PutObject",
        "s3:ListBucket",
        "sqs:SendMessage",  # only the store queue: a finished run's result, stored by StoreFunction
        "dynamodb:GetItem",
        "dynamodb:UpdateItem",
        "sns:Publish",
        "secretsmanager:GetSecretValue",
    },
    "SweeperRole": {
        "logs:CreateLogStream",
        "logs:PutLogEvents",
        "dynamodb:Query",  # only on its index
        "dynamodb:GetItem",
        "dynamodb:PutItem",  # the conditional create of an ingest dead letter's missing record
        "dynamodb:UpdateItem",
        # draining the ingest dead-letter queue (only that queue)
        "sqs:ReceiveMessage",
        "sqs:DeleteMessage",
        "sqs:GetQueueAttributes",
        "sqs:SendMessage",  # only the store queue: a recovered result
        "s3:GetObject",
        "s3:PutObject",
        "s3:ListBucket",
        "sns:Publish",
        "secretsmanager:GetSecretValue",
    },
    "StoreRole": {
        "logs:CreateLogStream",
        "logs:PutLogEvents",
        # the SQS event source mapping (ChangeMessageVisibility also: a retried result comes back sooner)
        "sqs:ReceiveMessage",
        "sqs:DeleteMessage",
        "sqs:ChangeMessageVisibility",
        "sqs:GetQueueAttributes",
        "s3:GetObject",  # the GPU's uploads in work/ (copy sources); outputs/: the URLs it presigns
        "s3:PutObject",
        "s3:AbortMultipartUpload",  # a failed fal download leaves no partial upload
        "s3:ListBucket",
        "dynamodb:GetItem",
        "dynamodb:PutItem",  # a succeeded job's reuse entry (`reuse#<key>`, conditional)
        "dynamodb:UpdateItem",
        "sns:Publish",
        # no secrets: it never dispatches, signs callbacks or verifies deliveries
    },
}

# The only places a `*` may appear in a resource: objects under one of the bucket's prefixes, or
# the GPU's uploads of any job in work/ (what the webhook and sweeper presign for it).
SCOPED_WILDCARD = re.compile(
    r"^arn:\$\{AWS::Partition\}:s3:::\$\{Bucket\}/"
    r"((inbox|work|outputs)/\*|work/\*/(video\.mp4|poster\.jpg|preview\.webp|resume\.bin|input-\*))$"
)


@pytest.fixture(scope="module")
def cfn() -> Template:
    return transformed_template()


def _as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def _role_statements(cfn: Template) -> dict[str, list[dict[str, Any]]]:
    found: dict[str, list[dict[str, Any]]] = {}
    for logical_id, res in cfn["Resources"].items():
        if res["Type"] == "AWS::IAM::Role":
            for policy in res["Properties"].get("Policies", []):
                found.setdefault(logical_id, []).extend(policy["PolicyDocument"]["Statement"])
        elif res["Type"] in ("AWS::IAM::Policy", "AWS::IAM::ManagedPolicy"):
            found.setdefault(logical_id, []).extend(res["Properties"]["PolicyDocument"]["Statement"])
    return found


def test_every_role_is_known_and_grants_exactly_what_its_function_needs(cfn: Template) -> None:
    roles = _role_statements(cfn)
    assert set(roles) == set(NEEDED), "a new role or policy needs its entry in NEEDED"
    for role, statements in roles.items():
        granted = {a for st in statements if st["Effect"] == "Allow" for a in _as_list(st["Action"])}
        assert granted == NEEDED[role], (role, granted ^ NEEDED[role])
        assert all("Condition" not in st or st["Effect"] == "Allow" for st in statements)
        assert not [st for st in statements if "NotAction" in st or "NotResource" in st], role


def test_no_wildcard_beyond_prefix_scoped_objects(cfn: Template) -> None:
    for role, statements in _role_statements(cfn).items():
        for st in statements:
            for action in _as_list(st["Action"]):
                assert "*" not in action and "?" not in action, (role, action)
            for resource in _as_list(st["Resource"]):
                text = (
                    resource["Fn::Sub"] if isinstance(resource, dict) and "Fn::Sub" in resource else resource
                )
                if isinstance(text, str) and "*" in text:
                    assert SCOPED_WILDCARD.match(text), (role, st.get("Sid"), text)
                # Object actions never on the bucket itself and bucket actions never on objects.
            actions = set(_as_list(st["Action"]))
            texts = [
                r["Fn::Sub"] if isinstance(r, dict) and "Fn::Sub" in r else r
                for r in _as_list(st["Resource"])
            ]
            if actions & {"s3:GetObject", "s3:PutObject", "s3:AbortMultipartUpload"}:
                assert all(isinstance(t, str) and SCOPED_WILDCARD.match(t) for t in texts), (role, st)
            if "s3:ListBucket" in actions:
                assert texts == ["arn:${AWS::Partition}:s3:::${Bucket}"], (role, st)


def test_grants_name_this_stacks_resources(cfn: Template) -> None:
    allowed_refs = {
        "IngestQueue",
        "IngestDeadLetterQueue",  # the sweeper drains it
        "StoreQueue",  # the webhook and the sweeper send to it, the store function consumes it
        "JobsTable",
        "NotificationTopic",
        "SigningSecret",
        "FalKeySecret",
        "ModalTokenSecret",
    }
    for role, statements in _role_statements(cfn).items():
        for st in statements:
            for resource in _as_list(st["Resource"]):
                if isinstance(resource, dict) and "Ref" in resource:
                    assert resource["Ref"] in allowed_refs, (role, resource)
                elif isinstance(resource, dict) and "Fn::GetAtt" in resource:
                    target = resource["Fn::GetAtt"][0]
                    assert target in allowed_refs or target.endswith("LogGroup"), (role, resource)
                    if target == "IngestDeadLetterQueue":
                        assert role == "SweeperRole", (role, target)
                    # Each function writes only its own log group.
                    if target.endswith("LogGroup"):
                        assert role.removesuffix("Role") == target.removesuffix("LogGroup"), (role, target)
                elif isinstance(resource, dict) and "Fn::Sub" in resource:
                    assert (
                        "${Bucket}" in resource["Fn::Sub"] or "${JobsTable.Arn}/index/" in resource["Fn::Sub"]
                    )
                else:
                    pytest.fail(f"{role}: literal resource {resource!r}")
    for role in _role_statements(cfn):
        assert not cfn["Resources"][role]["Properties"].get("ManagedPolicyArns"), role


def test_only_the_webhook_is_public_and_only_events_invoke_the_sweeper(cfn: Template) -> None:
    permissions = {
        k: r["Properties"] for k, r in cfn["Resources"].items() if r["Type"] == "AWS::Lambda::Permission"
    }
    public = {k: p for k, p in permissions.items() if p["Principal"] == "*"}
    assert {p["FunctionName"]["Ref"] for p in public.values()} == {"WebhookFunction"}
    assert all(
        p.get("FunctionUrlAuthType") == "NONE" or p.get("InvokedViaFunctionUrl") for p in public.values()
    )
    (events,) = [p for p in permissions.values() if p["Principal"] == "events.amazonaws.com"]
    assert events["FunctionName"] == {"Ref": "SweeperFunction"}
    assert events["SourceArn"] == {"Fn::GetAtt": ["SweeperFunctionEvery5Minutes", "Arn"]}
    urls = [r for r in cfn["Resources"].values() if r["Type"] == "AWS::Lambda::Url"]
    assert [u["Properties"]["TargetFunctionArn"] for u in urls] == [{"Ref": "WebhookFunction"}]


def test_everything_stateful_is_encrypted_and_tls_only(cfn: Template) -> None:
    resources = cfn["Resources"]
    for logical_id, res in resources.items():
        props = res.get("Properties", {})
        kind = res["Type"]
        if kind == "AWS::S3::Bucket":
            assert props["BucketEncryption"]["ServerSideEncryptionConfiguration"], logical_id
        elif kind == "AWS::SQS::Queue":
            assert props.get("SqsManagedSseEnabled") or props.get("KmsMasterKeyId"), logical_id
        elif kind == "AWS::DynamoDB::Table":
            assert props["SSESpecification"]["SSEEnabled"] is True, logical_id
        elif kind == "AWS::SNS::Topic":
            assert props.get("KmsMasterKeyId"), logical_id
    policies = [r["Properties"] for r in resources.values() if r["Type"] == "AWS::S3::BucketPolicy"]
    (deny,) = [s for p in policies for s in p["PolicyDocument"]["Statement"] if s["Effect"] == "Deny"]
    assert deny["Action"] == "s3:*" and deny["Condition"] == {"Bool": {"aws:SecureTransport": "false"}}


# ------------------------------------------------------------------------------------------ presigned URLs


def _object(url: str) -> str:
    """`bucket/key` a presigned URL names (virtual-hosted or path style)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if host.endswith(".amazonaws.com") and not host.startswith("s3."):
        return host.split(".s3.", 1)[0] + parts.path
    return parts.path.lstrip("/")


def _query(url: str) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(urlsplit(url).query).items()}


def test_url_lifetime_is_the_job_budget_and_bounded(cfn: Template) -> None:
    # Presigned URLs live the job budget (vap_shared.budget.url_ttl_s): at most a day, never
    # beyond SigV4's 7 days.
    budget = cfn["Parameters"]["JobBudgetSeconds"]
    assert int(budget["Default"]) <= 24 * 3600 and int(budget["MaxValue"]) <= 24 * 3600


def test_presigned_urls_are_short_lived_and_scoped_to_one_object(monkeypatch: pytest.MonkeyPatch) -> None:
    services = FakeServices()
    sent: list[dict[str, Any]] = []
    services.on_modal_submit = sent.append
    with stack(monkeypatch, services) as st:
        import ingest
        from vap_shared.ingest_logic import Ingestor

        ingest._ingestor = Ingestor(st.runtime)
        try:
            st.put("inbox/p/clip.mp4", MP4)
            st.put("inbox/p/face.png", PNG)
            raw = json.dumps(
                {**FAL_EXAMPLE, "video_url": "clip.mp4", "image_url": "face.png", "backend": "modal"}
            )
            etag = st.put("inbox/p/job.json", raw)
            call(ingest.handler, sqs_event(s3_event("inbox/p/job.json", etag, size=len(raw))))
        finally:
            ingest.reset()
        (request,) = sent
        job_id = request["job_id"]
        expected = {
            "video_url": ("GET", f"{BUCKET}/inbox/p/clip.mp4"),
            "image_url": ("GET", f"{BUCKET}/inbox/p/face.png"),
            "output_put_url": ("PUT", f"{BUCKET}/work/{job_id}/video.mp4"),
        }
        for name, (_, path) in expected.items():
            url = request[name]
            q = _query(url)
            assert _object(url) == path, (name, url)  # exactly one object, no prefix
            assert q["X-Amz-Algorithm"] == "AWS4-HMAC-SHA256"
            assert int(q["X-Amz-Expires"]) == st.runtime.settings.budget.url_ttl_s <= 24 * 3600
            assert "host" in q["X-Amz-SignedHeaders"].split(";")
        # The upload URL also pins the content type, so it cannot store anything but an MP4.
        assert "content-type" in _query(request["output_put_url"])["X-Amz-SignedHeaders"].split(";")
        # The notification's output URL: one object, one hour.
        from vap_shared.notifier import OUTPUT_URL_TTL, build_notification

        job = st.store.get(job_id).model_copy(
            update={"state": "succeeded", "output_key": "outputs/p/job/x/video.mp4"}
        )
        note = build_notification(job, st.runtime.s3, BUCKET)
        assert _object(note["output_url"]) == f"{BUCKET}/outputs/p/job/x/video.mp4"
        assert int(_query(note["output_url"])["X-Amz-Expires"]) == OUTPUT_URL_TTL == 3600
