"""The job metrics as CloudWatch would read them: the EMF lines the handlers print on the local
stack (collected per stack like the functions' log groups: `LocalStack.metric_log`), for a
succeeded, a failed and a reused job (names, dimensions, values)."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from stack_helpers import sidecar
from vap_shared.metrics import SPECS

from local_stack import LocalStack

pytestmark = pytest.mark.stack


def _lines(stack: LocalStack, job_id: str) -> dict[str, list[tuple[list[list[str]], dict[str, str], float]]]:
    """Metric name -> (dimension sets, dimension values, value) from the EMF lines of one job."""
    found: dict[str, list[tuple[list[list[str]], dict[str, str], float]]] = {}
    for doc in stack.metric_log.documents():
        if doc.get("job_id") != job_id:
            continue
        (directive,) = doc["_aws"]["CloudWatchMetrics"]
        assert directive["Namespace"] == "VAP/vap-local"  # `VAP/<stack name>`, from the template
        sets = directive["Dimensions"]
        values = {key: doc[key] for key in {k for s in sets for k in s}}
        for metric in directive["Metrics"]:
            spec = SPECS[metric["Name"]]
            assert metric["Unit"] == spec.unit and tuple(map(tuple, sets)) == spec.dimension_sets
            (value,) = doc[metric["Name"]]
            found.setdefault(metric["Name"], []).append((sets, values, float(value)))
    return found


def _one(found: dict[str, Any], name: str) -> tuple[dict[str, str], float]:
    (entry,) = found[name]
    return entry[1], entry[2]


def test_emf_lines_of_a_succeeded_a_failed_and_a_reused_job(
    stack: LocalStack, sample_media: dict[str, bytes]
) -> None:
    folder = f"inbox/t-{uuid.uuid4().hex[:10]}"
    media = {f"{folder}/{leaf}": data for leaf, data in sample_media.items()}
    fields = {"backend": "fal", "seed": 515151, "reuse": None}
    stack.put_job(f"{folder}/ran.json", sidecar(**fields), media)
    (ran,) = stack.wait_for_notification(f"{folder}/ran.json", timeout_s=240)
    stack.put_job(f"{folder}/bad.json", sidecar(**fields, num_frames=500))
    stack.put_job(f"{folder}/again.json", sidecar(**fields))
    (bad,) = stack.wait_for_notification(f"{folder}/bad.json", timeout_s=120)
    (again,) = stack.wait_for_notification(f"{folder}/again.json", timeout_s=120)
    assert again.body["reused_from"] == ran.body["job_id"]

    succeeded = _lines(stack, ran.body["job_id"])
    assert sorted(succeeded) == sorted(
        [
            "JobsReceived",
            "JobsDispatched",
            "QueueToDispatchSeconds",
            "JobsSucceeded",
            "GenerationSeconds",
            "JobCostUSD",
        ]
    )
    assert _one(succeeded, "JobsReceived") == ({}, 1.0)
    assert _one(succeeded, "JobsDispatched") == ({"backend": "fal"}, 1.0)
    assert _one(succeeded, "JobsSucceeded") == ({"backend": "fal"}, 1.0)
    assert _one(succeeded, "JobCostUSD") == ({"backend": "fal"}, ran.body["cost"]["total"])
    assert _one(succeeded, "GenerationSeconds")[1] == pytest.approx(
        ran.body["timings"]["generation_s"], abs=0.5
    )
    assert 0 <= _one(succeeded, "QueueToDispatchSeconds")[1] <= ran.body["timings"]["total_s"]

    failed = _lines(stack, bad.body["job_id"])
    assert sorted(failed) == ["JobCostUSD", "JobsFailed", "JobsReceived"]
    assert _one(failed, "JobsFailed") == ({"backend": "none", "error_kind": "input"}, 1.0)
    assert _one(failed, "JobCostUSD") == ({"backend": "none"}, bad.body["cost"]["total"])

    reused = _lines(stack, again.body["job_id"])
    assert sorted(reused) == ["JobCostUSD", "JobsReceived", "JobsSucceeded", "ResultsReused"]
    assert _one(reused, "ResultsReused") == ({}, 1.0)
    assert _one(reused, "JobsSucceeded") == ({"backend": "reused"}, 1.0)
    assert _one(reused, "JobCostUSD") == ({"backend": "reused"}, again.body["cost"]["total"])


def test_every_sweep_reports_its_stuck_jobs(stack: LocalStack) -> None:
    before = len([d for d in stack.metric_log.documents() if "StuckJobs" in d])
    report = stack.run_sweeper()
    lines = [d for d in stack.metric_log.documents() if "StuckJobs" in d]
    assert len(lines) == before + 1
    doc = lines[-1]
    assert doc["StuckJobs"] == [float(report["stuck"])]
    assert doc["_aws"]["CloudWatchMetrics"][0]["Dimensions"] == [[]]
