"""The single-GPU engine after a sticky CUDA error: it notices (the device no longer responds),
refuses every later job, and says so (`healthy`), so the Modal class retires the container."""

from __future__ import annotations

from typing import Any

import pytest
from vap_shared.gpu_contract import GenerationSettings

from gpu.service.engines.single import VideoEngine
from gpu.service.generation import build_spec
from gpu.service.media import fit_image, load_image


class FailingPipeline:
    def __init__(self, error: Exception) -> None:
        self.error = error
        self.calls = 0

    def __call__(self, **kwargs: Any) -> Any:
        self.calls += 1
        raise self.error


def _inputs() -> tuple[Any, Any, list[Any]]:
    spec = build_spec(GenerationSettings(prompt="p", video_description="d", num_frames=9), 2, 2)
    image = fit_image(load_image(_png()), spec.width, spec.height)
    return spec, image, [image] * spec.num_frames


def _png() -> bytes:
    from gpu.service import media

    return media.synth_image_png(64, 48)


def test_a_sticky_device_error_makes_the_engine_refuse_every_later_job():
    pipeline = FailingPipeline(RuntimeError("CUDA error: an illegal memory access was encountered"))
    engine = VideoEngine(pipeline, "cpu", responds=lambda device: False)
    spec, image, frames = _inputs()
    assert engine.healthy
    with pytest.raises(RuntimeError, match="illegal memory access"):
        engine.generate(spec, image, frames, lambda step, total: None)
    assert not engine.healthy
    with pytest.raises(RuntimeError, match="unusable after an earlier failure"):
        engine.generate(spec, image, frames, lambda step, total: None)
    assert pipeline.calls == 1  # the broken device is never asked again


def test_a_failure_that_leaves_the_device_working_keeps_the_engine():
    pipeline = FailingPipeline(RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB"))
    engine = VideoEngine(pipeline, "cpu", responds=lambda device: True)
    spec, image, frames = _inputs()
    with pytest.raises(RuntimeError, match="out of memory"):
        engine.generate(spec, image, frames, lambda step, total: None)
    assert engine.healthy


def test_a_cpu_device_always_responds():
    from gpu.service.engines.single import device_responds

    assert device_responds("cpu")
