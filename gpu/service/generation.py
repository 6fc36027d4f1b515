"""Sidecar settings → the concrete generation parameters (size, frames, seed, steps).

Pure functions: the mapping is part of the contract with users (docs/gpu.md), so it is tested
directly and kept free of I/O.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass

from vap_shared.contract import (
    DEFAULT_STEPS,
    FPS_MAX,
    FPS_MIN,
    GUIDANCE_SCALE_ABOVE,
    GUIDANCE_SCALE_MAX,
    NUM_FRAMES_MAX,
    NUM_FRAMES_MIN,
    SEED_MAX,
    STEPS_MAX,
    AspectRatio,
    Resolution,
    frame_size,
)
from vap_shared.gpu_contract import GenerationSettings
from vap_shared.settings_parser import integer

from gpu.vap.geometry import RELEASED

STEPS_ENV = "VAP_DEFAULT_STEPS"


@dataclass(frozen=True)
class GenerationSpec:
    """Everything the engine needs, already resolved (no defaults left to guess)."""

    prompt: str
    ref_prompt: str  # the sidecar's video_description: the caption of the reference video
    width: int
    height: int
    num_frames: int
    requested_frames: int
    fps: int
    seed: int
    guidance_scale: float
    steps: int
    safety: bool


def target_size(aspect_ratio: AspectRatio, resolution: Resolution) -> tuple[int, int]:
    """(width, height) for a sidecar's aspect ratio and resolution."""
    return frame_size(aspect_ratio, resolution)


def valid_num_frames(requested: int) -> int:
    """The nearest 4k+1 frame count in [NUM_FRAMES_MIN, NUM_FRAMES_MAX]; ties round up.

    The Wan VAE compresses time 4× after the first frame, so only 4k+1 frames decode exactly.
    """
    step = RELEASED.temporal
    clamped = min(max(requested, NUM_FRAMES_MIN), NUM_FRAMES_MAX)
    k = (clamped - 1 + step // 2) // step  # + half a step: rounds to nearest, ties up
    return min(step * k + 1, NUM_FRAMES_MAX)


def resolve_seed(seed: int | None, seed_from: str | None = None) -> int:
    """The sidecar's seed, or one picked for it (reported back so a result can be reproduced): drawn
    from `seed_from` (the job id: every attempt of a job gets the same one, so a re-run after a
    preemption continues the saved denoising state), else fresh at random."""
    if seed is None:
        if seed_from is not None:
            digest = hashlib.sha256(b"vap-seed:" + seed_from.encode()).digest()
            return int.from_bytes(digest[:8], "big") % (SEED_MAX + 1)
        return secrets.randbelow(SEED_MAX + 1)
    if not 0 <= seed <= SEED_MAX:
        raise ValueError(f"seed must be within 0..{SEED_MAX}, got {seed}")
    return seed


def default_steps(env: Mapping[str, str] | None = None, fallback: int = DEFAULT_STEPS) -> int:
    """Server default for denoising steps: `VAP_DEFAULT_STEPS` if set, else `fallback`; raises
    `SettingsError`."""
    return integer(os.environ if env is None else env, STEPS_ENV, fallback, 1, STEPS_MAX)


def build_spec(
    settings: GenerationSettings, steps: int | None, server_default_steps: int, seed_from: str | None = None
) -> GenerationSpec:
    """Map validated sidecar settings (plus the request's step override) to a `GenerationSpec`;
    `seed_from` picks the seed a sidecar leaves open (`resolve_seed`)."""
    width, height = target_size(settings.aspect_ratio, settings.resolution)
    if not FPS_MIN <= settings.fps <= FPS_MAX:
        raise ValueError(f"fps must be within {FPS_MIN}..{FPS_MAX}, got {settings.fps}")
    if not GUIDANCE_SCALE_ABOVE < settings.guidance_scale <= GUIDANCE_SCALE_MAX:
        raise ValueError(
            f"guidance_scale must be > {GUIDANCE_SCALE_ABOVE:g} and <= {GUIDANCE_SCALE_MAX:g}, "
            f"got {settings.guidance_scale}"
        )
    return GenerationSpec(
        prompt=settings.prompt.strip(),
        ref_prompt=settings.video_description.strip(),
        width=width,
        height=height,
        num_frames=valid_num_frames(settings.num_frames),
        requested_frames=settings.num_frames,
        fps=settings.fps,
        seed=resolve_seed(settings.seed, seed_from),
        guidance_scale=float(settings.guidance_scale),
        steps=server_default_steps if steps is None else steps,
        safety=settings.enable_safety_checker,
    )
