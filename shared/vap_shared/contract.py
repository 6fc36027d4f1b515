"""The service's contract: what a sidecar may ask for, its defaults and bounds, the sizes a resolution
means, the media the GPU side accepts, and the GPU counts and backends a job may run on.

Every other place imports these (the Lambda layer, the GPU side, the CLI, the local stack, the
tools); nothing restates them. Where a literal cannot import Python (template.yaml's `AllowedValues`
and `Default`s, the sidecar tables in README.md and docs/contracts.md), `tests/unit/test_contract.py`
compares it with this module. Field names, defaults and ranges are fal's `fal-ai/video-as-prompt`
input's. Each enum is a `Literal` type, its tuple of values derived from it. Standard library only:
every Lambda imports this at cold start.
"""

from __future__ import annotations

from typing import Final, Literal, get_args

# -- enums ------------------------------------------------------------------------------------
AspectRatio = Literal["16:9", "9:16"]
Resolution = Literal["480p", "580p", "720p"]
# GPUs one job may run on (sequence parallel over 40 attention heads: gpu/parallel).
GpuCount = Literal[1, 2, 4, 8]
# Where a job runs; and what a sidecar or the stack's DefaultBackend may name (auto = Modal, then fal).
BackendName = Literal["modal", "fal"]
BackendChoice = Literal["auto", BackendName]

ASPECT_RATIOS: Final[tuple[AspectRatio, ...]] = get_args(AspectRatio)
RESOLUTIONS: Final[tuple[Resolution, ...]] = get_args(Resolution)
GPU_COUNTS: Final[tuple[GpuCount, ...]] = get_args(GpuCount)
BACKEND_NAMES: Final[tuple[BackendName, ...]] = get_args(BackendName)
BACKEND_CHOICES: Final[tuple[BackendChoice, ...]] = get_args(BackendChoice)

# -- sidecar defaults (fal's) -------------------------------------------------------------------
DEFAULT_NUM_FRAMES: Final = 49
DEFAULT_FPS: Final = 16
DEFAULT_SAFETY_CHECKER: Final = True
DEFAULT_ASPECT_RATIO: Final[AspectRatio] = "9:16"
DEFAULT_RESOLUTION: Final[Resolution] = "480p"
DEFAULT_GUIDANCE_SCALE: Final = 5.0
# The stack's defaults (parameters DefaultBackend, DefaultGpus, MaxGpus) for a sidecar naming none.
DEFAULT_BACKEND: Final[BackendChoice] = "auto"
DEFAULT_GPUS: Final[GpuCount] = 1
MAX_GPUS: Final[GpuCount] = max(GPU_COUNTS)

# -- sidecar bounds (inclusive unless named otherwise) -----------------------------------------------
TEXT_MAX_CHARS: Final = 5_000  # prompt, video_description (after trimming)
URL_MAX_CHARS: Final = 4_096  # a media reference that is not a data: URI
SEED_MAX: Final = 2**32 - 1
NUM_FRAMES_MIN: Final = 9
NUM_FRAMES_MAX: Final = 121
FPS_MIN: Final = 1
FPS_MAX: Final = 60
GUIDANCE_SCALE_ABOVE: Final = 1.0  # exclusive: classifier-free guidance needs more than 1
GUIDANCE_SCALE_MAX: Final = 20.0

# -- denoising steps (the deployment's default; a request may override it) ----------------------------
DEFAULT_STEPS: Final = 50
STEPS_MAX: Final = 200

# -- what a resolution means -------------------------------------------------------------------
# Landscape (width, height); 9:16 swaps them. All multiples of 16 (VAE x8, patch x2). 580p is
# 1024x576 rather than a literal 580 lines: 580 is not a multiple of 16 and 576 is the nearest 16:9
# size that is.
LANDSCAPE_SIZES: Final[dict[Resolution, tuple[int, int]]] = {
    "480p": (832, 480),
    "580p": (1024, 576),
    "720p": (1280, 720),
}


def frame_size(aspect_ratio: AspectRatio, resolution: Resolution) -> tuple[int, int]:
    """(width, height) of the video a sidecar's aspect ratio and resolution ask for."""
    width, height = LANDSCAPE_SIZES[resolution]
    return (width, height) if aspect_ratio == "16:9" else (height, width)


# -- media the GPU side accepts (ingest's probes refuse the same, before a GPU cold start) ---------
MAX_SOURCE_FRAMES: Final = 3600  # a reference video's frames: 60 s at 60 fps
MAX_IMAGE_PIXELS: Final = 64_000_000  # a target image's pixels (a decompression-bomb guard)
