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

from vap_shared.gpu_contract import AspectRatio, GenerationSettings, Resolution

from gpu.vap.geometry import RELEASED

# Landscape (width, height); 9:16 swaps them. All multiples of 16 (VAE ×8, patch ×2: RELEASED).
# 580p is 1024×576 rather than a literal 580 lines: 580 is not a multiple of 16 and 576 is the
# nearest 16:9 size that is.
LANDSCAPE_SIZES: dict[Resolution, tuple[int, int]] = {
    "480p": (832, 480),
    "580p": (1024, 576),
    "720p": (1280, 720),
}
MIN_FRAMES = 9
MAX_FRAMES = 121
MAX_SEED = 2**32 - 1
DEFAULT_STEPS = 50
STEPS_ENV = "VAP_DEFAULT_STEPS"
MAX_STEPS = 200


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
    width, height = LANDSCAPE_SIZES[resolution]
    return (width, height) if aspect_ratio == "16:9" else (height, width)


def valid_num_frames(requested: int) -> int:
    """The nearest 4k+1 frame count in [MIN_FRAMES, MAX_FRAMES]; ties round up.

    The Wan VAE compresses time 4× after the first frame, so only 4k+1 frames decode exactly.
    """
    step = RELEASED.temporal
    clamped = min(max(requested, MIN_FRAMES), MAX_FRAMES)
    k = (clamped - 1 + step // 2) // step  # + half a step: rounds to nearest, ties up
    return min(step * k + 1, MAX_FRAMES)


def resolve_seed(seed: int | None, seed_from: str | None = None) -> int:
    """The sidecar's seed, or one picked for it (reported back so a result can be reproduced): drawn
    from `seed_from` (the job id: every attempt of a job gets the same one, so a re-run after a
    preemption continues the saved denoising state), else fresh at random."""
    if seed is None:
        if seed_from is not None:
            digest = hashlib.sha256(b"vap-seed:" + seed_from.encode()).digest()
            return int.from_bytes(digest[:8], "big") % (MAX_SEED + 1)
        return secrets.randbelow(MAX_SEED + 1)
    if not 0 <= seed <= MAX_SEED:
        raise ValueError(f"seed must be within 0..{MAX_SEED}, got {seed}")
    return seed


def default_steps(env: Mapping[str, str] | None = None, fallback: int = DEFAULT_STEPS) -> int:
    """Server default for denoising steps: `VAP_DEFAULT_STEPS` if set, else `fallback`."""
    raw = (os.environ if env is None else env).get(STEPS_ENV, "").strip()
    if not raw:
        return fallback
    steps = int(raw)
    if not 1 <= steps <= MAX_STEPS:
        raise ValueError(f"{STEPS_ENV} must be within 1..{MAX_STEPS}, got {steps}")
    return steps


def build_spec(
    settings: GenerationSettings, steps: int | None, server_default_steps: int, seed_from: str | None = None
) -> GenerationSpec:
    """Map validated sidecar settings (plus the request's step override) to a `GenerationSpec`;
    `seed_from` picks the seed a sidecar leaves open (`resolve_seed`)."""
    width, height = target_size(settings.aspect_ratio, settings.resolution)
    if not 1 <= settings.fps <= 60:
        raise ValueError(f"fps must be within 1..60, got {settings.fps}")
    if not 1 < settings.guidance_scale <= 20:
        raise ValueError(f"guidance_scale must be > 1 and <= 20, got {settings.guidance_scale}")
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
