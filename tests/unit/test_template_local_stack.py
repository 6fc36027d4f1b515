"""Fast checks of the local stack's template reading and protocol adapters (no servers)."""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from local_stack.cfn import Resolver, load_template, parameter_defaults
from local_stack.fal_server import USER_ID, FalServer
from local_stack.function_url import build_event, render_response
from local_stack.sqs_poller import to_lambda_record

ROOT = Path(__file__).resolve().parents[2]


def test_yaml_tags_become_intrinsics() -> None:
    sam = load_template(ROOT / "template.yaml")
    assert sam["Resources"]["IngestFunction"]["Properties"]["Role"] == {"Fn::GetAtt": ["IngestRole", "Arn"]}
    assert sam["Resources"]["Bucket"]["Properties"]["BucketName"]["Fn::Sub"][0] == (
        "vap-${AWS::AccountId}-${AWS::Region}-${StackIdPart}"
    )
    assert parameter_defaults(sam, {"DefaultBackend": "fal"})["DefaultBackend"] == "fal"


def test_resolver_evaluates_the_functions_the_template_uses() -> None:
    template = {"Conditions": {"Yes": {"Fn::Not": [{"Fn::Equals": [{"Ref": "N"}, 0]}]}}}
    resolver = Resolver(
        template, {"N": "3", "AWS::Region": "eu-west-1"}, {("Url", "FunctionUrl"): "https://h.x/"}
    )
    assert (
        resolver.resolve({"Fn::Sub": "a-${AWS::Region}-${Url.FunctionUrl}-${!Keep}"})
        == "a-eu-west-1-https://h.x/-${Keep}"
    )
    assert resolver.resolve({"Fn::Select": [2, {"Fn::Split": ["/", "https://h.x/"]}]}) == "h.x"
    assert resolver.resolve({"Fn::If": ["Yes", {"Ref": "N"}, "no"]}) == "3"
    assert resolver.resolve({"Fn::Join": [",", ["a", {"Ref": "N"}]]}) == "a,3"


def test_function_url_event_and_response_mapping() -> None:
    event = build_event(
        "POST",
        "/callbacks/fal/j?x=1",
        [("Content-Type", "application/json"), ("X-A", "1"), ("x-a", "2")],
        b"{}",
        "127.0.0.1",
    )
    assert event["headers"]["x-a"] == "1,2" and event["body"] == "{}" and not event["isBase64Encoded"]
    assert event["rawPath"] == "/callbacks/fal/j" and event["queryStringParameters"] == {"x": "1"}
    assert render_response({"statusCode": 401, "body": "no"}) == (401, {}, b"no")
    assert render_response({"ok": True})[2] == b'{"ok": true}'
    encoded = {"statusCode": 200, "isBase64Encoded": True, "body": base64.b64encode(b"\x00").decode()}
    assert render_response(encoded)[2] == b"\x00"


def test_sqs_record_shape() -> None:
    message = {
        "MessageId": "m",
        "ReceiptHandle": "r",
        "Body": "b",
        "Attributes": {"ApproximateReceiveCount": "2"},
    }
    record = to_lambda_record(message, "arn:aws:sqs:us-east-1:1:q", "us-east-1")
    assert record["attributes"]["ApproximateReceiveCount"] == "2"
    assert (record["eventSource"], record["messageId"], record["body"]) == ("aws:sqs", "m", "b")


def test_fal_webhook_signature_verifies_with_the_jwks() -> None:
    server = FalServer("key")  # not started: signing and the JWKS need no socket
    try:
        body = json.dumps({"request_id": "r1", "status": "OK", "payload": {}}).encode()
        headers = server.sign("r1", body, timestamp=1700000000)
        (jwk,) = server.jwks()["keys"]
        raw = base64.urlsafe_b64decode(jwk["x"] + "=" * (-len(jwk["x"]) % 4))
        message = f"r1\n{USER_ID}\n1700000000\n{hashlib.sha256(body).hexdigest()}".encode()
        Ed25519PublicKey.from_public_bytes(raw).verify(
            bytes.fromhex(headers["X-Fal-Webhook-Signature"]), message
        )
    finally:
        server._server.httpd.server_close()
