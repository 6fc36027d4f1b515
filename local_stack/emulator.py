"""Deploying `template.yaml` into moto: translate, create the stack, apply what moto skips.

moto's CloudFormation creates the buckets, queues, table, topic, roles, functions, layer and
event source mapping, but not secrets, queue/bucket policies, Function URLs, the bucket's
notification, public access block, ownership controls, lifecycle, table TTL or reserved
concurrency, and it keeps roles' inline policies in a form moto's IAM cannot evaluate. Those are
applied here from the same template's properties, through the same APIs CloudFormation would call.
"""

from __future__ import annotations

import copy
import io
import json
import logging
import secrets
import string
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3

from local_stack.cfn import Resolver, Template, load_template, parameter_defaults, translate_sam

log = logging.getLogger("local_stack.emulator")

ACCOUNT_ID = "123456789012"  # moto's default account
ARTIFACTS_BUCKET = "vap-local-artifacts"
# Resource types moto's CloudFormation does not implement; created below instead.
SKIPPED_TYPES = frozenset(
    {"AWS::SecretsManager::Secret", "AWS::SQS::QueuePolicy", "AWS::S3::BucketPolicy", "AWS::Lambda::Url"}
)


@dataclass
class FunctionSpec:
    logical_id: str
    name: str
    arn: str
    code_dir: Path
    handler: str
    timeout_s: int
    memory_mb: int
    environment: dict[str, str]
    reserved_concurrency: int | None
    log_group: str
    role_arn: str = ""


@dataclass
class EventSourceSpec:
    function_logical_id: str
    queue_arn: str
    batch_size: int
    max_concurrency: int
    report_batch_item_failures: bool
    batching_window_s: float = 0.0


@dataclass
class Deployment:
    """What the local stack needs to know about the created stack."""

    stack_name: str
    region: str
    endpoint_url: str
    outputs: dict[str, str]
    physical_ids: dict[str, str]
    secret_arns: dict[str, str]
    functions: dict[str, FunctionSpec] = field(default_factory=dict)
    event_sources: list[EventSourceSpec] = field(default_factory=list)
    function_urls: dict[str, str] = field(default_factory=dict)  # function logical id -> URL


def _zip_dir(path: Path) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as archive:
        for file in sorted(path.rglob("*")):
            if file.is_file() and "__pycache__" not in file.parts:
                archive.write(file, file.relative_to(path).as_posix())
    return buf.getvalue()


def _generate_secret(spec: Mapping[str, Any]) -> str:
    alphabet = string.ascii_letters + string.digits
    if not spec.get("ExcludePunctuation"):
        alphabet += "!#$%&()*+,-.:;<=>?@[]^_{|}~"
    value = "".join(secrets.choice(alphabet) for _ in range(int(spec.get("PasswordLength", 32))))
    template = spec.get("SecretStringTemplate")
    if template and spec.get("GenerateStringKey"):
        data = json.loads(template)
        data[spec["GenerateStringKey"]] = value
        return json.dumps(data)
    return value


def _without_tls_statements(policy: Mapping[str, Any]) -> dict[str, Any]:
    """The policy minus statements keyed on aws:SecureTransport.

    moto evaluates bucket policies, and locally every request is plain http on the loopback, so
    the template's TLS-only deny would refuse everything here (in AWS every call is TLS).
    """
    statements = policy.get("Statement", [])
    kept = [st for st in statements if "aws:SecureTransport" not in json.dumps(st.get("Condition", {}))]
    return {**policy, "Statement": kept}


def _is_function_url_permission(resource: Mapping[str, Any]) -> bool:
    props = resource.get("Properties", {})
    return resource["Type"] == "AWS::Lambda::Permission" and bool(
        "FunctionUrlAuthType" in props or props.get("InvokedViaFunctionUrl")
    )


class Deployer:
    def __init__(self, root: Path, endpoint_url: str, region: str, stack_name: str) -> None:
        self.root = root
        self.endpoint_url = endpoint_url
        self.region = region
        self.stack_name = stack_name

    def client(self, service: str) -> Any:
        return boto3.client(service, endpoint_url=self.endpoint_url, region_name=self.region)  # type: ignore[call-overload]

    def deploy(
        self,
        template_path: Path,
        parameters: Mapping[str, str],
        function_urls: Mapping[str, str],
        secret_values: Mapping[str, str],
    ) -> Deployment:
        """`function_urls`: logical id of an `AWS::Lambda::Url` → the local URL serving it;
        `secret_values`: logical id of a secret → the value to put over its placeholder."""
        sam = load_template(template_path)
        code_uris = self._upload_code(sam)
        translated = translate_sam(sam, self.region, code_uris)
        params = parameter_defaults(translated, parameters)
        secret_arns = self._create_secrets(translated, secret_values)
        resources = translated["Resources"]
        url_attrs = {
            (logical_id, "FunctionUrl"): function_urls[logical_id]
            for logical_id, res in resources.items()
            if res["Type"] == "AWS::Lambda::Url"
        }
        self._create_stack(translated, params, secret_arns, url_attrs)

        cfn = self.client("cloudformation")
        stack = cfn.describe_stacks(StackName=self.stack_name)["Stacks"][0]
        outputs = {o["OutputKey"]: o["OutputValue"] for o in stack.get("Outputs", [])}
        physical = {
            r["LogicalResourceId"]: r["PhysicalResourceId"]
            for r in cfn.list_stack_resources(StackName=self.stack_name)["StackResourceSummaries"]
            if r.get("LogicalResourceId")
        }
        physical.update(secret_arns)
        resolver = self._resolver(translated, params, physical, url_attrs, str(stack["StackId"]))
        self._apply_skipped(translated, resolver)
        deployment = Deployment(
            stack_name=self.stack_name,
            region=self.region,
            endpoint_url=self.endpoint_url,
            outputs=outputs,
            physical_ids=physical,
            secret_arns=secret_arns,
        )
        self._describe_functions(sam, translated, resolver, deployment)
        for (logical_id, _), url in url_attrs.items():
            target = resources[logical_id]["Properties"]["TargetFunctionArn"]["Ref"]
            deployment.function_urls[target] = url
        return deployment

    # ------------------------------------------------------------------ steps
    def _upload_code(self, sam: Template) -> dict[str, str]:
        s3 = self.client("s3")
        s3.create_bucket(Bucket=ARTIFACTS_BUCKET)
        uris: dict[str, str] = {}
        for logical_id, resource in sam["Resources"].items():
            props = resource.get("Properties", {})
            uri = props.get("CodeUri") or props.get("ContentUri")
            if isinstance(uri, str):
                key = f"{logical_id}.zip"
                s3.put_object(Bucket=ARTIFACTS_BUCKET, Key=key, Body=_zip_dir(self.root / uri))
                uris[logical_id] = f"s3://{ARTIFACTS_BUCKET}/{key}"
        return uris

    def _create_secrets(self, translated: Template, values: Mapping[str, str]) -> dict[str, str]:
        sm = self.client("secretsmanager")
        arns: dict[str, str] = {}
        pseudo = Resolver(translated, {"AWS::StackName": self.stack_name, "AWS::Region": self.region}, {})
        for logical_id, resource in translated["Resources"].items():
            if resource["Type"] != "AWS::SecretsManager::Secret":
                continue
            props = resource.get("Properties", {})
            if "GenerateSecretString" in props:
                value = _generate_secret(props["GenerateSecretString"])
            else:
                value = str(props.get("SecretString", ""))
            name = (
                str(pseudo.resolve(props["Name"])) if "Name" in props else f"{self.stack_name}-{logical_id}"
            )
            arn = sm.create_secret(Name=name, SecretString=value, Description=props.get("Description", ""))[
                "ARN"
            ]
            if logical_id in values:
                # What the user does after deploying: replace the placeholder with a real value.
                sm.put_secret_value(SecretId=arn, SecretString=values[logical_id])
            arns[logical_id] = arn
        return arns

    def _create_stack(
        self,
        translated: Template,
        params: Mapping[str, str],
        secret_arns: Mapping[str, str],
        url_attrs: Mapping[tuple[str, str], str],
    ) -> None:
        body = copy.deepcopy(translated)
        resources = body["Resources"]
        skipped = {k for k, r in resources.items() if r["Type"] in SKIPPED_TYPES}
        # The Function URL's permissions are meaningless without it.
        skipped |= {k for k, r in resources.items() if _is_function_url_permission(r)}
        for logical_id in skipped:
            del resources[logical_id]
        for resource in resources.values():
            depends = resource.get("DependsOn")
            if depends is not None:
                kept = [d for d in ([depends] if isinstance(depends, str) else depends) if d not in skipped]
                resource["DependsOn"] = kept
                if not kept:
                    del resource["DependsOn"]
            if resource["Type"] == "AWS::Lambda::EventSourceMapping":
                # moto would try to invoke the function itself (needs Docker); our poller does it.
                resource["Properties"]["Enabled"] = False

        def inline(value: Any) -> Any:
            if isinstance(value, list):
                return [inline(v) for v in value]
            if isinstance(value, dict):
                if set(value) == {"Ref"} and value["Ref"] in secret_arns:
                    return secret_arns[value["Ref"]]
                if set(value) == {"Fn::GetAtt"}:
                    target = value["Fn::GetAtt"]
                    target = tuple(target if isinstance(target, list) else target.split(".", 1))
                    if target in url_attrs:
                        return url_attrs[target]
                return {k: inline(v) for k, v in value.items()}
            return value

        body = inline(body)
        cfn = self.client("cloudformation")
        cfn.create_stack(
            StackName=self.stack_name,
            TemplateBody=json.dumps(body),
            Parameters=[{"ParameterKey": k, "ParameterValue": v} for k, v in params.items()],
            Capabilities=["CAPABILITY_IAM", "CAPABILITY_NAMED_IAM", "CAPABILITY_AUTO_EXPAND"],
        )
        status = cfn.describe_stacks(StackName=self.stack_name)["Stacks"][0]["StackStatus"]
        if status != "CREATE_COMPLETE":
            raise RuntimeError(f"stack {self.stack_name} ended in {status}")

    def _resolver(
        self,
        translated: Template,
        params: Mapping[str, str],
        physical: Mapping[str, str],
        url_attrs: Mapping[tuple[str, str], str],
        stack_id: str,
    ) -> Resolver:
        refs: dict[str, Any] = {
            "AWS::AccountId": ACCOUNT_ID,
            "AWS::Region": self.region,
            "AWS::StackName": self.stack_name,
            "AWS::StackId": stack_id,
            "AWS::Partition": "aws",
            "AWS::URLSuffix": "amazonaws.com",
            "AWS::NoValue": None,
        }
        refs.update(params)
        refs.update(physical)
        attrs: dict[tuple[str, str], Any] = dict(url_attrs)
        sqs, dynamodb = self.client("sqs"), self.client("dynamodb")
        lam, iam, logs = self.client("lambda"), self.client("iam"), self.client("logs")
        for logical_id, resource in translated["Resources"].items():
            kind, pid = resource["Type"], physical.get(logical_id)
            if pid is None:
                continue
            if kind == "AWS::SQS::Queue":
                got = sqs.get_queue_attributes(QueueUrl=pid, AttributeNames=["QueueArn"])["Attributes"]
                attrs[(logical_id, "Arn")] = got["QueueArn"]
                attrs[(logical_id, "QueueName")] = got["QueueArn"].rsplit(":", 1)[1]
                attrs[(logical_id, "QueueUrl")] = pid
            elif kind == "AWS::S3::Bucket":
                attrs[(logical_id, "Arn")] = f"arn:aws:s3:::{pid}"
            elif kind == "AWS::DynamoDB::Table":
                attrs[(logical_id, "Arn")] = dynamodb.describe_table(TableName=pid)["Table"]["TableArn"]
            elif kind == "AWS::Lambda::Function":
                attrs[(logical_id, "Arn")] = lam.get_function(FunctionName=pid)["Configuration"][
                    "FunctionArn"
                ]
            elif kind == "AWS::IAM::Role":
                attrs[(logical_id, "Arn")] = iam.get_role(RoleName=pid)["Role"]["Arn"]
            elif kind == "AWS::Logs::LogGroup":
                groups = logs.describe_log_groups(logGroupNamePrefix=pid)["logGroups"]
                attrs[(logical_id, "Arn")] = (
                    groups[0]["arn"] if groups else f"arn:aws:logs:::log-group:{pid}:*"
                )
            elif kind == "AWS::Events::Rule":
                # The sweeper's schedule; it never fires locally (`LocalStack.run_sweeper`).
                name = pid.rsplit("/", 1)[-1]
                attrs[(logical_id, "Arn")] = f"arn:aws:events:{self.region}:{ACCOUNT_ID}:rule/{name}"
            elif kind == "AWS::SNS::Topic":
                attrs[(logical_id, "TopicArn")] = pid
                attrs[(logical_id, "TopicName")] = pid.rsplit(":", 1)[1]
        return Resolver(translated, refs, attrs)

    def _apply_skipped(self, translated: Template, resolver: Resolver) -> None:
        s3, sqs, dynamodb, lam, iam = (
            self.client("s3"),
            self.client("sqs"),
            self.client("dynamodb"),
            self.client("lambda"),
            self.client("iam"),
        )
        resources = translated["Resources"]
        for logical_id, resource in resources.items():
            kind = resource["Type"]
            props = resolver.resolve(resource.get("Properties", {}))
            if kind == "AWS::SQS::QueuePolicy":
                for queue_url in props["Queues"]:
                    sqs.set_queue_attributes(
                        QueueUrl=queue_url, Attributes={"Policy": json.dumps(props["PolicyDocument"])}
                    )
            elif kind == "AWS::S3::BucketPolicy":
                policy = _without_tls_statements(props["PolicyDocument"])
                if policy["Statement"]:
                    s3.put_bucket_policy(Bucket=props["Bucket"], Policy=json.dumps(policy))
            elif kind == "AWS::S3::Bucket":
                self._apply_bucket(s3, resolver.resolve({"Ref": logical_id}), props)
            elif kind == "AWS::DynamoDB::Table" and "TimeToLiveSpecification" in props:
                ttl = props["TimeToLiveSpecification"]
                dynamodb.update_time_to_live(
                    TableName=resolver.resolve({"Ref": logical_id}),
                    TimeToLiveSpecification={
                        "Enabled": bool(ttl["Enabled"]),
                        "AttributeName": ttl["AttributeName"],
                    },
                )
            elif kind == "AWS::IAM::Role":
                # moto's CloudFormation keeps inline policies as Python objects that its own IAM
                # evaluator cannot read: put them again as JSON, through PutRolePolicy as CloudFormation
                # does.
                role_name = str(resolver.resolve({"Ref": logical_id}))
                for policy in props.get("Policies", []):
                    iam.put_role_policy(
                        RoleName=role_name,
                        PolicyName=policy["PolicyName"],
                        PolicyDocument=json.dumps(policy["PolicyDocument"]),
                    )
            elif kind == "AWS::Lambda::Function" and props.get("ReservedConcurrentExecutions") is not None:
                lam.put_function_concurrency(
                    FunctionName=resolver.resolve({"Ref": logical_id}),
                    ReservedConcurrentExecutions=int(props["ReservedConcurrentExecutions"]),
                )

    @staticmethod
    def _apply_bucket(s3: Any, bucket: str, props: Mapping[str, Any]) -> None:
        if "PublicAccessBlockConfiguration" in props:
            s3.put_public_access_block(
                Bucket=bucket,
                PublicAccessBlockConfiguration={
                    k: bool(v) for k, v in props["PublicAccessBlockConfiguration"].items()
                },
            )
        if "OwnershipControls" in props:
            s3.put_bucket_ownership_controls(Bucket=bucket, OwnershipControls=props["OwnershipControls"])
        if "LifecycleConfiguration" in props:
            rules = []
            for rule in props["LifecycleConfiguration"]["Rules"]:
                out: dict[str, Any] = {"ID": rule.get("Id", ""), "Status": rule["Status"]}
                out["Filter"] = {"Prefix": rule.get("Prefix", "")}
                if "ExpirationInDays" in rule:
                    out["Expiration"] = {"Days": int(rule["ExpirationInDays"])}
                if "AbortIncompleteMultipartUpload" in rule:
                    days = int(rule["AbortIncompleteMultipartUpload"]["DaysAfterInitiation"])
                    out["AbortIncompleteMultipartUpload"] = {"DaysAfterInitiation": days}
                rules.append(out)
            s3.put_bucket_lifecycle_configuration(Bucket=bucket, LifecycleConfiguration={"Rules": rules})
        if "NotificationConfiguration" in props:
            config: dict[str, Any] = {}
            for entry in props["NotificationConfiguration"].get("QueueConfigurations", []):
                rules = entry.get("Filter", {}).get("S3Key", {}).get("Rules", [])
                config.setdefault("QueueConfigurations", []).append(
                    {
                        "QueueArn": entry["Queue"],
                        "Events": [entry["Event"]],
                        "Filter": {
                            "Key": {"FilterRules": [{"Name": r["Name"], "Value": r["Value"]} for r in rules]}
                        },
                    }
                )
            # Like S3, this sends an s3:TestEvent to each queue.
            s3.put_bucket_notification_configuration(Bucket=bucket, NotificationConfiguration=config)

    def _describe_functions(
        self, sam: Template, translated: Template, resolver: Resolver, deployment: Deployment
    ) -> None:
        lam = self.client("lambda")
        for logical_id, resource in translated["Resources"].items():
            props = resource.get("Properties", {})
            if resource["Type"] == "AWS::Lambda::Function":
                name = deployment.physical_ids[logical_id]
                config = lam.get_function(FunctionName=name)["Configuration"]
                env = resolver.resolve(props.get("Environment", {}).get("Variables", {}))
                reserved = props.get("ReservedConcurrentExecutions")
                reserved_value = resolver.resolve(reserved) if reserved is not None else None
                deployment.functions[logical_id] = FunctionSpec(
                    logical_id=logical_id,
                    name=name,
                    arn=config["FunctionArn"],
                    code_dir=self.root / sam["Resources"][logical_id]["Properties"]["CodeUri"],
                    handler=props["Handler"],
                    timeout_s=int(props.get("Timeout", 3)),
                    memory_mb=int(props.get("MemorySize", 128)),
                    environment={k: str(v) for k, v in env.items()},
                    reserved_concurrency=int(reserved_value) if reserved_value else None,
                    log_group=str(resolver.resolve(props.get("LoggingConfig", {}).get("LogGroup", ""))),
                    role_arn=str(config.get("Role", "")),
                )
            elif resource["Type"] == "AWS::Lambda::EventSourceMapping":
                resolved = resolver.resolve(props)
                function_ref = props["FunctionName"]["Ref"]
                deployment.event_sources.append(
                    EventSourceSpec(
                        function_logical_id=function_ref,
                        queue_arn=resolved["EventSourceArn"],
                        batch_size=int(resolved.get("BatchSize", 10)),
                        max_concurrency=int(resolved.get("ScalingConfig", {}).get("MaximumConcurrency", 2)),
                        report_batch_item_failures="ReportBatchItemFailures"
                        in resolved.get("FunctionResponseTypes", []),
                        batching_window_s=float(resolved.get("MaximumBatchingWindowInSeconds", 0)),
                    )
                )


def layer_dirs(root: Path, template_path: Path) -> list[Path]:
    """The directories of the template's layers (what Lambda puts on sys.path)."""
    sam = load_template(template_path)
    return [
        root / res["Properties"]["ContentUri"]
        for res in sam["Resources"].values()
        if res["Type"] == "AWS::Serverless::LayerVersion"
    ]
