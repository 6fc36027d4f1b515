"""Deleting (or replacing) the stack keeps everything that holds data or credentials, consistently:
the bucket, the jobs table and every secret; and nothing kept blocks re-creating a stack of the same
name (no kept resource has a name made from the stack name alone)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from template_kit import sam_template, transformed_template

ROOT = Path(__file__).resolve().parents[2]
# Resource types whose loss is data or credentials lost.
STATEFUL = {"AWS::S3::Bucket", "AWS::DynamoDB::Table", "AWS::SecretsManager::Secret"}
# Where a type takes a fixed physical name.
NAME_PROPERTY = {
    "AWS::S3::Bucket": "BucketName",
    "AWS::DynamoDB::Table": "TableName",
    "AWS::SecretsManager::Secret": "Name",
}


def _stateful(template: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {k: r for k, r in template["Resources"].items() if r["Type"] in STATEFUL}


def test_every_data_or_credential_resource_is_kept_on_delete_and_replace() -> None:
    for template in (sam_template(), transformed_template()):
        kept = _stateful(template)
        assert {"Bucket", "JobsTable", "SigningSecret", "FalKeySecret", "ModalTokenSecret"} <= set(kept)
        for logical_id, resource in kept.items():
            assert resource.get("DeletionPolicy") == "Retain", logical_id
            assert resource.get("UpdateReplacePolicy") == "Retain", logical_id


def test_a_kept_resource_never_blocks_a_stack_of_the_same_name() -> None:
    for logical_id, resource in _stateful(sam_template()).items():
        name = resource.get("Properties", {}).get(NAME_PROPERTY[resource["Type"]])
        if name is None:
            continue  # CloudFormation names it <stack>-<LogicalId>-<random> or <LogicalId>-<random>
        # A fixed name must include the stack's id, which a re-created stack does not share.
        assert "AWS::StackId" in json.dumps(name), logical_id


def test_every_secret_is_reachable_from_the_outputs() -> None:
    sam = sam_template()
    secrets = {k for k, r in sam["Resources"].items() if r["Type"] == "AWS::SecretsManager::Secret"}
    output_refs = {o["Value"].get("Ref") for o in sam["Outputs"].values() if isinstance(o["Value"], dict)}
    assert secrets <= output_refs


def test_the_readme_teardown_names_what_is_kept() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("**Teardown**", 1)[1].split("\n\n", 1)[0]
    for output in ("BucketName", "JobsTable", "SigningSecretArn", "FalKeySecretArn", "ModalTokenSecretArn"):
        assert output in section and output in sam_template()["Outputs"], output
    assert "DeletionPolicy: Retain" in section and "aws secretsmanager delete-secret" in section
