"""gpu/tools/plan.py: every accepted job has a GPU it fits, measured from the model."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from vap_shared.contract import LANDSCAPE_SIZES, NUM_FRAMES_MAX, NUM_FRAMES_MIN

from gpu.service import routing
from gpu.service.generation import valid_num_frames
from gpu.tools import plan
from gpu.vap.geometry import RELEASED

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_plan_covers_every_accepted_size_and_all_fit():
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    # --check: the committed table choose_gpu reads is what the model gives today.
    run = subprocess.run(
        [sys.executable, "-m", "gpu.tools.plan", "--check"], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr[-2000:]
    rows = [line.split() for line in run.stdout.splitlines() if line.endswith((" yes", " NO"))]
    seen = {(r[0], r[1], r[2], int(r[3])) for r in rows if r[-1] == "yes"}
    frames = {valid_num_frames(n) for n in range(NUM_FRAMES_MIN, NUM_FRAMES_MAX + 1)}
    expected = set()
    for resolution, (w, h) in LANDSCAPE_SIZES.items():
        for aspect, size in (("16:9", f"{w}x{h}"), ("9:16", f"{h}x{w}")):
            expected |= {(resolution, size, aspect, n) for n in frames}
    assert seen == expected and len(rows) == len(expected) == 6 * 29


@pytest.mark.slow
def test_sequence_parallel_jobs_count_the_all_to_all_buffers():
    from gpu.vap import footprint

    tokens = RELEASED.tokens_per_stream(121, 720, 1280)
    assert footprint.sequence_exchange(tokens, 1) == 0
    # Q, K, V each sent (a contiguous copy) and received: six tensors of the local joint Q, for
    # 2 CFG rows of main + reference tokens, 40 heads x 128, bf16.
    local = 2 * math.ceil(tokens / 2)
    assert footprint.sequence_exchange(tokens, 2) == 6 * 2 * local * 5120 * 2
    (row,) = [
        j
        for j in routing.read_table()["jobs"]
        if (j["width"], j["height"], j["num_frames"], j["gpus"]) == (1280, 720, 121, 2)
    ]
    expected = footprint.denoise_model().peak(math.ceil(tokens / 2)) + footprint.sequence_exchange(tokens, 2)
    assert row["phases"]["denoise"] == expected


def test_every_planned_job_fits_its_gpu_and_the_encoder_policy_is_consistent():
    table = routing.read_table()
    for job in table["jobs"]:
        gpu = routing.gpu_type(job["gpu"])
        assert job["peak_bytes"] <= gpu.capacity_gib * routing.GIB
        offload = table["offload_encoders"][f"{job['gpu']}:{job['gpus']}"]
        assert job["peak_bytes"] == plan.peak_bytes(table["weights"], job["phases"], offload)
    # 720p x 121 frames needs the encoders' 14 GB on an H100: that class keeps them on the host.
    assert routing.choose_gpu(1280, 720, 121).offload_encoders


def test_routing_prefers_the_cheapest_gpu_that_fits(monkeypatch):
    weights = routing.read_table()["weights"]
    small = {"encode": 2**30, "vae_encode": 2**30, "denoise": 8 * 2**30, "vae_decode": 2**30}
    big = {**small, "denoise": 60 * 2**30}
    huge = {**small, "denoise": 200 * 2**30}
    assert plan.peak_bytes(weights, small, False) < routing.OFFERED[0].capacity_gib * routing.GIB
    assert plan.peak_bytes(weights, big, True) > routing.OFFERED[0].capacity_gib * routing.GIB
    phases = {(832, 480, 49): small, (1280, 720, 49): big, (1280, 720, 121): huge}
    monkeypatch.setattr(
        plan, "accepted_sizes", lambda: iter([("x", "16:9", 832, 480), ("y", "16:9", 1280, 720)])
    )
    monkeypatch.setattr(plan, "gpu_frame_counts", lambda: [49, 121])
    monkeypatch.setattr(plan, "GPU_COUNTS", (1,))
    monkeypatch.setattr(plan, "_weights", lambda: weights)
    monkeypatch.setattr(plan, "_phases", lambda w, h, f, g: phases.get((w, h, f), small))
    table = plan.build_table()
    routes = {(j["width"], j["num_frames"]): j["gpu"] for j in table["jobs"]}
    assert routes == {(832, 49): "H100", (832, 121): "H100", (1280, 49): "H200", (1280, 121): None}
    monkeypatch.setattr(routing, "_TABLE", table)
    monkeypatch.setattr(routing, "_INDEX", None)
    assert routing.choose_gpu(1280, 720, 49).modal_gpu == "H200"
    with pytest.raises(routing.DoesNotFit):
        routing.choose_gpu(1280, 720, 121)
    monkeypatch.setattr(routing, "_INDEX", None)
