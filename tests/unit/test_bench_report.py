"""`python -m bench` end to end in a tiny configuration: the local stack with the fake GPU engine,
a few jobs, a few MiB, the cost model, the table and the markdown (no timings asserted)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench import cost
from bench.cost import GENERATION_S
from bench.per_job import PerJobResult, Recorder, summarize
from bench.report import Results, markdown, rows, table

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.stack
def test_bench_cli_runs_jobs_output_and_cost(tmp_path):
    out, raw = tmp_path / "benchmarks.md", tmp_path / "bench.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "shared")])}
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--only", "jobs,output,cost", "--jobs", "3", "--concurrency", "2",
         "--size-mb", "2", "--output", str(out), "--json", str(raw)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "sidecar upload -> GPU dispatch received" in done.stdout
    data = json.loads(raw.read_text())
    assert data["jobs"]["jobs"] == 3 and data["jobs"]["succeeded"] == 3
    assert data["jobs"]["api_calls_per_job"]["sns:Publish"] == 1
    assert data["cost"]["aws_usd"] > 0
    text = out.read_text()
    assert "## Targets missed" in text and "| metric |" in text and "Machine:" in text


def _job_result() -> PerJobResult:
    from bench.per_job import Invocation

    rec = Recorder()
    rec.uploaded = {"k": 1.0}
    rec.dispatched = {"j": 1.2}
    rec.callback = {"j": 2.0}
    rec.published = {"k": ("j", 2.1, "succeeded")}
    rec.invocations = [
        Invocation("ingest", "batch", 0.2),
        Invocation("webhook", "progress", 0.05),
        Invocation("webhook", "succeeded", 0.1),
    ]
    rec.api_calls.update({"sns:Publish": 1, "s3:PutObject": 2, "dynamodb:UpdateItem": 3})
    return summarize(rec, ["k"], {"ingest": 1024, "webhook": 1024}, 1, 1.0)


def test_summary_gb_seconds_and_percentiles():
    j = _job_result()
    assert j.dispatch_p50_ms == pytest.approx(200)
    assert j.notify_p99_ms == pytest.approx(100)
    assert j.gb_s_per_job_measured == pytest.approx(0.35)
    assert j.gb_s_per_job_production == pytest.approx(0.35 + 8 * 0.05)
    # A function waiting on the GPU for the estimated generation, at 1 GB.
    assert j.gb_s_waiting_design == pytest.approx(next(iter(GENERATION_S.values())))


def test_report_lists_missed_targets():
    j = _job_result()
    results = Results(jobs=j, cost=cost.compute(j.api_calls_per_job, 11, j.gb_s_per_job_production))
    results.jobs.gb_s_per_job_production = 2.0  # over the 1 GB-s target
    text = markdown(results, {"Lambda GB-s": "because"})
    assert "**MISSED**" in text and "because" in text
    from bench.__main__ import missed_notes

    assert "GB-s" in markdown(results, missed_notes(results)).split("## Targets missed")[1]
    assert "Lambda GB-s per job" in table(rows(results))


def test_report_names_the_interpreter_not_its_path():
    from bench.cold_start import ColdStartResult, ModeResult

    def mode(name: str) -> ModeResult:
        return ModeResult(name, 1, 100.0, 80.0, 20.0, 90.0, 110.0, 150.0, 50.0, 300)

    modes = {m: mode(m) for m in ("floor", "floor_clients", "ingest", "webhook")}
    cold = ColdStartResult(
        python=sys.executable, modes=modes, layer_mb=None, layer_pyc_mb=None, boto3_mb=None,
        layer_top_mb={}, function_kb={"ingest": 5.0}, build_s=0.0,
    )  # fmt: skip
    text = markdown(Results(cold=cold), {})
    assert str(Path(sys.executable).parent) not in text
    version = ".".join(str(v) for v in sys.version_info[:3])
    assert f"cold starts on `{Path(sys.executable).name} {version}`" in text
