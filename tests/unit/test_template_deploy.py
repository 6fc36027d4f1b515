"""template.yaml on a real account: the names a user chooses never break the deploy, and the
defaults fit a new account."""

from __future__ import annotations

import ipaddress
import re
import uuid
from pathlib import Path
from typing import Any

import botocore.session
import pytest
from template_kit import transformed_template

from local_stack.cfn import Resolver, Template, parameter_defaults

ROOT = Path(__file__).resolve().parents[2]
TEMPLATE = ROOT / "template.yaml"

# Valid CloudFormation stack names a user may pick ([A-Za-z][-A-Za-z0-9]*, up to 128), plus a dotted
# one (not a valid stack name today, but nothing about the bucket may depend on that).
STACK_NAMES = ["vap", "VapProd", "A" + "b" * 59, "Vap-" + "x" * 124, "my.stack.name"]
ACCOUNTS = ["123456789012", "000000000001"]


def _regions() -> list[tuple[str, str]]:
    """(partition, region) for every region botocore knows, in every partition."""
    session = botocore.session.get_session()
    found: set[tuple[str, str]] = set()
    for partition in session.get_data("endpoints")["partitions"]:
        found |= {(partition["partition"], region) for region in partition["regions"]}
    for partition in session.get_data("partitions")["partitions"]:
        # partitions.json also lists pseudo-regions for global endpoints ("aws-global").
        found |= {(partition["id"], r) for r in partition["regions"] if not r.endswith("-global")}
    return sorted(found)


REGIONS = _regions()


def test_the_region_list_covers_every_partition_and_the_longest_names() -> None:
    partitions = {p for p, _ in REGIONS}
    assert {"aws", "aws-cn", "aws-us-gov", "aws-iso-f"} <= partitions
    assert len(REGIONS) >= 40
    assert max(len(r) for _, r in REGIONS) >= len("us-isof-south-1")


def is_valid_bucket_name(name: str) -> bool:
    """S3's general purpose bucket naming rules, plus no dots (a dotted name breaks TLS for
    virtual-hosted URLs, which is how every presigned URL addresses the bucket)."""
    if not 3 <= len(name) <= 63 or not re.fullmatch(r"[a-z0-9][a-z0-9-]*[a-z0-9]", name):
        return False
    try:
        ipaddress.ip_address(name)
        return False
    except ValueError:
        pass
    if name.startswith(("xn--", "sthree-", "amzn-s3-demo-")):
        return False
    return not name.endswith(("-s3alias", "--ol-s3", ".mrap", "--x-s3", "--table-s3"))


@pytest.mark.parametrize(
    ("name", "valid"),
    [
        ("vap-123456789012-us-east-1-1c2fa620", True),
        ("VapProd-123456789012-us-east-1", False),  # capitals
        ("a" * 64, False),
        ("my.bucket", False),
        ("192.168.1.1", False),
        ("xn--abc", False),
        ("ab", False),
        ("-ab", False),
    ],
)
def test_bucket_name_rules(name: str, valid: bool) -> None:
    assert is_valid_bucket_name(name) is valid


@pytest.fixture(scope="module")
def cfn() -> Template:
    return transformed_template()


def _resolver(
    cfn: Template,
    stack_name: str,
    region: str,
    partition: str,
    account: str,
    overrides: dict[str, str] | None = None,
) -> Resolver:
    stack_id = f"arn:{partition}:cloudformation:{region}:{account}:stack/{stack_name}/{uuid.uuid4()}"
    refs: dict[str, Any] = {
        "AWS::StackName": stack_name,
        "AWS::StackId": stack_id,
        "AWS::AccountId": account,
        "AWS::Region": region,
        "AWS::Partition": partition,
        "AWS::NoValue": None,
        **parameter_defaults(cfn, overrides),
    }
    return Resolver(cfn, refs, {})


def _bucket_and_source_arn(resolver: Resolver, cfn: Template) -> tuple[str, str]:
    bucket = resolver.resolve(cfn["Resources"]["Bucket"]["Properties"]["BucketName"])
    policy = cfn["Resources"]["IngestQueuePolicy"]["Properties"]["PolicyDocument"]
    (allow,) = [s for s in policy["Statement"] if s["Effect"] == "Allow"]
    return bucket, resolver.resolve(allow["Condition"]["ArnLike"]["aws:SourceArn"])


@pytest.mark.parametrize("stack_name", STACK_NAMES)
def test_bucket_name_is_valid_for_any_stack_name_in_every_region(cfn: Template, stack_name: str) -> None:
    for account in ACCOUNTS:
        for partition, region in REGIONS:
            resolver = _resolver(cfn, stack_name, region, partition, account)
            bucket, source_arn = _bucket_and_source_arn(resolver, cfn)
            assert is_valid_bucket_name(bucket), (stack_name, region, bucket)
            # The queue policy lets exactly this bucket send (and names it without a cycle).
            assert source_arn == f"arn:{partition}:s3:::{bucket}", (region, source_arn)


def test_a_recreated_stack_of_the_same_name_gets_a_new_bucket(cfn: Template) -> None:
    # The bucket is retained when its stack is deleted; the next stack must not collide with it.
    first = _bucket_and_source_arn(_resolver(cfn, "vap", "eu-west-1", "aws", ACCOUNTS[0]), cfn)[0]
    second = _bucket_and_source_arn(_resolver(cfn, "vap", "eu-west-1", "aws", ACCOUNTS[0]), cfn)[0]
    assert first != second


def test_the_policy_names_the_bucket_without_a_reference(cfn: Template) -> None:
    # A Ref/GetAtt of Bucket inside the queue policy would be a cycle (Bucket DependsOn the policy).
    policy = cfn["Resources"]["IngestQueuePolicy"]
    assert "Bucket" not in re.findall(r"'(?:Ref|Fn::GetAtt)': \['?(\w+)", str(policy["Properties"]))
    assert "${Bucket" not in str(policy["Properties"])
    assert cfn["Resources"]["Bucket"]["DependsOn"] == "IngestQueuePolicy"


# ---------------------------------------------------------------------------------------------- concurrency


def _webhook_reservation(cfn: Template, overrides: dict[str, str]) -> Any:
    resolver = _resolver(cfn, "vap", "us-east-1", "aws", ACCOUNTS[0], overrides)
    return resolver.resolve(cfn["Resources"]["WebhookFunction"]["Properties"]["ReservedConcurrentExecutions"])


def test_default_stack_reserves_no_concurrency(cfn: Template) -> None:
    # A new account has a concurrency quota of 10 and AWS keeps 100 unreserved: any default
    # reservation fails the deploy there.
    assert cfn["Parameters"]["WebhookReservedConcurrency"]["Default"] == 0
    assert _webhook_reservation(cfn, {}) is None  # AWS::NoValue: the property is left out
    for logical_id, resource in cfn["Resources"].items():
        if resource["Type"] == "AWS::Lambda::Function" and logical_id != "WebhookFunction":
            assert "ReservedConcurrentExecutions" not in resource["Properties"], logical_id


def test_a_reservation_is_applied_when_asked_for(cfn: Template) -> None:
    assert _webhook_reservation(cfn, {"WebhookReservedConcurrency": "10"}) == "10"
    text = cfn["Parameters"]["WebhookReservedConcurrency"]["Description"]
    assert "110" in text and "0 = no reservation" in text
