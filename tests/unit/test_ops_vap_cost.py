"""`vap cost --since` and the COST column of `vap list`, against emulated S3 (status/metadata only)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import boto3
import pytest
from moto import mock_aws
from vap_shared.cost import AWS_PER_JOB, GpuRun, Prices, estimate

from vap_cli import commands, costs
from vap_cli.__main__ import main
from vap_cli.config import StackInfo
from vap_cli.errors import CliError

BUCKET = "vap-bucket"
NOW = datetime.now(UTC)


def job_id(days_ago: float, suffix: str) -> str:
    return f"{(NOW - timedelta(days=days_ago)):%Y%m%dT%H%M%SZ}-{suffix * 10}"


@pytest.fixture
def stack(monkeypatch: pytest.MonkeyPatch) -> Iterator[StackInfo]:
    with mock_aws():
        s3 = boto3.client("s3", region_name="us-east-1")
        s3.create_bucket(Bucket=BUCKET)
        info = StackInfo(kind="local", name="t", region="us-east-1", bucket=BUCKET, session=None)
        info._clients["s3"] = s3
        for module in (costs, commands):
            monkeypatch.setattr(module, "discover", lambda *a, **k: info)
        yield info


def put(stack: StackInfo, key: str, body: dict[str, Any]) -> None:
    stack.client("s3").put_object(Bucket=BUCKET, Key=key, Body=json.dumps(body).encode())


def add_job(
    stack: StackInfo,
    jid: str,
    state: str,
    backend: str | None,
    status_cost: dict[str, Any] | None = None,
    metadata_cost: dict[str, Any] | None = None,
) -> None:
    prefix = f"outputs/set/{jid[-1]}/{jid}/"
    status: dict[str, Any] = {
        "job_id": jid,
        "state": state,
        "phase": state,
        "backend": backend,
        "name": "set/x",
    }
    if status_cost is not None:
        status["cost"] = status_cost
    if state == "succeeded":
        status["metadata_key"] = prefix + "metadata.json"
        put(
            stack,
            prefix + "metadata.json",
            {"job_id": jid, **({"cost": metadata_cost} if metadata_cost else {})},
        )
    put(stack, prefix + "status.json", status)


MODAL = estimate(Prices(), [GpuRun(240.0, "H100")])
FAL_ONLY = estimate(Prices(), fal_videos=1)
FAILED = estimate(Prices())


@pytest.fixture
def jobs(stack: StackInfo) -> StackInfo:
    add_job(stack, job_id(2, "a"), "succeeded", "modal", status_cost=MODAL)
    add_job(stack, job_id(1, "b"), "succeeded", "fal", metadata_cost=FAL_ONLY)  # cost only in metadata.json
    add_job(stack, job_id(0.5, "c"), "failed", None, status_cost=FAILED)
    add_job(stack, job_id(0.1, "e"), "cancelled", "modal")  # no cost recorded
    add_job(stack, job_id(10, "d"), "succeeded", "modal", status_cost=MODAL)  # older than 7 days
    return stack


def test_cost_sums_by_backend_since(jobs: StackInfo, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["cost", "--since", "7d", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["jobs"] == 4 and report["jobs_with_cost"] == 3
    assert report["by_backend"] == {
        "modal": pytest.approx(240 * 0.001097),
        "fal": 1.0,
        "aws": pytest.approx(3 * AWS_PER_JOB),
    }
    assert report["total"] == pytest.approx(240 * 0.001097 + 1.0 + 3 * AWS_PER_JOB)
    assert report["estimate"] is True
    assert main(["cost", "--since", "30d", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["jobs"] == 5


def test_cost_table(jobs: StackInfo, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["cost"]) == 0  # default: 7 days
    out = capsys.readouterr().out.splitlines()
    assert "4 (3 with a recorded cost)" in out[0]
    assert [line.split()[0] for line in out[1:6]] == ["BACKEND", "modal", "fal", "aws", "total"]
    assert out[5].split()[1] == f"{240 * 0.001097 + 1.0 + 3 * AWS_PER_JOB:.4f}"
    assert "estimate" in out[6]


def test_list_shows_the_cost(jobs: StackInfo, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list", "--limit", "10"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["JOB", "STATE", "BACKEND", "COST", "NAME", "UPDATED"]
    by_job = {line.split()[0]: line.split() for line in lines[1:]}
    assert by_job[job_id(2, "a")][3] == f"~${MODAL['total']:.4f}"
    assert by_job[job_id(1, "b")][3] == "~$1.0006"  # read from metadata.json
    assert by_job[job_id(0.1, "e")][3] == "-"


def test_since_forms() -> None:
    now = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
    assert costs.parse_since("7d", now) == now - timedelta(days=7)
    assert costs.parse_since("24h", now) == now - timedelta(hours=24)
    assert costs.parse_since("30m", now) == now - timedelta(minutes=30)
    assert costs.parse_since("2w", now) == now - timedelta(weeks=2)
    assert costs.parse_since("2026-11-01", now) == datetime(2026, 11, 1, tzinfo=UTC)
    assert costs.parse_since("2026-11-01T08:00:00+02:00", now) == datetime(2026, 11, 1, 6, tzinfo=UTC)
    for bad in ("seven days", "7y", ""):
        with pytest.raises(CliError):
            costs.parse_since(bad, now)
    assert costs.job_time("20261125T182301Z-3f9c0a1b2d") == datetime(2026, 11, 25, 18, 23, 1, tzinfo=UTC)
    assert costs.job_time("not-a-job") is None
