"""The model behind one call: `VideoEngine` wraps the VAP pipeline, `FakeEngine` stands in for tests.

The runner only sees the `Engine` protocol: PIL inputs already fitted to the spec's size in,
uint8 frames out, with a per-step hook for progress and cancellation.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np
from PIL import Image

from gpu.service.generation import GenerationSpec

# on_step(step, total): called after denoising step `step` (1-based). Raising aborts generation.
StepCallback = Callable[[int, int], None]


class Engine(Protocol):
    device_name: str  # reported as GpuResult.gpu

    def generate(
        self, spec: GenerationSpec, image: Image.Image, ref_frames: list[Image.Image], on_step: StepCallback
    ) -> np.ndarray:
        """Generate `spec.num_frames` frames, uint8 `[F, H, W, 3]` at `spec.height`×`spec.width`."""
        ...


def to_uint8(frames: np.ndarray) -> np.ndarray:
    """Pipeline output (float in [0, 1], `[1, F, H, W, 3]` or `[F, H, W, 3]`) → uint8 `[F, H, W, 3]`."""
    array = np.asarray(frames)
    if array.ndim == 5:
        array = array[0]
    if array.dtype == np.uint8:
        return array
    return (np.clip(array.astype(np.float32), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def device_name(device: Any) -> str:
    import torch

    dev = torch.device(device)
    if dev.type == "cuda" and torch.cuda.is_available():
        return str(torch.cuda.get_device_name(dev))
    return dev.type


class VideoEngine:
    """One loaded `gpu.vap.pipeline.VAPPipeline` on one device; calls are serialised by a lock."""

    def __init__(self, pipeline: Any, device: Any = "cpu", negative_prompt: str | None = None) -> None:
        self.pipeline = pipeline
        self.device = device
        self.device_name = device_name(device)
        self.negative_prompt = negative_prompt
        self._lock = threading.Lock()  # one generation at a time: it needs the whole GPU

    def generate(
        self, spec: GenerationSpec, image: Image.Image, ref_frames: list[Image.Image], on_step: StepCallback
    ) -> np.ndarray:
        import torch

        if image.size != (spec.width, spec.height) or any(f.size != image.size for f in ref_frames):
            raise ValueError("image and reference frames must already be fitted to the spec's size")
        if len(ref_frames) != spec.num_frames:
            raise ValueError(f"need {spec.num_frames} reference frames, got {len(ref_frames)}")

        def step_end(
            _pipe: Any, index: int, _timestep: Any, callback_kwargs: dict[str, Any]
        ) -> dict[str, Any]:
            on_step(index + 1, spec.steps)
            return callback_kwargs

        # A CPU generator draws the same noise for a seed on any device, so seeds reproduce.
        generator = torch.Generator(device="cpu").manual_seed(spec.seed)
        with self._lock, torch.inference_mode():
            output = self.pipeline(
                image=image,
                ref_video=ref_frames,
                prompt=spec.prompt,
                prompt_mot_ref=spec.ref_prompt,
                negative_prompt=self.negative_prompt,
                height=spec.height,
                width=spec.width,
                num_frames=spec.num_frames,
                num_inference_steps=spec.steps,
                guidance_scale=spec.guidance_scale,
                generator=generator,
                output_type="np",
                callback_on_step_end=step_end,
            )
        frames = to_uint8(output.frames)
        expected = (spec.num_frames, spec.height, spec.width, 3)
        if frames.shape != expected:
            raise RuntimeError(f"pipeline returned {frames.shape}, expected {expected}")
        return frames


class FakeEngine:
    """Deterministic stand-in: blends the image with the reference motion; no model involved."""

    device_name = "fake"

    def __init__(self, step_delay_s: float = 0.0) -> None:
        self.step_delay_s = step_delay_s
        self.calls: list[GenerationSpec] = []

    def generate(
        self, spec: GenerationSpec, image: Image.Image, ref_frames: list[Image.Image], on_step: StepCallback
    ) -> np.ndarray:
        self.calls.append(spec)
        for step in range(1, spec.steps + 1):
            if self.step_delay_s:
                time.sleep(self.step_delay_s)
            on_step(step, spec.steps)
        base = np.asarray(image, dtype=np.float32)
        motion = np.stack([np.asarray(f, dtype=np.float32) for f in ref_frames])
        noise = np.random.default_rng(spec.seed).uniform(0, 16, size=base.shape).astype(np.float32)
        return np.clip(0.6 * base + 0.4 * motion + noise, 0, 255).astype(np.uint8)


def _scaled_size(width: int, height: int, max_side: int) -> tuple[int, int]:
    scale = min(1.0, max_side / max(width, height))
    return max(16, round(width * scale / 16) * 16), max(16, round(height * scale / 16) * 16)


class DownscaledEngine:
    """Runs `inner` at a smaller size and resizes the frames back up (local tiny model only).

    The tiny random model's output is noise at any size, and at 480p it takes minutes on a
    CPU; this keeps the local demo's whole code path (and the MP4's size) while costing seconds.
    """

    def __init__(self, inner: Engine, max_side: int) -> None:
        self.inner = inner
        self.max_side = max_side
        self.device_name = inner.device_name

    def generate(
        self, spec: GenerationSpec, image: Image.Image, ref_frames: list[Image.Image], on_step: StepCallback
    ) -> np.ndarray:
        width, height = _scaled_size(spec.width, spec.height, self.max_side)
        if (width, height) == (spec.width, spec.height):
            return self.inner.generate(spec, image, ref_frames, on_step)
        small = dataclasses.replace(spec, width=width, height=height)
        resample = Image.Resampling.BILINEAR
        frames = self.inner.generate(
            small,
            image.resize((width, height), resample),
            [f.resize((width, height), resample) for f in ref_frames],
            on_step,
        )
        return np.stack(
            [np.asarray(Image.fromarray(f).resize((spec.width, spec.height), resample)) for f in frames]
        )
