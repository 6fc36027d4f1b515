"""gpu/bench.py: the CPU `--tiny` run goes through the same code path as the H100 benchmark."""

from __future__ import annotations

import pytest

from gpu.bench import FULL_CONFIG, NOMINAL_STEP_FLOPS, Shape, main, step_flops

pytestmark = pytest.mark.slow


def test_bench_tiny_runs(capsys):
    assert main(["--tiny", "--iters", "1", "--warmup", "0", "--vae"]) == 0
    out = capsys.readouterr().out
    assert "backend" in out and "native" in out and "error" not in out
    assert "bfloat16" in out and "dB" in out


def test_flop_count_matches_nominal_480p():
    # The nominal 2.44e15 counts the full last expert block; we skip its dead reference work.
    flops = step_flops(FULL_CONFIG, Shape(49, 480, 832))
    assert 0.95 * NOMINAL_STEP_FLOPS < flops < NOMINAL_STEP_FLOPS
