"""gpu/service/routing.py: the GPU class of a job, from the memory plan's table (no torch)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from gpu.service import routing

ROOT = Path(__file__).resolve().parents[2]


def test_default_job_runs_on_one_h100():
    choice = routing.choose_gpu(480, 832, 49)
    assert (choice.gpu_type, choice.count, choice.modal_gpu) == ("H100", 1, "H100!")
    assert 40 < choice.peak_gib < choice.capacity_gib < 80
    assert choice.price_per_s == pytest.approx(0.001097)


def test_requested_frames_map_to_the_gpu_frame_count_and_gpus_multiply():
    assert routing.choose_gpu(1280, 720, 120) == routing.choose_gpu(1280, 720, 121)
    eight = routing.choose_gpu(1280, 720, 121, gpus=8)
    assert eight.modal_gpu == "H100!:8" and eight.count == 8
    assert eight.price_per_s == pytest.approx(8 * 0.001097)
    denoise = {
        j["gpus"]: j["phases"]["denoise"]
        for j in routing.read_table()["jobs"]
        if j["width"] == 1280 and j["num_frames"] == 121
    }
    assert denoise[8] < denoise[4] < denoise[2] < denoise[1]  # each GPU holds 1/N of the tokens
    # (the contexts and their K/V stay whole on every GPU, and each holds its all-to-all buffers)
    assert denoise[8] < denoise[1] / 3


def test_sizes_and_counts_the_service_does_not_offer_are_errors():
    with pytest.raises(ValueError, match="not an accepted size"):
        routing.choose_gpu(1920, 1080, 49)
    with pytest.raises(ValueError, match="gpus"):
        routing.choose_gpu(832, 480, 49, gpus=3)


def test_choosing_needs_no_torch():
    # The API container has no torch: the table, the time estimate and its FLOP formula run there.
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from gpu.service.routing import choose_gpu, gpus_within\n"
        "print(choose_gpu(832, 480, 49).modal_gpu, gpus_within(1280, 720, 121, 50, 1, 2000.0))"
    )
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "H100! [2, 4, 8]"
