"""Which stack to talk to, and clients for it.

Deployed: `--stack NAME` (or `VAP_STACK`), with the AWS profile/region of `--profile`/`--region`
(or the usual AWS environment); names come from the CloudFormation stack's outputs. Local: the
state file `make local` writes (`.local/stack.json`, or `--local-state`/`VAP_LOCAL_STATE`).
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
import httpx
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    NoCredentialsError,
    NoRegionError,
    PartialCredentialsError,
    ProfileNotFound,
)
from vap_shared.config import Settings
from vap_shared.runtime import s3_client
from vap_shared.settings_parser import text

from .errors import CliError

REPO_ROOT = Path(__file__).resolve().parent.parent
# The functions' own defaults, for a stack whose parameters cannot be read.
DEFAULT_MAX_SIDECAR_BYTES = Settings.max_sidecar_bytes
DEFAULT_FAL_QUEUE_URL = Settings.fal_queue_url
DEFAULT_FAL_ENDPOINT_ID = Settings.fal_endpoint_id


@dataclass
class StackInfo:
    kind: str  # "local" | "deployed"
    name: str
    region: str
    bucket: str
    session: Any
    endpoint_url: str | None = None
    inbox_prefix: str = "inbox/"
    outputs_prefix: str = "outputs/"
    jobs_table: str | None = None
    topic_arn: str | None = None
    modal_endpoint_url: str | None = None
    modal_token_secret: str | None = None
    fal_key_secret: str | None = None
    # fal's queue host (the only host `vap cancel` sends the fal key to) and endpoint.
    fal_queue_url: str = DEFAULT_FAL_QUEUE_URL
    fal_endpoint_id: str = DEFAULT_FAL_ENDPOINT_ID
    max_sidecar_bytes: int = DEFAULT_MAX_SIDECAR_BYTES
    # The CloudFormation stack's outputs (deployed stacks; the local one's when its emulator has them).
    outputs: dict[str, str] = field(default_factory=dict)
    _clients: dict[str, Any] = field(default_factory=dict)

    def client(self, service: str) -> Any:
        if service not in self._clients:
            if service == "s3":  # the Lambdas' S3 configuration (regional virtual-hosted URLs)
                self._clients[service] = s3_client(self.session, self.endpoint_url, max_attempts=3)
            else:
                self._clients[service] = self.session.client(
                    service,
                    endpoint_url=self.endpoint_url,
                    config=Config(retries={"mode": "standard", "max_attempts": 3}),
                )
        return self._clients[service]

    def describe(self) -> str:
        where = f"local stack at {self.endpoint_url}" if self.kind == "local" else f"stack {self.name}"
        return f"{where} ({self.region}), bucket {self.bucket}"


def default_state_file() -> Path:
    env = text(os.environ, "VAP_LOCAL_STATE")
    if env:
        return Path(env)
    here = Path.cwd() / ".local" / "stack.json"
    return here if here.exists() else REPO_ROOT / ".local" / "stack.json"


def discover(
    stack: str | None = None,
    profile: str | None = None,
    region: str | None = None,
    local_state: Path | None = None,
) -> StackInfo:
    stack = stack or text(os.environ, "VAP_STACK")
    if stack:
        return deployed(stack, profile, region)
    return local(local_state or default_state_file())


def local(path: Path) -> StackInfo:
    if not path.exists():
        raise CliError(
            f"No stack selected: the local stack is not running ({path} does not exist; start it with "
            "`make local`), and no deployed stack was named (--stack NAME or VAP_STACK)."
        )
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
        endpoint = str(state["endpoint_url"])
        bucket = str(state["bucket"])
    except (ValueError, KeyError, TypeError):
        raise CliError(f"{path} is not a local stack state file; restart `make local`.") from None
    try:
        httpx.get(f"{endpoint}/moto-api/", timeout=3.0)
    except httpx.HTTPError:
        raise CliError(
            f"The local stack is not running: nothing answers at {endpoint} ({path} is stale). "
            "Start it with `make local`."
        ) from None
    region = str(state.get("region") or "us-east-1")
    session = boto3.session.Session(
        aws_access_key_id=state.get("aws_access_key_id", "testing"),
        aws_secret_access_key=state.get("aws_secret_access_key", "testing"),
        region_name=region,
    )
    name = str(state.get("stack_name") or "vap-local")
    info = StackInfo(
        kind="local",
        name=name,
        region=region,
        bucket=bucket,
        session=session,
        endpoint_url=endpoint,
        inbox_prefix=str(state.get("inbox_prefix") or "inbox/"),
        outputs_prefix=str(state.get("outputs_prefix") or "outputs/"),
        jobs_table=state.get("jobs_table"),
        topic_arn=state.get("topic_arn"),
        modal_endpoint_url=state.get("gpu_url"),
        fal_queue_url=str(state.get("fal_url") or DEFAULT_FAL_QUEUE_URL),
    )
    # The emulated CloudFormation knows the parameters (e.g. MaxSidecarBytes) and the secrets' ARNs.
    with contextlib.suppress(ClientError, BotoCoreError):
        _apply_stack_description(info, _describe_stack(info))
    return info


def deployed(name: str, profile: str | None, region: str | None) -> StackInfo:
    try:
        session = boto3.session.Session(profile_name=profile, region_name=region)
    except ProfileNotFound:
        raise CliError(
            f"The AWS profile {profile!r} does not exist (see `aws configure list-profiles`)."
        ) from None
    if not session.region_name:
        raise CliError("No AWS region: pass --region or set AWS_REGION / a region in your AWS profile.")
    info = StackInfo(kind="deployed", name=name, region=session.region_name, bucket="", session=session)
    try:
        description = _describe_stack(info)
    except (NoCredentialsError, PartialCredentialsError):
        raise CliError(
            "No AWS credentials found: run `aws configure` or `aws sso login`, or pass --profile / set "
            "AWS_PROFILE."
        ) from None
    except NoRegionError:
        raise CliError("No AWS region: pass --region or set AWS_REGION.") from None
    except ClientError as exc:
        error = exc.response.get("Error", {})
        if error.get("Code") == "ValidationError" and "does not exist" in str(error.get("Message", "")):
            raise CliError(
                f"The stack {name!r} was not found in {info.region}: deploy it (`make deploy STACK=…`), or "
                "check --stack / --region / --profile."
            ) from None
        if error.get("Code") in ("ExpiredToken", "ExpiredTokenException", "InvalidClientTokenId"):
            raise CliError(
                f"Your AWS credentials were rejected ({error.get('Code')}): log in again."
            ) from None
        raise CliError(f"Could not read the stack {name!r}: {error.get('Message') or exc}") from None
    _apply_stack_description(info, description)
    if not info.bucket:
        raise CliError(f"The stack {name!r} has no BucketName output; is it a VAP stack?")
    return info


def _describe_stack(info: StackInfo) -> dict[str, Any]:
    stacks = info.client("cloudformation").describe_stacks(StackName=info.name)["Stacks"]
    return dict(stacks[0]) if stacks else {}


def _apply_stack_description(info: StackInfo, description: dict[str, Any]) -> None:
    outputs = {o["OutputKey"]: o.get("OutputValue", "") for o in description.get("Outputs", [])}
    parameters = {p["ParameterKey"]: p.get("ParameterValue", "") for p in description.get("Parameters", [])}
    info.outputs = outputs
    # By ARN: CloudFormation names the secrets (`<logical id>-<random>`), so no name can be guessed.
    info.modal_token_secret = outputs.get("ModalTokenSecretArn") or info.modal_token_secret
    info.fal_key_secret = outputs.get("FalKeySecretArn") or info.fal_key_secret
    if info.kind == "deployed":
        info.bucket = outputs.get("BucketName", "")
        info.topic_arn = outputs.get("TopicArn")
        info.jobs_table = outputs.get("JobsTable")
        info.modal_endpoint_url = parameters.get("ModalEndpointUrl") or None
        info.fal_queue_url = parameters.get("FalQueueUrl") or DEFAULT_FAL_QUEUE_URL
        info.fal_endpoint_id = parameters.get("FalEndpointId") or DEFAULT_FAL_ENDPOINT_ID
    raw = parameters.get("MaxSidecarBytes", "")
    if raw.isdigit():
        info.max_sidecar_bytes = int(raw)
