"""SequenceParallelEngine on CPU (gloo, spawned ranks): the check module, cancellation, failures."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from gpu.service.engines.loaders import TinyPipeline, TransformerOf
from gpu.service.engines.sequence_parallel import SequenceParallelEngine
from gpu.service.engines.single import VideoEngine
from gpu.service.generation import GenerationSpec

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
SPEC = GenerationSpec(
    prompt="a cat dancing", ref_prompt="a man dancing", width=48, height=32, num_frames=9,
    requested_frames=9, fps=16, seed=5, guidance_scale=5.0, steps=2, safety=False,
)  # fmt: skip


def _clip(n: int = 9) -> list:
    from gpu.service import media

    return media.to_pil_frames(media.synth_frames(n, 48, 32))


def test_check_parallel_module_world_2_and_4():
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "gpu.tools.check_parallel", "--world-size", "2", "4"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rel_err = float(re.search(r"^rel_err=(\S+)", proc.stdout, re.M).group(1))
    assert 0.0 < rel_err <= 1e-5  # > 0: the split ran (attention sums in another order)
    assert "pipeline latents, 2 steps, CFG" in proc.stdout
    # world 2: even split; the elements sent are what gpu.tools.scaling's volume formula says
    # (block 0 exchanges one row: the engine's CFG rows reach the followers as views of one row)
    assert "([9, 9], [9, 9]), all-to-all elements sent by rank 0 3024;" in proc.stdout
    assert "([5, 5, 4, 4], [5, 5, 4, 4])" in proc.stdout  # world 4: uneven split
    assert proc.stdout.count("max |uint8 diff| = 0") == 2


def test_engine_survives_cancel_and_refuses_work_after_a_broken_forward():
    engine = SequenceParallelEngine(TinyPipeline(0), 2, device_type="cpu", threads_per_rank=1)
    try:
        assert engine.device_name == "2x cpu" and engine.healthy
        clip = _clip()

        def cancel(step: int, total: int) -> None:
            raise KeyboardInterrupt("cancelled") if step == 1 else None

        # Cancelled between steps (how the runner stops a job): the ranks stay in step.
        with pytest.raises(KeyboardInterrupt):
            engine.generate(SPEC, clip[0], clip, cancel)
        assert engine.healthy
        steps: list[tuple[int, int]] = []
        frames = engine.generate(SPEC, clip[0], clip, lambda s, t: steps.append((s, t)))
        assert steps == [(1, 2), (2, 2)]
        single = TinyPipeline(0)(torch.device("cpu"))
        np.testing.assert_array_equal(
            frames, VideoEngine(single, "cpu").generate(SPEC, clip[0], clip, lambda *_: None)
        )

        # Too few tokens to give each rank one: refused before any rank starts.
        tiny = GenerationSpec(
            **{**SPEC.__dict__, "width": 16, "height": 16, "num_frames": 1, "requested_frames": 1}
        )
        with pytest.raises(ValueError, match="cannot be split over 2 GPUs"):
            engine.generate(tiny, clip[0], clip[:1], lambda *_: None)
        assert engine.healthy

        # An exception inside a forward on rank 0 (e.g. a signal): the follower is left inside a
        # collective, so the engine must refuse further work rather than mismatch collectives.
        def boom(*_):
            raise RuntimeError("injected")

        engine.pipeline.transformer.blocks[1].register_forward_pre_hook(boom)
        with pytest.raises(RuntimeError, match="injected"):
            engine.generate(SPEC, clip[0], clip, lambda *_: None)
        assert not engine.healthy
        with pytest.raises(RuntimeError, match=r"unusable .*interrupted"):
            engine.generate(SPEC, clip[0], clip, lambda *_: None)
    finally:
        started = time.monotonic()
        engine.close()
        assert time.monotonic() - started < 20  # the stuck follower is killed, not waited for
    assert not any(p.is_alive() for p in engine._procs)


class _FailingLoader:
    def __call__(self, device):
        raise OSError("no weights on this volume")


def test_follower_that_cannot_load_fails_startup_with_its_error():
    with pytest.raises(RuntimeError, match=r"rank 1 failed to load:(.|\n)*no weights on this volume"):
        SequenceParallelEngine(
            TinyPipeline(0), 2, transformer_loader=_FailingLoader(), device_type="cpu", threads_per_rank=1
        )
    import torch.distributed as dist

    assert not dist.is_initialized()  # a later engine can start in this process


def test_followers_with_other_weights_fail_startup():
    with pytest.raises(RuntimeError, match="different transformer weights"):
        SequenceParallelEngine(
            TinyPipeline(0), 2, transformer_loader=TransformerOf(TinyPipeline(1)), device_type="cpu",
            threads_per_rank=1,
        )  # fmt: skip


class _SlowPipeline:
    """Rank 0 loads more than the followers (encoders, VAE): here, longer than the group timeout."""

    def __call__(self, device):
        time.sleep(4)
        return TinyPipeline(0)(device)


def test_rank_0_may_load_longer_than_the_collective_timeout_within_the_startup_time():
    engine = SequenceParallelEngine(
        _SlowPipeline(), 2, transformer_loader=TransformerOf(TinyPipeline(0)), device_type="cpu",
        threads_per_rank=1, timeout_s=2, startup_timeout_s=60,
    )  # fmt: skip
    try:
        assert engine.healthy
    finally:
        engine.close()
