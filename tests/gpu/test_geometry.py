"""gpu/vap/geometry.py: latent grids and token counts read from the configs, as the models have them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch
from diffusers.models import AutoencoderKLWan
from transformers import CLIPVisionConfig, CLIPVisionModel

from gpu.vap.configs import CLIP_VIT_H_CONFIG, RELEASED_14B_CONFIG, WAN_VAE_CONFIG
from gpu.vap.geometry import IMAGE_TOKENS, RELEASED, Geometry, geometry_of
from gpu.vap.tiny import TINY_TRANSFORMER_CONFIG, build_tiny_pipeline

ROOT = Path(__file__).resolve().parents[2]


def test_the_released_geometry_is_the_wan_vae_and_the_released_patches():
    assert (RELEASED.temporal, RELEASED.spatial, RELEASED.patch) == (4, 8, (1, 2, 2))
    # The default job: 480p, 49 frames -> 13 x 60 x 104 latents, 13 x 30 x 52 tokens per stream.
    assert RELEASED.latent_grid(49, 480, 832) == (13, 60, 104)
    assert RELEASED.tokens_per_stream(49, 480, 832) == 20280 == 13 * 30 * 52
    assert RELEASED.tokens_per_stream(121, 720, 1280) == 31 * 45 * 80


def test_the_stated_vae_config_is_diffusers_wan_vae():
    with torch.device("meta"):
        vae = AutoencoderKLWan()
    assert {key: vae.config[key] for key in WAN_VAE_CONFIG} == WAN_VAE_CONFIG
    assert Geometry.of(vae.config, RELEASED_14B_CONFIG) == RELEASED


def test_image_tokens_are_clips_positions():
    with torch.device("meta"):
        clip = CLIPVisionModel(CLIPVisionConfig(**CLIP_VIT_H_CONFIG))
    assert IMAGE_TOKENS == clip.embeddings.num_positions == 257


def test_the_pipeline_reads_its_factors_from_the_same_place():
    pipe = build_tiny_pipeline()
    assert pipe.geometry == geometry_of(TINY_TRANSFORMER_CONFIG)
    assert (pipe.vae_scale_factor_temporal, pipe.vae_scale_factor_spatial) == (4, 8)
    # What the VAE really makes of a video: the grid the geometry predicts.
    video = torch.zeros(1, 3, 9, 32, 48)
    latents = pipe.vae.encode(video).latent_dist.mode()
    assert tuple(latents.shape[2:]) == pipe.geometry.latent_grid(9, 32, 48) == (3, 4, 6)


def test_geometry_needs_no_torch():
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from gpu.vap.geometry import RELEASED; print(RELEASED.spatial)"
    )
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "8"
