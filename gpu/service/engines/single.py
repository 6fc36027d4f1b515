"""The model behind one call: `VideoEngine` wraps the VAP pipeline, `FakeEngine` stands in for tests.

The runner only sees the `Engine` protocol: PIL inputs already fitted to the spec's size in,
uint8 frames out, with a per-step hook for progress and cancellation, and optionally `Checkpoints`:
where the denoising state is saved every so often and the state an earlier attempt saved, so that
a run Modal preempts and runs again continues where it was (`gpu.vap.resume`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from PIL import Image

from gpu.service.generation import GenerationSpec

log = logging.getLogger(__name__)

# on_step(step, total): called after denoising step `step` (1-based). Raising aborts generation.
StepCallback = Callable[[int, int], None]
# How often a generation saves its state unless told otherwise: gpu.vap.resume.DEFAULT_EVERY_S
# (restated: this module imports no torch; a test keeps the two equal).
DEFAULT_CHECKPOINT_EVERY_S = 30.0


@dataclass
class Checkpoints:
    """Where a generation saves its denoising state, and the state an earlier attempt of the same
    job saved (None: start from the first step). `key` names the job (the same for every attempt);
    `save` gets each new state on a background thread (the latest replaces the ones before). The
    engine fills in `resumed_at` (steps the saved state had done) and `refused` (why it was not
    used: another job, other settings, damaged)."""

    key: str
    save: Callable[[bytes], None]
    saved: bytes | None = None
    every_s: float = DEFAULT_CHECKPOINT_EVERY_S
    resumed_at: int = 0
    refused: str | None = None


class Engine(Protocol):
    device_name: str  # reported as GpuResult.gpu

    def generate(
        self,
        spec: GenerationSpec,
        image: Image.Image,
        ref_frames: list[Image.Image],
        on_step: StepCallback,
        checkpoints: Checkpoints | None = None,
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


def device_responds(device: Any) -> bool:
    """Whether `device` still runs work: after a sticky CUDA error (an illegal address, a
    device-side assert, a launch failure) every later call on the context fails, so a one-element
    kernel and a synchronise tell a broken context from a failure of one job (out of memory)."""
    import torch

    dev = torch.device(device)
    if dev.type != "cuda":
        return True
    try:
        torch.ones(1, device=dev).add_(1)
        torch.cuda.synchronize(dev)
    except Exception:  # the context is unusable, whatever the error type
        return False
    return True


class VideoEngine:
    """One loaded `gpu.vap.pipeline.VAPPipeline` on one device; calls are serialised by a lock.

    After a generation fails, the device is checked (`responds`): a CUDA context broken by a sticky
    error makes the engine unhealthy, it refuses every later job, and the Modal class retires the
    container (`healthy`, as the multi-GPU engine)."""

    def __init__(
        self,
        pipeline: Any,
        device: Any = "cpu",
        negative_prompt: str | None = None,
        *,
        weights: str = "",
        responds: Callable[[Any], bool] = device_responds,
    ) -> None:
        self.pipeline = pipeline
        self.device = device
        self.device_name = device_name(device)
        self.negative_prompt = negative_prompt
        self.weights = weights  # the weights' revision: a saved state of other weights is refused
        self.gpu_count = 1
        self._responds = responds
        self._broken: str | None = None
        self._lock = threading.Lock()  # one generation at a time: it needs the whole GPU

    @property
    def healthy(self) -> bool:
        """False once the device stopped responding after a failed job: replace the process."""
        return self._broken is None

    def generate(
        self,
        spec: GenerationSpec,
        image: Image.Image,
        ref_frames: list[Image.Image],
        on_step: StepCallback,
        checkpoints: Checkpoints | None = None,
    ) -> np.ndarray:
        if self._broken is not None:
            raise RuntimeError(f"the GPU is unusable after an earlier failure ({self._broken})")
        try:
            return self._generate(spec, image, ref_frames, on_step, checkpoints)
        except Exception as exc:
            if not self._responds(self.device):
                self._broken = f"{type(exc).__name__}: {str(exc)[:200]}"
                log.error("the device no longer responds after %s; the engine refuses further jobs", exc)
            raise

    def _generate(
        self,
        spec: GenerationSpec,
        image: Image.Image,
        ref_frames: list[Image.Image],
        on_step: StepCallback,
        checkpoints: Checkpoints | None,
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

        resume = None
        if checkpoints is not None:
            from gpu.vap.resume import Resumable

            resume = Resumable(
                key=f"{checkpoints.key}@{self.weights}",
                save=checkpoints.save,
                saved=checkpoints.saved,
                every_s=checkpoints.every_s,
            )
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
                resume=resume,
            )
        if checkpoints is not None and resume is not None:
            checkpoints.resumed_at, checkpoints.refused = resume.resumed_at, resume.refused
        frames = to_uint8(output.frames)
        expected = (spec.num_frames, spec.height, spec.width, 3)
        if frames.shape != expected:
            raise RuntimeError(f"pipeline returned {frames.shape}, expected {expected}")
        return frames


class FakeEngine:
    """Deterministic stand-in: blends the image with the reference motion; no model involved.

    With `Checkpoints` it saves its "state" (the job key and the steps done) after every step at
    least `every_s` apart and resumes from a saved one of the same job, as the real engine does."""

    device_name = "fake"
    gpu_count = 1
    STATE_MAGIC = b"fake-denoise-state\n"

    def __init__(self, step_delay_s: float = 0.0) -> None:
        self.step_delay_s = step_delay_s
        self.calls: list[GenerationSpec] = []

    def _resumed_at(self, spec: GenerationSpec, checkpoints: Checkpoints) -> int:
        saved = checkpoints.saved
        if not saved:
            return 0
        try:
            if not saved.startswith(self.STATE_MAGIC):
                raise ValueError("not a saved state")
            state = json.loads(saved[len(self.STATE_MAGIC) :])
            if (state["key"], state["seed"], state["total"]) != (checkpoints.key, spec.seed, spec.steps):
                raise ValueError("saved by another job or with other settings")
            done = int(state["done"])
        except (ValueError, KeyError, TypeError) as exc:
            checkpoints.refused = str(exc)
            return 0
        checkpoints.resumed_at = done
        return done

    def generate(
        self,
        spec: GenerationSpec,
        image: Image.Image,
        ref_frames: list[Image.Image],
        on_step: StepCallback,
        checkpoints: Checkpoints | None = None,
    ) -> np.ndarray:
        self.calls.append(spec)
        start = 0 if checkpoints is None else self._resumed_at(spec, checkpoints)
        last_save = time.monotonic()
        for step in range(start + 1, spec.steps + 1):
            if self.step_delay_s:
                time.sleep(self.step_delay_s)
            on_step(step, spec.steps)
            if checkpoints is not None and time.monotonic() - last_save >= checkpoints.every_s:
                state = {"key": checkpoints.key, "seed": spec.seed, "total": spec.steps, "done": step}
                checkpoints.save(self.STATE_MAGIC + json.dumps(state).encode())
                last_save = time.monotonic()
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

    @property
    def healthy(self) -> bool:
        return bool(getattr(self.inner, "healthy", True))

    @property
    def gpu_count(self) -> int:
        return int(getattr(self.inner, "gpu_count", 1))

    def generate(
        self,
        spec: GenerationSpec,
        image: Image.Image,
        ref_frames: list[Image.Image],
        on_step: StepCallback,
        checkpoints: Checkpoints | None = None,
    ) -> np.ndarray:
        width, height = _scaled_size(spec.width, spec.height, self.max_side)
        if (width, height) == (spec.width, spec.height):
            return self.inner.generate(spec, image, ref_frames, on_step, checkpoints)
        small = dataclasses.replace(spec, width=width, height=height)
        resample = Image.Resampling.BILINEAR
        frames = self.inner.generate(
            small,
            image.resize((width, height), resample),
            [f.resize((width, height), resample) for f in ref_frames],
            on_step,
            checkpoints,
        )
        return np.stack(
            [np.asarray(Image.fromarray(f).resize((spec.width, spec.height), resample)) for f in frames]
        )
