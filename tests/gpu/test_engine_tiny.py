"""The real tiny VAP pipeline behind `VideoEngine`, through encoding (CPU, seconds)."""

import numpy as np
import pytest

from gpu.service import media
from gpu.service.engines.single import DownscaledEngine, VideoEngine
from gpu.service.generation import GenerationSpec


@pytest.mark.slow
def test_tiny_pipeline_engine_produces_requested_mp4():
    from gpu.vap.tiny import build_tiny_pipeline

    engine = VideoEngine(build_tiny_pipeline(), device="cpu")
    assert engine.device_name == "cpu"
    spec = GenerationSpec(
        prompt="a cat dancing", ref_prompt="a man dancing", width=48, height=32, num_frames=9,
        requested_frames=9, fps=12, seed=3, guidance_scale=5.0, steps=2, safety=False,
    )  # fmt: skip
    clip = media.to_pil_frames(media.synth_frames(9, 48, 32))
    steps = []
    frames = engine.generate(spec, clip[0], clip, lambda step, total: steps.append((step, total)))
    assert frames.shape == (9, 32, 48, 3) and frames.dtype == np.uint8
    assert steps == [(1, 2), (2, 2)]
    again = engine.generate(spec, clip[0], clip, lambda *_: None)
    np.testing.assert_array_equal(frames, again)  # the seed fixes the noise

    info = media.probe_mp4(media.encode_mp4(frames, spec.fps))
    assert (info.codec, info.pix_fmt, info.width, info.height, info.num_frames, info.fps) == (
        "h264", "yuv420p", 48, 32, 9, 12.0,
    )  # fmt: skip
    assert info.faststart

    # The local server's speed-up: generate small, hand back the requested size.
    big = GenerationSpec(**{**spec.__dict__, "width": 96, "height": 64})
    upscaled = DownscaledEngine(engine, max_side=48).generate(
        big, clip[0].resize((96, 64)), [f.resize((96, 64)) for f in clip], lambda *_: None
    )
    assert upscaled.shape == (9, 64, 96, 3)
