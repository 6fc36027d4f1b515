"""A tiny random VAP pipeline built from constructors only (no hub access), for CPU tests.

Same classes and code path as the real model, just small: 3 transformer blocks with the expert on
blocks 0 and 1 (so both the full expert block and the last-expert shortcut run), a 1-layer UMT5
text encoder with a word-level tokenizer, a 2-layer CLIP vision tower, a narrow Wan VAE.
"""

from __future__ import annotations

import torch
from diffusers.models import AutoencoderKLWan
from diffusers.schedulers import UniPCMultistepScheduler
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import (
    CLIPVisionConfig,
    CLIPVisionModel,
    PreTrainedTokenizerFast,
    UMT5Config,
    UMT5EncoderModel,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from gpu.vap.pipeline import VAPPipeline
from gpu.vap.transformer import WanTransformer3DMOTModel

TEXT_DIM = 32
IMAGE_DIM = 4
_WORDS = (
    "a the and of in on with to is his her it man woman dog cat car street camera turns walks "
    "runs static light golden particles transforms into toy character bright blurred low quality "
    "video frame red green blue"
)

TINY_TRANSFORMER_CONFIG: dict[str, object] = {
    "patch_size": (1, 2, 2),
    "num_attention_heads": 2,
    "attention_head_dim": 12,
    "in_channels": 36,
    "out_channels": 16,
    "text_dim": TEXT_DIM,
    "freq_dim": 256,
    "ffn_dim": 32,
    "num_layers": 3,
    "image_dim": IMAGE_DIM,
    "added_kv_proj_dim": 24,
    "block_idx_with_mot_ref": [0, 1],
}


def build_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer with T5's special tokens; appends </s> like the UMT5 tokenizer."""
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for word in _WORDS.split():
        vocab.setdefault(word, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))  # noqa: S106
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    special = {"pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"}
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=512, **special)


def build_tiny_transformer(seed: int = 0) -> WanTransformer3DMOTModel:
    torch.manual_seed(seed)
    return WanTransformer3DMOTModel(**TINY_TRANSFORMER_CONFIG)


def build_tiny_pipeline(seed: int = 0) -> VAPPipeline:
    """Deterministic for a given seed; leaves the global RNG state as it found it."""
    with torch.random.fork_rng(devices=[]):
        tokenizer = build_tiny_tokenizer()
        torch.manual_seed(seed)
        text_encoder = UMT5EncoderModel(
            UMT5Config(
                vocab_size=len(tokenizer),
                d_model=TEXT_DIM,
                d_kv=8,
                d_ff=32,
                num_layers=1,
                num_heads=4,
                relative_attention_num_buckets=8,
                relative_attention_max_distance=16,
                pad_token_id=0,
                eos_token_id=1,
            )
        ).eval()
        torch.manual_seed(seed + 1)
        image_encoder = CLIPVisionModel(
            CLIPVisionConfig(
                hidden_size=IMAGE_DIM,
                intermediate_size=16,
                num_hidden_layers=2,
                num_attention_heads=2,
                image_size=8,
                patch_size=2,
                projection_dim=IMAGE_DIM,
            )
        ).eval()
        image_processor = CLIPImageProcessorPil(
            size={"shortest_edge": 8}, crop_size={"height": 8, "width": 8}
        )
        torch.manual_seed(seed + 2)
        vae = AutoencoderKLWan(
            base_dim=3,
            z_dim=16,
            dim_mult=[1, 1, 1, 1],
            num_res_blocks=1,
            temperal_downsample=[False, True, True],
        ).eval()
        transformer = build_tiny_transformer(seed + 3).eval()
        scheduler = UniPCMultistepScheduler(
            prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000, flow_shift=3.0
        )
    return VAPPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        image_encoder=image_encoder,
        image_processor=image_processor,
        transformer=transformer,
        vae=vae,
        scheduler=scheduler,
    )
