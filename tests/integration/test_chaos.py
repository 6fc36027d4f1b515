"""A small chaos run (`python -m bench.chaos`) with a fixed seed: every fault the cloud has, at
random, and nothing is lost or notified twice. It runs in its own process: it starts a stack of its
own (a fake GPU engine, the 9000 s job budget shrunk to 36 s), and moto's state is process-wide."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.stack

ROOT = Path(__file__).resolve().parents[2]


def test_a_small_chaos_run_loses_nothing_and_notifies_each_job_once(tmp_path: Path) -> None:
    out = tmp_path / "chaos.json"
    # Rates above the defaults so that 24 jobs see every kind of fault.
    rates = ["kill_rate=0.1", "gpu_preempt_rate=0.4", "impostor_rate=0.5", "slow_ack_rate=0.3"]
    command = [sys.executable, "-m", "bench.chaos", "--jobs", "24", "--seed", "3", "--time-scale", "0.004"]
    command += ["--json", str(out)]
    for rate in rates:
        command += ["--rate", rate]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert out.exists(), done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["lost"] == [] and result["notified_twice"] == [], result
    assert done.returncode == 0, done.stdout[-3000:]
    # Every job ended (the invalid ones failed, with their reason), and the faults really happened.
    assert sum(result["states"].values()) == 24
    assert set(result["states"]) <= {"succeeded", "failed"}
    injected = result["injected"]
    for kind in ("environments killed", "duplicate deliveries", "GPU preemptions", "slow webhook answers"):
        assert injected[kind] > 0, injected
