"""vap_shared.metrics: the EMF lines it prints (what CloudWatch Logs turns into metrics)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from vap_shared import metrics

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _namespace(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POWERTOOLS_METRICS_NAMESPACE", "VAP/teststack")
    # A function's service name must not become a dimension (the three functions aggregate together).
    monkeypatch.setenv("POWERTOOLS_SERVICE_NAME", "vap-webhook")
    monkeypatch.delenv("POWERTOOLS_METRICS_DISABLED", raising=False)
    monkeypatch.delenv("POWERTOOLS_DEV", raising=False)


def emf_lines(out: str) -> list[dict[str, Any]]:
    lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    for doc in lines:
        assert_valid_emf(doc)
    return lines


def assert_valid_emf(doc: dict[str, Any]) -> None:
    """The EMF specification's rules for the root node and the metric directive."""
    (directive,) = doc["_aws"]["CloudWatchMetrics"]
    assert isinstance(doc["_aws"]["Timestamp"], int)
    assert directive["Namespace"] == "VAP/teststack"
    for dimension_set in directive["Dimensions"]:
        for key in dimension_set:
            assert isinstance(doc[key], str) and doc[key]  # every dimension is a member of the root
    for metric in directive["Metrics"]:
        assert metric["Name"] in doc  # so is every metric value
        assert metric["Unit"] in ("Count", "Seconds", "None")


def directive(doc: dict[str, Any]) -> dict[str, Any]:
    return dict(doc["_aws"]["CloudWatchMetrics"][0])


def test_failed_job_line(capsys: pytest.CaptureFixture[str]) -> None:
    metrics.job_failed("modal", "timeout", cost_usd=0.25)
    failed, cost = emf_lines(capsys.readouterr().out)
    d = directive(failed)
    assert d["Metrics"] == [{"Name": "JobsFailed", "Unit": "Count"}]
    # The total (what the alarm watches), per backend and per error kind (the dashboard's breakdowns).
    assert d["Dimensions"] == [[], ["backend"], ["error_kind"]]
    assert failed["backend"] == "modal" and failed["error_kind"] == "timeout"
    assert failed["JobsFailed"] == [1.0]
    assert "service" not in failed
    assert directive(cost)["Metrics"] == [{"Name": "JobCostUSD", "Unit": "None"}]
    assert cost["JobCostUSD"] == [0.25] and cost["backend"] == "modal"


def test_success_dispatch_and_reuse_lines(capsys: pytest.CaptureFixture[str]) -> None:
    metrics.job_received()
    metrics.job_dispatched("fal", queue_s=2.5)
    metrics.job_dispatched("fal")  # a fallback's second dispatch has no queue time
    metrics.job_succeeded("fal", generation_s=120.0, cost_usd=1.0006)
    metrics.fallback("modal")
    metrics.result_reused(cost_usd=0.0006)
    metrics.stuck_jobs(0)
    lines = emf_lines(capsys.readouterr().out)
    received, first, second, succeeded, fell_back, reused, reused_ok, stuck = lines
    assert directive(received)["Dimensions"] == [[]] and received["JobsReceived"] == [1.0]
    assert [m["Name"] for m in directive(first)["Metrics"]] == ["JobsDispatched", "QueueToDispatchSeconds"]
    assert directive(first)["Metrics"][1]["Unit"] == "Seconds" and first["QueueToDispatchSeconds"] == [2.5]
    assert "QueueToDispatchSeconds" not in second
    assert directive(succeeded)["Dimensions"] == [[], ["backend"]]
    assert succeeded["GenerationSeconds"] == [120.0] and succeeded["JobCostUSD"] == [1.0006]
    assert fell_back["Fallbacks"] == [1.0] and fell_back["backend"] == "modal"
    assert reused["ResultsReused"] == [1.0]
    assert reused_ok["backend"] == "reused" and "GenerationSeconds" not in reused_ok
    assert stuck["StuckJobs"] == [0.0]


def test_ingest_record_crash_line(capsys: pytest.CaptureFixture[str]) -> None:
    metrics.ingest_record_crashed("ClientError")
    (line,) = emf_lines(capsys.readouterr().out)
    assert directive(line) == {
        "Namespace": "VAP/teststack",
        "Dimensions": [[]],
        "Metrics": [{"Name": "IngestRecordCrashes", "Unit": "Count"}],
    }
    # The exception type is a plain property for Logs Insights, not a dimension.
    assert line["IngestRecordCrashes"] == [1.0] and line["error"] == "ClientError"


def test_every_line_matches_the_spec(capsys: pytest.CaptureFixture[str]) -> None:
    metrics.job_received()
    metrics.job_dispatched("modal", 1.0)
    metrics.job_succeeded("modal", 1.0, 0.1)
    metrics.job_failed(None, "input", 0.0006)
    metrics.fallback("modal")
    metrics.result_reused(0.0006)
    metrics.stuck_jobs(2)
    metrics.ingest_record_crashed("ClientError")
    seen: set[str] = set()
    for doc in emf_lines(capsys.readouterr().out):
        d = directive(doc)
        for metric in d["Metrics"]:
            spec = metrics.SPECS[metric["Name"]]
            assert metric["Unit"] == spec.unit
            assert [tuple(s) for s in d["Dimensions"]] == list(spec.dimension_sets)
            seen.add(metric["Name"])
    assert seen == set(metrics.METRIC_NAMES)  # each declared metric is emitted by some event


def test_unknown_values_and_bad_calls_never_raise(capsys: pytest.CaptureFixture[str]) -> None:
    metrics.job_failed("gpu-cluster-9", "oops")  # unknown backend / kind
    (doc,) = emf_lines(capsys.readouterr().out)
    assert doc["backend"] == "none" and doc["error_kind"] == "internal"
    metrics.emit({"JobsFailed": 1})  # missing dimensions: logged, nothing printed
    metrics.emit({"NoSuchMetric": 1})
    metrics.emit({"JobsReceived": 1, "JobsDispatched": 1}, {"backend": "modal"})  # mixed sets
    assert capsys.readouterr().out == ""


def test_gpu_error_codes_map_to_kinds() -> None:
    assert [metrics.error_kind_of_gpu_code(c) for c in ("input", "safety", "timeout", "internal", None)] == [
        "input",
        "safety",
        "timeout",
        "internal",
        "internal",
    ]


def test_disabled_metrics_print_nothing(capsys: pytest.CaptureFixture[str], monkeypatch: Any) -> None:
    monkeypatch.setenv("POWERTOOLS_METRICS_DISABLED", "true")
    metrics.job_received()
    assert capsys.readouterr().out == ""


def test_default_namespace_when_unset(capsys: pytest.CaptureFixture[str], monkeypatch: Any) -> None:
    monkeypatch.delenv("POWERTOOLS_METRICS_NAMESPACE")
    metrics.job_received()
    (line,) = capsys.readouterr().out.splitlines()
    assert directive(json.loads(line))["Namespace"] == metrics.DEFAULT_NAMESPACE


def test_import_is_light() -> None:
    """Importing the module loads no Powertools or boto3 module by itself (the first emit does)."""
    code = (
        "import sys; import vap_shared.metrics; "
        "print(sorted(m for m in sys.modules if m.startswith(('aws_lambda_powertools', 'boto'))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT / "shared"
    ).stdout
    assert out.strip() == "[]"
