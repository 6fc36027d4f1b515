"""The production wiring on CPU: rank 0 loads a saved checkpoint with `load_pipeline`, followers
with `ReleasedTransformer` (transformer only); both are pickled to spawned ranks."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from functools import partial

import numpy as np
import pytest
import torch

from gpu.service.engines.loaders import ReleasedTransformer
from gpu.service.engines.sequence_parallel import SequenceParallelEngine
from gpu.service.engines.single import VideoEngine
from gpu.service.generation import GenerationSpec
from gpu.vap.loading import load_pipeline
from gpu.vap.tiny import build_tiny_pipeline

pytestmark = pytest.mark.slow


def test_saved_checkpoint_through_the_production_loaders(tmp_path):
    build_tiny_pipeline(seed=7).save_pretrained(tmp_path)
    follower = ReleasedTransformer(str(tmp_path), "main", torch.float32)
    alone = follower(torch.device("cpu"))
    assert alone.sequence_split is None and type(alone).__name__ == "WanTransformer3DMOTModel"

    from gpu.service import media

    clip = media.to_pil_frames(media.synth_frames(9, 48, 32))
    spec = GenerationSpec(
        prompt="a dog runs", ref_prompt="a cat walks", width=48, height=32, num_frames=9,
        requested_frames=9, fps=16, seed=1, guidance_scale=5.0, steps=2, safety=False,
    )  # fmt: skip
    loader = partial(load_pipeline, str(tmp_path), dtype=torch.float32)
    engine = SequenceParallelEngine(
        loader, 2, transformer_loader=follower, device_type="cpu", threads_per_rank=1
    )
    try:
        frames = engine.generate(spec, clip[0], clip, lambda *_: None)
    finally:
        engine.close()
    single = VideoEngine(loader(torch.device("cpu")), "cpu").generate(spec, clip[0], clip, lambda *_: None)
    np.testing.assert_array_equal(frames, single)
