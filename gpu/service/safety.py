"""Image safety gate: the target image before generation, sampled output frames after.

Production uses the public Stable Diffusion safety checker (`CompVis/stable-diffusion-safety-checker`,
a CLIP ViT-L/14 image tower scored against fixed concept embeddings). Tests build the same class
with a tiny random CLIP config, and the gate itself takes any `SafetyClassifier`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image

SAFETY_CHECKER_REPO = "CompVis/stable-diffusion-safety-checker"
# Commit of the HF repo (the weights have not changed since 2022; same pin as sdkit uses).
SAFETY_CHECKER_REVISION = "cb41f3a270d63d454d385fc2e4f571c487c253c5"
OUTPUT_SAMPLES = 8  # output frames checked per video: start, end and evenly in between


class SafetyClassifier(Protocol):
    def __call__(self, images: Sequence[Image.Image]) -> list[bool]:
        """One flag per image: True means the image is unsafe."""
        ...


class SafetyViolation(Exception):
    """An input or output was flagged; the job fails with code "safety" and nothing is stored."""


def output_sample_indices(num_frames: int, samples: int = OUTPUT_SAMPLES) -> list[int]:
    """Distinct, evenly spaced frame indices to check (all frames when there are few)."""
    if num_frames <= samples:
        return list(range(num_frames))
    return sorted({int(i) for i in np.round(np.linspace(0, num_frames - 1, samples))})


def check_image(classifier: SafetyClassifier, image: Image.Image) -> None:
    if classifier([image])[0]:
        raise SafetyViolation("the input image was flagged by the safety checker; no video was generated")


def check_output(classifier: SafetyClassifier, frames: np.ndarray, samples: int = OUTPUT_SAMPLES) -> None:
    """Check sampled frames of a uint8 `[F, H, W, 3]` video; raise `SafetyViolation` when any is flagged."""
    indices = output_sample_indices(len(frames), samples)
    flags = classifier([Image.fromarray(frames[i]) for i in indices])
    flagged = [i for i, bad in zip(indices, flags, strict=True) if bad]
    if flagged:
        listed = ", ".join(str(i) for i in flagged)
        raise SafetyViolation(
            f"the generated video was flagged by the safety checker (frames {listed}); it was not stored"
        )


def _pil_clip_processor() -> Any:
    """The PIL-backed CLIP processor: same pixels with or without torchvision installed."""
    try:
        from transformers import CLIPImageProcessorPil

        return CLIPImageProcessorPil
    except ImportError:  # older transformers: the default class is the PIL one
        from transformers import CLIPImageProcessor

        return CLIPImageProcessor


class DiffusersSafetyClassifier:
    """`StableDiffusionSafetyChecker` + its CLIP image processor behind the `SafetyClassifier` call."""

    def __init__(self, checker: Any, processor: Any, device: str = "cpu", dtype: Any = None) -> None:
        import torch

        self.checker = checker.to(device=device, dtype=dtype or torch.float32).eval()
        self.processor = processor
        self.device = device
        self.dtype = dtype or torch.float32

    def __call__(self, images: Sequence[Image.Image]) -> list[bool]:
        import torch

        if not images:
            return []
        pixels = self.processor(images=list(images), return_tensors="pt").pixel_values
        pixels = pixels.to(device=self.device, dtype=self.dtype)
        # `images` is only used by the checker to black out flagged ones; pass a cheap placeholder.
        placeholder = [np.zeros((1, 1, 3), dtype=np.float32) for _ in images]
        with torch.inference_mode():
            _, flags = self.checker(clip_input=pixels, images=placeholder)
        return [bool(flag) for flag in flags]

    @classmethod
    def from_pretrained(
        cls,
        source: str | Path = SAFETY_CHECKER_REPO,
        revision: str = SAFETY_CHECKER_REVISION,
        device: str = "cpu",
        dtype: Any = None,
    ) -> DiffusersSafetyClassifier:
        """Load the released checker (from the HF cache in the Modal volume; no download at serve time)."""
        from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker

        checker = StableDiffusionSafetyChecker.from_pretrained(str(source), revision=revision)
        processor = _pil_clip_processor().from_pretrained(str(source), revision=revision)
        return cls(checker, processor, device=device, dtype=dtype)

    @classmethod
    def tiny(cls, seed: int = 0, flag_everything: bool = False) -> DiffusersSafetyClassifier:
        """A randomly initialised checker from a hand-made tiny CLIP config (tests, local server).

        It runs the real code path but its verdicts mean nothing; `flag_everything` sets the
        concept thresholds below any cosine similarity so every image is flagged.
        """
        import torch
        from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
        from transformers import CLIPConfig

        torch.manual_seed(seed)
        config = CLIPConfig(
            text_config={
                "vocab_size": 64,
                "hidden_size": 16,
                "intermediate_size": 32,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
                "max_position_embeddings": 16,
                "bos_token_id": 0,
                "eos_token_id": 1,
                "pad_token_id": 1,
            },
            vision_config={
                "hidden_size": 16,
                "intermediate_size": 32,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
                "image_size": 32,
                "patch_size": 8,
            },
            projection_dim=8,
        )
        checker = StableDiffusionSafetyChecker(config)
        with torch.no_grad():
            checker.concept_embeds.normal_()
            checker.special_care_embeds.normal_()
            threshold = -2.0 if flag_everything else 2.0  # cosine similarity lies in [-1, 1]
            checker.concept_embeds_weights.fill_(threshold)
            checker.special_care_embeds_weights.fill_(threshold)
        processor = _pil_clip_processor()(
            size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, do_convert_rgb=True
        )
        return cls(checker, processor)
