"""IAM on the local stack: moto's authorization on, a credential per principal, as on AWS.

Once the stack is deployed, every request must be signed by a principal moto knows, and moto checks
the action against that principal's policies (`INITIAL_NO_AUTH_ACTION_COUNT` 0, via moto's
`/moto-api/reset-auth`). The harness (tests, `vap` against the local stack, the local GPU/fal
stand-ins) signs as an admin user created at setup; each function signs with temporary
credentials of its own role from template.yaml, obtained as the Lambda service obtains them (an
AssumeRole on the role, made here for the service principal the role trusts).

moto's evaluator (moto/iam/access_control.py) checks Action and Resource of identity policies, and
the trust policy of a role being assumed. Where it falls short of AWS on the calls this service
makes, this module fills the gap in moto (running in this process):

- the resource of DynamoDB, SNS and Secrets Manager requests (moto checks those against "*", so a
  statement naming a table, topic or secret would never match): derived from the request, as AWS
  does (a DynamoDB index is `<table ARN>/index/<name>`);
- presigned S3 URLs (moto fails on a request without an Authorization header): the query
  signature is verified with the signer's key, the URL's expiry and the signer's credential expiry
  are enforced, and the signer's policies must allow the action on the object;
- CopyObject: the source object's s3:GetObject is checked too (moto checks only the target);
- the signature of a body-less REST call (Lambda's GETs): moto hashes its parsed parameters as the
  body, so no such call's signature ever matched;
- SQS batch calls need the single call's permission (sqs:DeleteMessage for DeleteMessageBatch),
  as in IAM (moto asks for an sqs:DeleteMessageBatch action that does not exist);
- AccessDenied on JSON-protocol services (DynamoDB, Secrets Manager, SQS) is answered in their JSON
  shape (`AccessDeniedException`), as the SDK expects, not in IAM's XML.

What moto does not evaluate at all (conditions of identity policies, resource policies, KMS key
policies, session policies, permission boundaries, SCPs) is listed in local_stack/README.md.
"""

from __future__ import annotations

import hmac
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import httpx

log = logging.getLogger("local_stack.iam")

ADMIN_USER = "vap-local-admin"
ADMIN_POLICY = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}
JSON_SERVICES = ("dynamodb", "secretsmanager", "sqs")
# IAM has no actions of their own for SQS's batch calls: each needs the single call's permission.
SQS_BATCH_ACTIONS = {
    "SendMessageBatch": "SendMessage",
    "DeleteMessageBatch": "DeleteMessage",
    "ChangeMessageVisibilityBatch": "ChangeMessageVisibility",
}


def set_authorization(endpoint_url: str, enabled: bool) -> None:
    """moto's switch: every request authenticated and authorized (0), or none (inf)."""
    httpx.post(f"{endpoint_url}/moto-api/reset-auth", content=b"0" if enabled else b"inf", timeout=30)


def create_admin(iam: Any) -> dict[str, str]:
    """The harness's principal: an IAM user allowed everything; its access key."""
    iam.create_user(UserName=ADMIN_USER)
    iam.put_user_policy(UserName=ADMIN_USER, PolicyName="admin", PolicyDocument=json.dumps(ADMIN_POLICY))
    key = iam.create_access_key(UserName=ADMIN_USER)["AccessKey"]
    return {"AWS_ACCESS_KEY_ID": key["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"]}


def assume_role_as_lambda(
    account_id: str, region: str, role_arn: str, session_name: str, duration_s: int
) -> dict[str, str]:
    """Temporary credentials of `role_arn`, as the Lambda service gets them for an execution
    environment (the role trusts lambda.amazonaws.com, which only the service can be; moto cannot
    evaluate a service principal in a trust policy, so this is moto's STS, called directly)."""
    from moto.iam.models import iam_backends
    from moto.sts.models import sts_backends

    role_name = role_arn.rsplit("/", 1)[1]
    trust = json.loads(iam_backends[account_id]["aws"].get_role(role_name).assume_role_policy_document)
    trusted = [
        statement
        for statement in trust.get("Statement", [])
        if statement.get("Effect") == "Allow"
        and "lambda.amazonaws.com" in json.dumps(statement.get("Principal", {}))
        and "sts:AssumeRole" in json.dumps(statement.get("Action", ""))
    ]
    if not trusted:
        raise PermissionError(f"{role_arn} does not trust lambda.amazonaws.com: Lambda could not assume it")
    role = sts_backends[account_id]["aws"].assume_role(
        region_name=region,
        role_session_name=session_name,
        role_arn=role_arn,
        policy="",
        duration=duration_s,
        external_id="",
    )
    return {
        "AWS_ACCESS_KEY_ID": role.access_key_id,
        "AWS_SECRET_ACCESS_KEY": role.secret_access_key,
        "AWS_SESSION_TOKEN": role.session_token,
    }


# ---------------------------------------------------------------------------------------------- moto gaps


def _table_arn(region: str, account: str, table: str) -> str:
    return f"arn:aws:dynamodb:{region}:{account}:table/{table}"


def _dynamodb_resource(self: Any) -> str:
    params = getattr(self, "params", None) or {}
    table = params.get("TableName")
    if not table:
        # Batch and transaction calls name their tables inside; moto checks one resource: the first.
        items = params.get("RequestItems") or {}
        tables = list(items) or [
            next(iter(item.values())).get("TableName") for item in params.get("TransactItems", []) if item
        ]
        table = tables[0] if tables else None
    if not table:
        return "*"
    arn = _table_arn(self.region, self.current_account, str(table))
    index = params.get("IndexName")
    return f"{arn}/index/{index}" if index else arn


def _sns_resource(self: Any) -> str:
    return str(self._get_param("TopicArn") or self._get_param("TargetArn") or "*")


def _secretsmanager_resource(self: Any) -> str:
    secret_id = self._get_param("SecretId")
    if not secret_id:
        return "*"
    if str(secret_id).startswith("arn:"):
        return str(secret_id)
    try:
        return str(self.backend.describe_secret(secret_id).arn)
    except Exception:  # unknown secret: let the action fail as it would anyway
        return "*"


class PresignedUrlDenied(Exception):
    def __init__(self, code: str, message: str, signer: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.signer = signer


def verify_presigned(
    method: str, url: str, request_headers: Any, account_id: str, action: str, resource: str
) -> None:
    """AWS's checks of a SigV4 query-signed S3 request: the signature (with the signer's secret),
    the URL's lifetime, the signer's credential lifetime, the signer's permission. Raises
    PresignedUrlDenied."""
    from botocore.auth import S3SigV4QueryAuth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials
    from moto.iam.access_control import (
        CreateAccessKeyFailure,
        IAMPolicy,
        PermissionResult,
        create_access_key,
    )
    from moto.sts.models import sts_backends

    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query, keep_blank_values=True))
    if "Signature" in query and "X-Amz-Signature" not in query:
        # Buckets created since mid-2020 accept only Signature Version 4.
        raise PresignedUrlDenied(
            "InvalidRequest",
            "The authorization mechanism you have provided is not supported. Please use AWS4-HMAC-SHA256.",
        )
    credential = query.get("X-Amz-Credential", "").split("/")
    if len(credential) != 5 or query.get("X-Amz-Algorithm") != "AWS4-HMAC-SHA256":
        raise PresignedUrlDenied("AuthorizationQueryParametersError", "Invalid query parameters")
    access_key_id, _, region, service, _ = credential
    token = {"X-Amz-Security-Token": query["X-Amz-Security-Token"]} if "X-Amz-Security-Token" in query else {}
    try:
        key = create_access_key(account_id, "aws", access_key_id, token)
    except CreateAccessKeyFailure as exc:
        if exc.reason == "InvalidToken":
            raise PresignedUrlDenied(
                "InvalidToken", "The provided token is malformed or otherwise invalid."
            ) from None
        raise PresignedUrlDenied(
            "InvalidAccessKeyId", "The AWS Access Key Id you provided does not exist in our records."
        ) from None
    now = datetime.now(UTC)
    signed_at = datetime.strptime(query.get("X-Amz-Date", ""), "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
    expires = int(query.get("X-Amz-Expires", "0"))
    if (now - signed_at).total_seconds() > expires:
        raise PresignedUrlDenied("AccessDenied", "Request has expired")
    assumed = next(
        (r for r in sts_backends[account_id]["aws"].assumed_roles if r.access_key_id == access_key_id), None
    )
    if assumed is not None and assumed.expiration.replace(tzinfo=UTC) < now:
        raise PresignedUrlDenied("ExpiredToken", "The provided token has expired.")

    # Sign the same request again with the signer's secret and compare.
    received = {str(k).lower(): str(v) for k, v in request_headers.items()}
    host = received.get("host", "")
    # The other parameters exactly as sent (their encoding is part of what was signed).
    unsigned = [p for p in parts.query.split("&") if p and not p.startswith("X-Amz-")]
    base = f"{parts.scheme}://{host}{parts.path}" + (f"?{'&'.join(unsigned)}" if unsigned else "")
    creds = key.create_credentials()
    signer = S3SigV4QueryAuth(
        Credentials(creds.access_key, creds.secret_key, creds.token), service, region, expires
    )
    signed = [name for name in query.get("X-Amz-SignedHeaders", "host").split(";") if name]
    request = AWSRequest(method=method, url=base, headers={name: received.get(name, "") for name in signed})
    # add_auth would stamp the request with the current time: sign at the URL's own X-Amz-Date.
    request.context["timestamp"] = query["X-Amz-Date"]
    signer._modify_request_before_signing(request)  # type: ignore[attr-defined]
    expected = signer.signature(signer.string_to_sign(request, signer.canonical_request(request)), request)
    if not hmac.compare_digest(expected, query.get("X-Amz-Signature", "")):
        raise PresignedUrlDenied(
            "SignatureDoesNotMatch",
            "The request signature we calculated does not match the signature you provided.",
        )

    permitted = False
    for policy in key.collect_policies():
        result = IAMPolicy(policy).is_action_permitted(action, resource)
        if result == PermissionResult.DENIED:
            raise PresignedUrlDenied("AccessDenied", "Access Denied", key.arn)
        permitted = permitted or result == PermissionResult.PERMITTED
    if not permitted:
        raise PresignedUrlDenied("AccessDenied", "Access Denied", key.arn)


@dataclass(frozen=True)
class Denial:
    """A request IAM refused: who, what, on what (`stack.denied`)."""

    principal: str
    action: str
    resource: str


class MotoAuthorizationGaps:
    """The patches above, installed on moto's classes in this process (and removed again); every
    refusal is recorded in `denied`."""

    def __init__(self) -> None:
        self._restore: list[Callable[[], None]] = []
        self.denied: list[Denial] = []

    def install(self) -> None:
        from moto.core.authorization import ActionAuthenticatorMixin
        from moto.core.exceptions import AccessDeniedError
        from moto.dynamodb.responses import DynamoHandler
        from moto.iam.access_control import IAMRequestBase, S3IAMRequest, create_access_key
        from moto.s3.exceptions import S3AccessDeniedError, S3ClientError
        from moto.secretsmanager.responses import SecretsManagerResponse
        from moto.sns.responses import SNSResponse
        from werkzeug.exceptions import HTTPException

        resources: tuple[tuple[type, Callable[[Any], str]], ...] = (
            (DynamoHandler, _dynamodb_resource),
            (SNSResponse, _sns_resource),
            (SecretsManagerResponse, _secretsmanager_resource),
        )
        for cls, method in resources:
            cls._determine_resource = method  # type: ignore[attr-defined]
            self._restore.append(partial(delattr, cls, "_determine_resource"))

        class JsonAccessDenied(HTTPException):
            code = 400

            def __init__(self, message: str) -> None:
                super().__init__(json.dumps({"__type": "AccessDeniedException", "message": message}))

            def get_headers(self, *args: Any, **kwargs: Any) -> list[tuple[str, str]]:
                return [("Content-Type", "application/x-amz-json-1.0")]

        original = ActionAuthenticatorMixin._authenticate_and_authorize_action
        denied = self.denied

        def record(self: Any, access_key_id: str, action: str, resource: str) -> None:
            try:
                principal = create_access_key(self.current_account, "aws", access_key_id, self.headers).arn
            except Exception:
                principal = access_key_id
            denied.append(Denial(principal, action, resource))
            log.info("denied: %s %s on %s", principal, action, resource)

        def check(self: Any, iam_request_cls: type, resource: str, action: str) -> None:
            try:
                original(self, iam_request_cls, resource)
            except (AccessDeniedError, S3AccessDeniedError) as exc:
                auth = self.headers.get("Authorization", "")
                access_key_id = (
                    auth.split("Credential=", 1)[1].split("/", 1)[0] if "Credential=" in auth else ""
                )
                record(self, access_key_id, f"{_service_of(self.headers)}:{action}", resource)
                json_service = _service_of(self.headers) in JSON_SERVICES and self.headers.get("X-Amz-Target")
                if isinstance(exc, AccessDeniedError) and json_service:
                    raise JsonAccessDenied(exc.message) from None
                raise

        def authorize(self: Any, iam_request_cls: type, resource: str = "*") -> None:
            from moto import settings

            if ActionAuthenticatorMixin.request_count < settings.INITIAL_NO_AUTH_ACTION_COUNT:
                return original(self, iam_request_cls, resource)
            headers = self.headers
            if iam_request_cls is S3IAMRequest and "Authorization" not in headers:
                environ = self.request.environ
                raw = str(environ.get("RAW_URI") or environ.get("REQUEST_URI") or "")
                if "Signature=" in raw:
                    url = f"http://{environ.get('HTTP_HOST', '')}{raw}"
                    action = f"s3:{self._get_action()}"
                    try:
                        verify_presigned(
                            self.method, url, self.request.headers, self.current_account, action, resource
                        )
                    except PresignedUrlDenied as exc:
                        log.info("presigned %s %s refused: %s %s", self.method, resource, exc.code, exc)
                        if exc.code == "AccessDenied" and exc.signer:
                            denied.append(Denial(exc.signer, action, resource))
                        raise S3ClientError(exc.code, str(exc)) from None
                    return None
            action = self._get_action()
            batch = _service_of(headers) == "sqs" and action in SQS_BATCH_ACTIONS
            if batch:
                # Authorized as the single call; only for the check (moto picks the method by it too).
                self._get_action = lambda: SQS_BATCH_ACTIONS[action]
            try:
                check(self, iam_request_cls, resource, SQS_BATCH_ACTIONS[action] if batch else action)
            finally:
                if batch:
                    del self._get_action
            copy_source = headers.get("x-amz-copy-source") if iam_request_cls is S3IAMRequest else None
            if copy_source:
                # CopyObject also reads its source: s3:GetObject on it, as AWS requires.
                source = copy_source.lstrip("/").split("?", 1)[0]
                saved = self.data.get("Action")
                self.data["Action"] = "GetObject"
                try:
                    check(self, iam_request_cls, f"arn:aws:s3:::{source}", "GetObject")
                finally:
                    self.data["Action"] = saved
            return None

        create_request = IAMRequestBase._create_aws_request

        def create_aws_request(self: Any) -> Any:
            # moto hashes its parsed parameters as the body of a body-less REST call (Lambda's GETs):
            # the signature of such a call never matches. Sign what was sent: no body.
            if self._body or self._method not in ("GET", "HEAD", "DELETE"):
                return create_request(self)
            saved, self._data = self._data, {}
            try:
                return create_request(self)
            finally:
                self._data = saved

        IAMRequestBase._create_aws_request = create_aws_request  # type: ignore[method-assign]
        self._restore.append(lambda: setattr(IAMRequestBase, "_create_aws_request", create_request))
        ActionAuthenticatorMixin._authenticate_and_authorize_action = authorize  # type: ignore[method-assign]
        self._restore.append(
            lambda: setattr(ActionAuthenticatorMixin, "_authenticate_and_authorize_action", original)
        )

    def uninstall(self) -> None:
        while self._restore:
            self._restore.pop()()


def _service_of(headers: Any) -> str:
    auth = headers.get("Authorization", "")
    scope = auth.split("Credential=", 1)[1].split(",", 1)[0].split("/") if "Credential=" in auth else []
    return scope[3] if len(scope) > 3 else ""
