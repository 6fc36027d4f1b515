"""template.yaml: linters, security posture, wiring, and the env contract with the Lambda code."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from template_kit import transformed_template
from vap_shared.contract import BACKEND_CHOICES

from local_stack.cfn import Resolver, Template, load_template

ROOT = Path(__file__).resolve().parents[2]
TEMPLATE = ROOT / "template.yaml"
CONTRACTS = ROOT / "docs" / "contracts.md"
CONFIG = ROOT / "shared" / "vap_shared" / "config.py"


@pytest.fixture(scope="module")
def sam() -> Template:
    return load_template(TEMPLATE)


@pytest.fixture(scope="module")
def cfn(sam: Template) -> Template:
    return transformed_template(sam)


def resources_of(template: Template, kind: str) -> dict[str, dict[str, Any]]:
    return {k: r for k, r in template["Resources"].items() if r["Type"] == kind}


def props(template: Template, logical_id: str) -> dict[str, Any]:
    return dict(template["Resources"][logical_id].get("Properties", {}))


def env_of(sam: Template, function: str) -> dict[str, Any]:
    return dict(props(sam, function)["Environment"]["Variables"])


# ---------------------------------------------------------------------------------------------- linters


def _tool(name: str) -> str | None:
    candidates = [Path(sys.executable).parent / name, ROOT / ".tools" / "sam" / "bin" / name]
    found = shutil.which(name)
    return next((str(c) for c in candidates if c.exists()), found)


def test_cfn_lint_is_clean() -> None:
    tool = _tool("cfn-lint")
    assert tool, "cfn-lint is not installed (make venv)"
    version = subprocess.run([tool, "--version"], capture_output=True, text=True, check=True).stdout
    # >= 1.54 stops expanding SAM and silently misses whole classes of errors.
    major, minor = (int(x) for x in re.findall(r"(\d+)\.(\d+)", version)[0])
    assert (major, minor) >= (1, 52) and (major, minor) < (1, 54), version
    result = subprocess.run([tool, str(TEMPLATE)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_sam_validate_lint_is_clean() -> None:
    tool = _tool("sam")
    if tool is None:
        pytest.skip("aws-sam-cli is not installed (make venv builds .tools/sam)")
    env = {**os.environ, "SAM_CLI_TELEMETRY": "0"}
    result = subprocess.run(
        [tool, "validate", "--lint", "-t", str(TEMPLATE), "--region", "us-east-1"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "is a valid SAM Template" in result.stdout + result.stderr


# ---------------------------------------------------------------------------------------------- storage


def test_bucket_is_private_encrypted_and_owner_enforced(sam: Template) -> None:
    bucket = props(sam, "Bucket")
    sse = bucket["BucketEncryption"]["ServerSideEncryptionConfiguration"][0]["ServerSideEncryptionByDefault"]
    assert sse["SSEAlgorithm"] in ("AES256", "aws:kms", "aws:kms:dsse")
    assert bucket["PublicAccessBlockConfiguration"] == {
        "BlockPublicAcls": True,
        "BlockPublicPolicy": True,
        "IgnorePublicAcls": True,
        "RestrictPublicBuckets": True,
    }
    assert bucket["OwnershipControls"]["Rules"] == [{"ObjectOwnership": "BucketOwnerEnforced"}]
    expiring = [r for r in bucket["LifecycleConfiguration"]["Rules"] if r.get("ExpirationInDays")]
    assert [r["Prefix"] for r in expiring] == ["inbox/", "work/", "outputs/"]  # test_storage_retention.py


def test_bucket_policy_denies_plain_http(sam: Template) -> None:
    policy = props(sam, "BucketPolicy")
    assert policy["Bucket"] == {"Ref": "Bucket"}
    (deny,) = [s for s in policy["PolicyDocument"]["Statement"] if s["Effect"] == "Deny"]
    assert deny["Principal"] == "*"
    assert deny["Action"] == "s3:*"
    assert deny["Condition"] == {"Bool": {"aws:SecureTransport": "false"}}
    resources = [r["Fn::Sub"] for r in deny["Resource"]]
    assert any(r.endswith("${Bucket}") for r in resources) and any(
        r.endswith("${Bucket}/*") for r in resources
    )


def test_only_inbox_json_triggers_ingest(sam: Template) -> None:
    (config,) = props(sam, "Bucket")["NotificationConfiguration"]["QueueConfigurations"]
    assert config["Queue"] == {"Fn::GetAtt": ["IngestQueue", "Arn"]}
    assert config["Event"] == "s3:ObjectCreated:*"
    rules = {r["Name"]: r["Value"] for r in config["Filter"]["S3Key"]["Rules"]}
    assert rules == {"prefix": "inbox/", "suffix": ".json"}
    # What the pipeline writes never matches its own input filter.
    for written in ("outputs/a/b/job/metadata.json", "outputs/a/b/job/error.json", "work/job/video.mp4"):
        assert not (written.startswith(rules["prefix"]) and written.endswith(rules["suffix"]))


def test_queue_encrypted_with_dlq_and_long_visibility(sam: Template) -> None:
    queue = props(sam, "IngestQueue")
    assert queue["SqsManagedSseEnabled"] is True
    assert props(sam, "IngestDeadLetterQueue")["SqsManagedSseEnabled"] is True
    assert queue["RedrivePolicy"]["deadLetterTargetArn"] == {"Fn::GetAtt": ["IngestDeadLetterQueue", "Arn"]}
    assert sam["Parameters"]["MaxReceiveCount"]["Default"] > 4  # above the code's INGEST_MAX_ATTEMPTS default
    timeout = props(sam, "IngestFunction")["Timeout"]
    assert queue["VisibilityTimeout"] >= 6 * timeout


def test_queue_policy_scoped_to_the_bucket_without_a_cycle(sam: Template) -> None:
    policy = props(sam, "IngestQueuePolicy")
    (allow,) = [s for s in policy["PolicyDocument"]["Statement"] if s["Effect"] == "Allow"]
    assert allow["Principal"] == {"Service": "s3.amazonaws.com"}
    assert allow["Action"] == "sqs:SendMessage"
    source_arn, source_vars = allow["Condition"]["ArnLike"]["aws:SourceArn"]["Fn::Sub"]
    bucket_name, bucket_vars = props(sam, "Bucket")["BucketName"]["Fn::Sub"]
    # By name, not !GetAtt Bucket.Arn (tests/unit/test_template_deploy.py resolves both).
    assert source_arn == "arn:${AWS::Partition}:s3:::" + bucket_name and source_vars == bucket_vars
    assert allow["Condition"]["StringEquals"]["aws:SourceAccount"] == {"Ref": "AWS::AccountId"}
    assert sam["Resources"]["Bucket"]["DependsOn"] == "IngestQueuePolicy"


def test_event_source_mappings_report_partial_failures_and_cap_concurrency(cfn: Template) -> None:
    mappings = resources_of(cfn, "AWS::Lambda::EventSourceMapping")
    assert {m["Properties"]["FunctionName"]["Ref"] for m in mappings.values()} == {
        "IngestFunction",
        "StoreFunction",
    }
    for esm in mappings.values():
        p = esm["Properties"]
        assert p["FunctionResponseTypes"] == ["ReportBatchItemFailures"]
        assert p["ScalingConfig"]["MaximumConcurrency"] == {"Ref": "MaxConcurrency"}
        assert 1 <= p["BatchSize"] <= 10
    assert cfn["Parameters"]["MaxConcurrency"]["MinValue"] >= 2


def test_table_topic_and_secrets(sam: Template) -> None:
    table = props(sam, "JobsTable")
    assert table["KeySchema"] == [{"AttributeName": "job_id", "KeyType": "HASH"}]
    assert table["BillingMode"] == "PAY_PER_REQUEST"
    assert table["TimeToLiveSpecification"] == {"AttributeName": "expires_at", "Enabled": True}
    assert table["PointInTimeRecoverySpecification"]["PointInTimeRecoveryEnabled"] is True
    assert table["SSESpecification"]["SSEEnabled"] is True
    assert props(sam, "NotificationTopic")["KmsMasterKeyId"]
    assert "GenerateSecretString" in props(sam, "SigningSecret")
    assert props(sam, "FalKeySecret")["SecretString"]
    assert set(json.loads(props(sam, "ModalTokenSecret")["SecretString"])) == {"key", "secret"}


def test_functions_runtime_handlers_and_url(cfn: Template, sam: Template) -> None:
    functions = resources_of(cfn, "AWS::Lambda::Function")
    assert {f["Properties"]["Runtime"] for f in functions.values()} == {"python3.13"}
    assert props(sam, "IngestFunction")["Handler"] == "ingest.handler"
    assert props(sam, "IngestFunction")["CodeUri"] == "functions/ingest/"
    assert props(sam, "WebhookFunction")["Handler"] == "webhook.handler"
    assert props(sam, "WebhookFunction")["CodeUri"] == "functions/webhook/"
    layer = sam["Resources"]["SharedLayer"]
    assert layer["Properties"]["ContentUri"] == "shared/"
    assert layer["Metadata"]["BuildMethod"] == "python3.13"
    (url,) = resources_of(cfn, "AWS::Lambda::Url").values()
    assert url["Properties"]["AuthType"] == "NONE"
    assert "ReservedConcurrentExecutions" in props(sam, "WebhookFunction")


def test_outputs(sam: Template) -> None:
    assert {"BucketName", "TopicArn", "WebhookUrl", "JobsTable", "IngestQueueUrl"} <= set(sam["Outputs"])


# ---------------------------------------------------------------------------------------------- IAM


def _statements(cfn: Template) -> list[tuple[str, dict[str, Any]]]:
    found = []
    for logical_id, role in resources_of(cfn, "AWS::IAM::Role").items():
        for policy in role["Properties"].get("Policies", []):
            found.extend((logical_id, st) for st in policy["PolicyDocument"]["Statement"])
    for logical_id, policy in resources_of(cfn, "AWS::IAM::Policy").items():
        found.extend((logical_id, st) for st in policy["Properties"]["PolicyDocument"]["Statement"])
    return found


def test_no_wildcard_actions_or_resources(cfn: Template) -> None:
    statements = _statements(cfn)
    assert statements
    for logical_id, st in statements:
        actions = st["Action"] if isinstance(st["Action"], list) else [st["Action"]]
        assert all("*" not in a for a in actions), (logical_id, st)
        resources = st["Resource"] if isinstance(st["Resource"], list) else [st["Resource"]]
        assert "*" not in resources, (logical_id, st)
    for logical_id, role in resources_of(cfn, "AWS::IAM::Role").items():
        # AWS managed policies (e.g. AWSLambdaBasicExecutionRole) grant on every resource.
        assert not role["Properties"].get("ManagedPolicyArns"), logical_id


def _s3_grants(cfn: Template, role: str) -> dict[str, set[str]]:
    grants: dict[str, set[str]] = {}
    for logical_id, st in _statements(cfn):
        if logical_id != role:
            continue
        actions = st["Action"] if isinstance(st["Action"], list) else [st["Action"]]
        resources = st["Resource"] if isinstance(st["Resource"], list) else [st["Resource"]]
        for action in actions:
            if action.startswith("s3:"):
                for resource in resources:
                    text = resource["Fn::Sub"] if isinstance(resource, dict) else resource
                    grants.setdefault(action, set()).add(text.split("${Bucket}", 1)[1])
    return grants


GPU_UPLOAD_GRANTS = {"/work/*/video.mp4", "/work/*/poster.jpg", "/work/*/preview.webp"}


def test_s3_access_is_scoped_to_prefixes(cfn: Template) -> None:
    ingest = _s3_grants(cfn, "IngestRole")
    # outputs/: an earlier job's result for reuse, and what the presigned URLs it signs read.
    assert ingest["s3:GetObject"] == {"/inbox/*", "/work/*", "/outputs/*"}
    assert ingest["s3:PutObject"] == {"/work/*", "/outputs/*"}
    webhook = _s3_grants(cfn, "WebhookRole")
    # outputs/: a presigned GET (output_url, poster_url) works only if its signer may read it.
    assert webhook["s3:GetObject"] == {"/inbox/*", "/work/*", "/outputs/*"}
    # outputs/, and the GPU uploads it presigns on a URL refresh or a fallback to Modal (the saved
    # denoising state on a URL refresh only).
    assert webhook["s3:PutObject"] == {"/outputs/*", *GPU_UPLOAD_GRANTS, "/work/*/resume.bin"}
    for grants in (ingest, webhook):
        assert not {"s3:DeleteObject", "s3:PutBucketPolicy", "s3:PutObjectAcl"} & set(grants)


def test_functions_use_their_own_roles(sam: Template) -> None:
    assert props(sam, "IngestFunction")["Role"] == {"Fn::GetAtt": ["IngestRole", "Arn"]}
    assert props(sam, "WebhookFunction")["Role"] == {"Fn::GetAtt": ["WebhookRole", "Arn"]}


# ---------------------------------------------------------------------------------------------- env contract


def _contract_env_names() -> set[str]:
    text = CONTRACTS.read_text(encoding="utf-8")
    section = text.split("## Lambda environment", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"`([A-Z][A-Z0-9_]+)`", section))


def _code_env_names() -> set[str]:
    source = CONFIG.read_text(encoding="utf-8")
    return set(re.findall(r"""env(?:\.get\(|\[|, )\s*["']([A-Z][A-Z0-9_]+)["']""", source))


def test_env_vars_follow_the_contract(sam: Template) -> None:
    contract = _contract_env_names()
    code = _code_env_names() | {"POWERTOOLS_SERVICE_NAME"}  # Powertools reads the latter
    local_only = {"AWS_ENDPOINT_URL", "VAP_ALLOW_HTTP_LOOPBACK"}
    for function in ("IngestFunction", "WebhookFunction"):
        names = set(env_of(sam, function))
        assert names <= contract, (function, names - contract)
        assert names <= code, (function, names - code)
        assert not names & local_only
        assert {"BUCKET_NAME", "JOBS_TABLE", "TOPIC_ARN", "SIGNING_SECRET_ARN"} <= names
        assert {"INBOX_PREFIX", "OUTPUTS_PREFIX", "WORK_PREFIX"} <= names
    ingest, webhook = set(env_of(sam, "IngestFunction")), set(env_of(sam, "WebhookFunction"))
    assert {"WEBHOOK_BASE_URL", "ALLOWED_MEDIA_HOSTS", "MAX_SIDECAR_BYTES", "MAX_DATA_URI_BYTES"} <= ingest
    assert {"FAL_JWKS_URL", "MAX_OUTPUT_BYTES", "STORE_QUEUE_URL"} <= webhook
    # Each function only what it needs: the webhook never validates sidecars, builds its own URL or
    # downloads a result (the store function does).
    assert (
        not {"WEBHOOK_BASE_URL", "ALLOWED_MEDIA_HOSTS", "MAX_SIDECAR_BYTES", "MAX_DATA_URI_BYTES"} & webhook
    )
    assert "FAL_MEDIA_HOSTS" not in webhook
    assert not {"FAL_JWKS_URL", "FAL_MEDIA_HOSTS", "MAX_OUTPUT_BYTES"} & ingest


def test_webhook_base_url_has_no_trailing_slash(sam: Template) -> None:
    url = "https://abcdefghijklmnopqrstuvwxyz012345.lambda-url.us-east-1.on.aws/"
    resolver = Resolver(sam, {}, {("WebhookFunctionUrl", "FunctionUrl"): url})
    assert resolver.resolve(env_of(sam, "IngestFunction")["WEBHOOK_BASE_URL"]) == url.rstrip("/")


def test_default_backend_parameter(sam: Template) -> None:
    backend = sam["Parameters"]["DefaultBackend"]
    assert tuple(backend["AllowedValues"]) == BACKEND_CHOICES
    assert env_of(sam, "IngestFunction")["DEFAULT_BACKEND"] == {"Ref": "DefaultBackend"}
    for name in ("ModalEndpointUrl", "FalEndpointId", "MaxConcurrency", "AllowedMediaHosts"):
        assert name in sam["Parameters"]


# ---------------------------------------------------------------------------------------------- sam build


def _python313() -> str | None:
    pyenv = shutil.which("pyenv")
    if pyenv is None:
        return None
    result = subprocess.run([pyenv, "prefix", "3.13.0"], capture_output=True, text=True)
    prefix = result.stdout.strip()
    return f"{prefix}/bin" if result.returncode == 0 and Path(prefix, "bin", "python3.13").exists() else None


@pytest.mark.slow
def test_sam_build(tmp_path: Path) -> None:
    tool, python_bin = _tool("sam"), _python313()
    if tool is None or python_bin is None:
        pytest.skip("needs aws-sam-cli and a real python3.13 (pyenv prefix 3.13.0)")
    env = {**os.environ, "SAM_CLI_TELEMETRY": "0", "PATH": f"{python_bin}:{os.environ['PATH']}"}
    build = tmp_path / "build"
    result = subprocess.run(
        [
            tool,
            "build",
            "-t",
            str(TEMPLATE),
            "--build-dir",
            str(build),
            "--cache-dir",
            str(tmp_path / "cache"),
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (build / "IngestFunction" / "ingest.py").exists()
    assert (build / "WebhookFunction" / "webhook.py").exists()
    layer = next(build.glob("SharedLayer*")) / "python"
    assert (layer / "vap_shared" / "config.py").exists()
    # Compiled dependencies were fetched for the functions' architecture (arm64).
    assert list(layer.glob("pydantic_core/*aarch64*.so"))
    # SAM's layer passes the checks CI runs on every machine (tests/unit/test_layer.py), and holds
    # the same distributions as the layer `make deploy` builds without SAM.
    from vap_cli import layer as vap_layer

    report = vap_layer.check(layer.parent)
    assert report.ok, report.text()
    ours = vap_layer.build(tmp_path / "ours") / "python"
    assert set(vap_layer.distributions(layer)) == set(vap_layer.distributions(ours))


# ---------------------------------------------------------------------------------------------- sweeper


def test_sweeper_runs_every_5_minutes_with_its_own_role(sam: Template, cfn: Template) -> None:
    sweeper = props(sam, "SweeperFunction")
    assert sweeper["Handler"] == "sweeper.handler"
    assert sweeper["CodeUri"] == "functions/sweeper/"
    assert sweeper["Role"] == {"Fn::GetAtt": ["SweeperRole", "Arn"]}
    assert "FunctionUrlConfig" not in sweeper
    (event,) = sweeper["Events"].values()
    assert event == {
        "Type": "Schedule",
        "Properties": {"Schedule": "rate(5 minutes)", "Description": "Settle overdue VAP jobs."},
    }
    assert sweeper["Timeout"] < 300  # shorter than the period: runs do not overlap
    (rule,) = resources_of(cfn, "AWS::Events::Rule").values()
    assert rule["Properties"]["ScheduleExpression"] == "rate(5 minutes)"
    (target,) = rule["Properties"]["Targets"]
    assert target["Arn"] == {"Fn::GetAtt": ["SweeperFunction", "Arn"]}


def test_sweeper_index_and_least_privilege(sam: Template, cfn: Template) -> None:
    index = props(sam, "JobsTable")["GlobalSecondaryIndexes"][0]
    assert index["IndexName"] == "state-dispatched_at"
    assert index["KeySchema"] == [
        {"AttributeName": "state", "KeyType": "HASH"},
        {"AttributeName": "dispatched_at", "KeyType": "RANGE"},
    ]
    from vap_shared.job_store import DEADLINE_INDEX

    assert index["IndexName"] == DEADLINE_INDEX
    grants = _s3_grants(cfn, "SweeperRole")
    assert grants == {
        "s3:GetObject": {"/inbox/*", "/work/*", "/outputs/*"},
        "s3:PutObject": {"/outputs/*", *GPU_UPLOAD_GRANTS},
        "s3:ListBucket": {""},
    }
    actions = {
        a
        for logical_id, st in _statements(cfn)
        if logical_id == "SweeperRole"
        for a in (st["Action"] if isinstance(st["Action"], list) else [st["Action"]])
    }
    # Reads by key and index, updates conditionally, creates only a dead letter's missing record
    # (conditionally); never deletes or scans.
    assert {a for a in actions if a.startswith("dynamodb:")} == {
        "dynamodb:Query",
        "dynamodb:GetItem",
        "dynamodb:PutItem",
        "dynamodb:UpdateItem",
    }
    (query,) = [
        st for lid, st in _statements(cfn) if lid == "SweeperRole" and st["Action"] == "dynamodb:Query"
    ]
    assert query["Resource"] == [
        {"Fn::Sub": "${JobsTable.Arn}/index/state-dispatched_at"},
        {"Fn::Sub": "${JobsTable.Arn}/index/unsettled-job_id"},
    ]

    # SQS: draining the ingest dead-letter queue and queueing recovered results for storing (never
    # the ingest queue).
    def _as_list(value: Any) -> list[Any]:
        return value if isinstance(value, list) else [value]

    sqs = {
        json.dumps(st["Resource"]): set(_as_list(st["Action"]))
        for lid, st in _statements(cfn)
        if lid == "SweeperRole" and any(str(a).startswith("sqs:") for a in _as_list(st["Action"]))
    }
    assert sqs == {
        json.dumps({"Fn::GetAtt": ["IngestDeadLetterQueue", "Arn"]}): {
            "sqs:ReceiveMessage",
            "sqs:DeleteMessage",
            "sqs:GetQueueAttributes",
        },
        json.dumps({"Fn::GetAtt": ["StoreQueue", "Arn"]}): {"sqs:SendMessage"},
    }


def test_sweeper_env_follows_the_contract(sam: Template) -> None:
    contract = _contract_env_names()
    code = _code_env_names() | {"POWERTOOLS_SERVICE_NAME"}
    names = set(env_of(sam, "SweeperFunction"))
    assert names <= contract, names - contract
    assert names <= code, names - code
    assert {"BUCKET_NAME", "JOBS_TABLE", "TOPIC_ARN", "JOB_BUDGET_SECONDS", "MODAL_ENDPOINT_URL"} <= names
    assert {"FAL_QUEUE_URL", "MAX_OUTPUT_BYTES", "MODAL_TOKEN_SECRET_ARN", "STORE_QUEUE_URL"} <= names
    # It never validates sidecars, builds webhook URLs or verifies fal signatures.
    assert not {"WEBHOOK_BASE_URL", "ALLOWED_MEDIA_HOSTS", "MAX_SIDECAR_BYTES", "FAL_JWKS_URL"} & names
    assert env_of(sam, "SweeperFunction")["JOB_BUDGET_SECONDS"] == {"Ref": "JobBudgetSeconds"}
    # It drains the ingest dead-letter queue and names the queue's receive count in the error.
    assert env_of(sam, "SweeperFunction")["INGEST_DLQ_URL"] == {"Ref": "IngestDeadLetterQueue"}
    assert env_of(sam, "SweeperFunction")["INGEST_MAX_RECEIVE_COUNT"] == {"Ref": "MaxReceiveCount"}
    # Only the sweeper reads the dead-letter queue.
    for function in ("IngestFunction", "WebhookFunction"):
        assert not {"INGEST_DLQ_URL", "INGEST_MAX_RECEIVE_COUNT"} & set(env_of(sam, function))
