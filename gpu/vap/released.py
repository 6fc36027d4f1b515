"""The released VAP pipeline's components at full size, built from configs (no hub, no weights).

Shapes as in `ByteDance/Video-As-Prompt-Wan2.1-14B` (Wan2.1-I2V-14B's encoders and VAE) and the
safety checker the service runs (`CompVis/stable-diffusion-safety-checker`), with the dtypes the
service loads them in (`gpu.vap.loading`, `gpu.service.modal_app`). On the meta device they cost nothing
(the memory plan and the FLOP count use them that way); on a GPU, `random_weights` fills them so
the benchmark can run the whole pipeline without downloading 66 GB.

Checked against the released sizes: UMT5 11.36 GB (bf16), CLIP 2.52 GB (fp32), VAE 0.51 GB (fp32),
safety checker 0.61 GB (fp16), transformer 41.46 GB (bf16, 137 tensors fp32).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
from diffusers.models import AutoencoderKLWan
from diffusers.schedulers import UniPCMultistepScheduler
from transformers import CLIPConfig, CLIPVisionConfig, CLIPVisionModel, UMT5Config, UMT5EncoderModel
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from gpu.vap.configs import (
    CLIP_VIT_H_CONFIG,
    RELEASED_14B_CONFIG,
    SAFETY_VISION_CONFIG,
    SCHEDULER_CONFIG,
    UMT5_XXL_CONFIG,
    WAN_VAE_CONFIG,
)
from gpu.vap.transformer import KEEP_IN_FP32, WanTransformer3DMOTModel

TEXT_DTYPE = torch.bfloat16  # UMT5 and the transformer
IMAGE_DTYPE = torch.float32  # CLIP (as the reference)
VAE_DTYPE = torch.float32  # docs/model.md: why not bf16
SAFETY_DTYPE = torch.float16  # gpu/service/modal_app.py loads the checker in fp16


@dataclass
class Components:
    text_encoder: UMT5EncoderModel
    image_encoder: CLIPVisionModel
    vae: AutoencoderKLWan
    transformer: WanTransformer3DMOTModel | None  # None when built without it
    safety_checker: nn.Module | None


def _with_default_dtype(dtype: torch.dtype, build: Any) -> Any:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        return build()
    finally:
        torch.set_default_dtype(previous)


def build_transformer(device: str | torch.device = "meta") -> WanTransformer3DMOTModel:
    """The released transformer layout in bf16 with the checkpoint's fp32 tensors (no weights
    on `meta`; uninitialised memory elsewhere: call `random_weights`)."""
    with torch.device("meta"):
        model = _with_default_dtype(torch.bfloat16, lambda: WanTransformer3DMOTModel(**RELEASED_14B_CONFIG))
    if torch.device(device).type != "meta":
        model.to_empty(device=device)
    for name, param in model.named_parameters():
        if any(part in KEEP_IN_FP32 for part in name.split(".")):
            param.data = param.data.float()
    return model.eval()


def safety_checker() -> nn.Module:
    """The SD safety checker's layout (CLIP ViT-L/14 tower, projection, concept embeddings)."""
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker

    return StableDiffusionSafetyChecker(CLIPConfig(vision_config=SAFETY_VISION_CONFIG, projection_dim=768))


def build_components(
    device: str | torch.device = "meta", with_transformer: bool = True, with_safety: bool = True
) -> Components:
    """Every GPU-resident model of the service at full size and its load dtype."""

    def make(dtype: torch.dtype, build: Any) -> Any:
        with torch.device("meta"):
            module = _with_default_dtype(dtype, build)
        if torch.device(device).type != "meta":
            module.to_empty(device=device)
        return module.eval()

    return Components(
        text_encoder=make(TEXT_DTYPE, lambda: UMT5EncoderModel(UMT5Config(**UMT5_XXL_CONFIG))),
        image_encoder=make(IMAGE_DTYPE, lambda: CLIPVisionModel(CLIPVisionConfig(**CLIP_VIT_H_CONFIG))),
        vae=make(VAE_DTYPE, lambda: AutoencoderKLWan(**WAN_VAE_CONFIG)),
        transformer=build_transformer(device) if with_transformer else None,
        safety_checker=make(SAFETY_DTYPE, safety_checker) if with_safety else None,
    )


@torch.no_grad()
def random_weights(module: nn.Module, seed: int = 0) -> nn.Module:
    """Fill weights in place: N(0, 0.02) matrices, unit norm scales, zero biases (keeps
    activations in range through 40 blocks; the numbers mean nothing, the work is real)."""
    device = next(module.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    for name, param in module.named_parameters():
        if name.endswith("bias"):
            param.zero_()
        elif param.ndim == 1:
            param.fill_(1.0)
        else:
            param.normal_(0.0, 0.02, generator=gen)
    for name, buf in module.named_buffers():
        if name.endswith("position_ids"):  # CLIP's index buffer: uninitialised after to_empty
            buf.copy_(torch.arange(buf.shape[-1], device=device).expand_as(buf))
        elif buf.is_floating_point():
            buf.zero_()
    return module


def image_processor() -> CLIPImageProcessorPil:
    """CLIP preprocessing at ViT-H/14's 224 px (the released `image_processor` settings)."""
    return CLIPImageProcessorPil(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})


def scheduler() -> UniPCMultistepScheduler:
    return UniPCMultistepScheduler(**SCHEDULER_CONFIG)
