"""Storage does not grow forever: every prefix the service writes has a lifecycle rule (outputs/
only once the operator sets a retention), incomplete multipart uploads are aborted, inputs outlive
any job that can still need them (tests/integration/test_stack_storage_retention.py: the local stack
applies the same rules)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from template_kit import sam_template
from vap_shared.budget import MAX_BUDGET_S, SWEEP_GRACE_S

from local_stack.cfn import Resolver, Template, parameter_defaults

ROOT = Path(__file__).resolve().parents[2]
DAY_S = 86400


def resolver(template: Template, **params: str) -> Resolver:
    refs: dict[str, Any] = {**parameter_defaults(template, params), "AWS::NoValue": None}
    return Resolver(template, refs, {})


def rules(**params: str) -> dict[str, dict[str, Any]]:
    sam = sam_template()
    config = resolver(sam, **params).resolve(
        sam["Resources"]["Bucket"]["Properties"]["LifecycleConfiguration"]
    )
    return {rule["Id"]: rule for rule in config["Rules"]}


def _expiring(found: dict[str, dict[str, Any]]) -> dict[str, int]:
    return {
        r["Prefix"]: int(r["ExpirationInDays"])
        for r in found.values()
        if r["Status"] == "Enabled" and "ExpirationInDays" in r
    }


def test_defaults_expire_inbox_and_work_and_keep_outputs() -> None:
    found = rules()
    assert _expiring(found) == {"inbox/": 30, "work/": 7}
    assert found["expire-outputs"]["Status"] == "Disabled" and found["expire-outputs"]["Prefix"] == "outputs/"
    (abort,) = [r for r in found.values() if "AbortIncompleteMultipartUpload" in r]
    assert abort["Status"] == "Enabled" and "Prefix" not in abort  # the whole bucket
    assert abort["AbortIncompleteMultipartUpload"] == {"DaysAfterInitiation": 1}


def test_each_retention_parameter_sets_its_prefix() -> None:
    found = rules(InboxRetentionDays="14", WorkRetentionDays="9", OutputRetentionDays="365")
    assert _expiring(found) == {"inbox/": 14, "work/": 9, "outputs/": 365}


def test_every_prefix_the_functions_use_has_a_rule() -> None:
    sam = sam_template()
    prefixes = {
        value
        for r in sam["Resources"].values()
        if r["Type"] == "AWS::Serverless::Function"
        for name, value in r["Properties"]["Environment"]["Variables"].items()
        if name.endswith("_PREFIX")
    }
    assert prefixes == {"inbox/", "work/", "outputs/"}
    assert prefixes == {r["Prefix"] for r in rules().values() if "Prefix" in r}


def test_inputs_outlive_any_job_that_can_still_need_them() -> None:
    """A job reads its uploads (inbox/) and decoded data: media (work/) until it ends: one delivery
    can wait in the ingest queue for the queue's retention, then run for the largest budget, then the
    sweeper settles it within its grace."""
    sam = sam_template()
    queue_s = int(sam["Resources"]["IngestQueue"]["Properties"]["MessageRetentionPeriod"])
    needed_days = math.ceil((queue_s + MAX_BUDGET_S + SWEEP_GRACE_S) / DAY_S)
    for name in ("InboxRetentionDays", "WorkRetentionDays"):
        spec = sam["Parameters"][name]
        assert spec["MinValue"] >= needed_days, name
        assert spec["Default"] >= spec["MinValue"], name
    assert sam["Parameters"]["OutputRetentionDays"]["Default"] == 0  # results are kept unless asked


def test_the_readme_documents_the_retention_settings() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    costs = readme.split("\n## Costs per video\n", 1)[1].split("\n## ", 1)[0]
    for name in ("InboxRetentionDays", "WorkRetentionDays", "OutputRetentionDays"):
        default = sam_template()["Parameters"][name]["Default"]
        assert f"`{name}` ({default}" in costs, name
