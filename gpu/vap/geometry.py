"""The shapes of a generation: how a video's size becomes latent grids and token counts.

Read once from the configs, as diffusers' pipelines read their VAE scale factors: the Wan VAE
keeps the first frame and compresses the rest 2^k in time (k = its temporal downsamplings) and
2^n in space (n = all its downsamplings); the transformer cuts the latent grid into patches, one
token each, for the target and for the reference stream alike. The context is the text encoder's
`TEXT_TOKENS` and CLIP's `IMAGE_TOKENS`. Every other count of latents or tokens on the GPU side
(pipeline, plan, footprint, FLOPs, scaling, bench, generation's frame counts, the parallel
engine) comes from here. Pure Python: the API container imports it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from gpu.vap.configs import CLIP_VIT_H_CONFIG, RELEASED_14B_CONFIG, WAN_VAE_CONFIG

# Text tokens per caption: the attention splits a context into image and text tokens assuming
# exactly 512 of the latter (as diffusers' Wan does), so captions are always padded to 512.
TEXT_TOKENS = 512

Grid = tuple[int, int, int]  # (frames, height, width)


def image_tokens(vision_config: Mapping[str, Any]) -> int:
    """CLIP hidden states per image: one per patch and the class token."""
    return int((vision_config["image_size"] // vision_config["patch_size"]) ** 2 + 1)


IMAGE_TOKENS = image_tokens(CLIP_VIT_H_CONFIG)  # 257: ViT-H/14 at 224 px


@dataclass(frozen=True)
class Geometry:
    """A VAE's and a transformer's sizes, read from their configs."""

    temporal: int  # latent frames = (frames - 1) / temporal + 1
    spatial: int  # latent height, width = pixels / spatial
    patch: Grid  # latent (frames, height, width) per token

    @classmethod
    def of(cls, vae_config: Mapping[str, Any], transformer_config: Mapping[str, Any]) -> Geometry:
        downsample = list(vae_config["temperal_downsample"])
        p = transformer_config["patch_size"]
        return cls(2 ** sum(downsample), 2 ** len(downsample), (int(p[0]), int(p[1]), int(p[2])))

    def latent_grid(self, num_frames: int, height: int, width: int) -> Grid:
        """The VAE latents' (frames, height, width) for a video of this size."""
        return (num_frames - 1) // self.temporal + 1, height // self.spatial, width // self.spatial

    def token_grid(self, latent_grid: Grid) -> Grid:
        return (
            latent_grid[0] // self.patch[0],
            latent_grid[1] // self.patch[1],
            latent_grid[2] // self.patch[2],
        )

    def tokens(self, latent_grid: Grid) -> int:
        """Tokens per stream for latents of this grid."""
        return math.prod(self.token_grid(latent_grid))

    def tokens_per_stream(self, num_frames: int, height: int, width: int) -> int:
        """Tokens per stream (target or reference) for a video of this size."""
        return self.tokens(self.latent_grid(num_frames, height, width))


# The released model's: time ÷4 after the first frame, space ÷8, patches of 1 × 2 × 2.
RELEASED = Geometry.of(WAN_VAE_CONFIG, RELEASED_14B_CONFIG)


def geometry_of(transformer_config: Mapping[str, Any]) -> Geometry:
    """The geometry of a transformer config (the released one or a tiny test layout) behind the
    Wan VAE."""
    return Geometry.of(WAN_VAE_CONFIG, transformer_config)
