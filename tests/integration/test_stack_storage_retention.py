"""The local stack's bucket carries the template's lifecycle rules, as `sam deploy` would create
them (moto's CloudFormation skips them; the emulator applies them from the same template)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from local_stack import LocalStack
from local_stack.cfn import Resolver, load_template, parameter_defaults

pytestmark = pytest.mark.stack
TEMPLATE = Path(__file__).resolve().parents[2] / "template.yaml"


def rules(**params: str) -> dict[str, dict[str, Any]]:
    """The template's lifecycle rules for these parameters, by rule id."""
    sam = load_template(TEMPLATE)
    refs: dict[str, Any] = {**parameter_defaults(sam, params), "AWS::NoValue": None}
    config = Resolver(sam, refs, {}).resolve(
        sam["Resources"]["Bucket"]["Properties"]["LifecycleConfiguration"]
    )
    return {rule["Id"]: rule for rule in config["Rules"]}


def test_the_local_bucket_has_the_templates_lifecycle(stack: LocalStack) -> None:
    applied = stack.s3.get_bucket_lifecycle_configuration(Bucket=stack.bucket)["Rules"]
    expected = rules(**stack.config.parameters)
    assert {r["ID"] for r in applied} == set(expected)
    for rule in applied:
        wanted = expected[rule["ID"]]
        assert rule["Status"] == wanted["Status"], rule["ID"]
        assert rule["Filter"].get("Prefix", "") == wanted.get("Prefix", ""), rule["ID"]
        if "ExpirationInDays" in wanted:
            assert rule["Expiration"]["Days"] == int(wanted["ExpirationInDays"]), rule["ID"]
        if "AbortIncompleteMultipartUpload" in wanted:
            assert rule["AbortIncompleteMultipartUpload"] == wanted["AbortIncompleteMultipartUpload"]
