"""Video-As-Prompt Mixture-of-Transformers (MoT) transformer on diffusers' Wan building blocks.

The base model is Wan2.1-I2V-14B with exactly upstream diffusers parameter names. A second token
stream (the reference video) runs through its own patch embedding and condition embedder
(`*_mot_ref`) and joins the base stream only in the "expert" blocks listed in the config
(`block_idx_with_mot_ref`): there both streams have their own norms/projections/cross-attention/FFN
but share ONE joint self-attention. The reference stream always sees timestep 1 ("clean") and a
rotary embedding whose temporal positions start at -F. Its output is discarded, so everything the
reference stream would compute after the last expert block's Q/K/V is skipped.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.attention import AttentionMixin, FeedForward
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.normalization import FP32LayerNorm
from diffusers.models.transformers.transformer_wan import (
    WanAttention,
    WanAttnProcessor,
    WanTimeTextImageEmbedding,
    WanTransformerBlock,
)

from gpu.vap.rotary import RotaryCache, apply_rotary

if TYPE_CHECKING:
    from gpu.parallel.sequence import SequenceParallel

# Exactly the reference's list: matched per dotted name component at load time, so the expert's
# `scale_shift_table_mot_ref` / `norm2_mot_ref` load in the model dtype (as in the reference).
KEEP_IN_FP32 = ["time_embedder", "scale_shift_table", "norm1", "norm2", "norm3"]

Rotary = tuple[torch.Tensor, torch.Tensor]
# (query, key, value [B, S, H, Dh], backend) -> [B, S_q, H, Dh]: the seam gpu/parallel swaps.
AttentionCore = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Any], torch.Tensor]


def local_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, backend: Any
) -> torch.Tensor:
    """Unmasked self-attention on this process (sequence parallel wraps it in all-to-alls)."""
    return dispatch_attention_fn(query, key, value, dropout_p=0.0, is_causal=False, backend=backend)


@dataclass
class ReferenceContext:
    """Everything about the reference stream that is constant over the denoising loop."""

    tokens: torch.Tensor  # [1 or B, S_ref, D] patch-embedded reference latents
    timestep_proj: torch.Tensor  # [1, 6, D] modulation from the fixed "clean" timestep
    encoder_hidden_states: torch.Tensor  # [B, 257 + 512, D] image + text context of the reference
    rotary: Rotary


def _modulation(table: torch.Tensor, temb: torch.Tensor) -> tuple[torch.Tensor, ...]:
    # [1, 6, D] + [B, 6, D] in float32 -> six [B, 1, D] tensors (shift, scale, gate, c_shift, ...).
    return tuple((table + temb.float()).chunk(6, dim=1))


def _qkv(
    attn: WanAttention, x: torch.Tensor, rotary: Rotary, need_query: bool = True
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """Self-attention Q/K/V as `[B, S, H, Dh]` with QK-norm and rotary applied (diffusers' layout).

    Uses the fused QKV projection when `fuse_qkv_projections()` was called (one GEMM)."""
    if need_query and getattr(attn, "fused_projections", False):
        q, k, v = attn.to_qkv(x).chunk(3, dim=-1)
    else:
        q = attn.to_q(x) if need_query else None
        k, v = attn.to_k(x), attn.to_v(x)
    key = apply_rotary(attn.norm_k(k).unflatten(2, (attn.heads, -1)), *rotary)
    value = v.unflatten(2, (attn.heads, -1))
    query = None if q is None else apply_rotary(attn.norm_q(q).unflatten(2, (attn.heads, -1)), *rotary)
    return query, key, value


def _cross_and_ffn(
    norm2: nn.Module,
    attn2: WanAttention,
    norm3: nn.Module,
    ffn: FeedForward,
    hidden_states: torch.Tensor,
    context: torch.Tensor,
    mod: tuple[torch.Tensor, ...],
) -> torch.Tensor:
    """Steps 2-3 of a Wan block (cross-attention, modulated FFN), same arithmetic as diffusers'."""
    _, _, _, c_shift, c_scale, c_gate = mod
    normed = norm2(hidden_states.float()).type_as(hidden_states)
    hidden_states = hidden_states + attn2(normed, context, None, None)
    normed = (norm3(hidden_states.float()) * (1 + c_scale) + c_shift).type_as(hidden_states)
    ff = ffn(normed)
    return (hidden_states.float() + ff.float() * c_gate).type_as(hidden_states)


class VAPExpertBlock(WanTransformerBlock):
    """A Wan block plus the reference-stream expert (`*_mot_ref`) and a joint self-attention."""

    def __init__(
        self,
        dim: int,
        ffn_dim: int,
        num_heads: int,
        qk_norm: str = "rms_norm_across_heads",
        cross_attn_norm: bool = False,
        eps: float = 1e-6,
        added_kv_proj_dim: int | None = None,
    ) -> None:
        super().__init__(dim, ffn_dim, num_heads, qk_norm, cross_attn_norm, eps, added_kv_proj_dim)
        self.norm1_mot_ref = FP32LayerNorm(dim, eps, elementwise_affine=False)
        self.attn1_mot_ref = WanAttention(
            dim=dim, heads=num_heads, dim_head=dim // num_heads, eps=eps, processor=WanAttnProcessor()
        )
        self.attn2_mot_ref = WanAttention(
            dim=dim,
            heads=num_heads,
            dim_head=dim // num_heads,
            eps=eps,
            added_kv_proj_dim=added_kv_proj_dim,
            cross_attention_dim_head=dim // num_heads,
            processor=WanAttnProcessor(),
        )
        self.norm2_mot_ref: nn.Module = (
            FP32LayerNorm(dim, eps, elementwise_affine=True) if cross_attn_norm else nn.Identity()
        )
        self.ffn_mot_ref = FeedForward(dim, inner_dim=ffn_dim, activation_fn="gelu-approximate")
        self.norm3_mot_ref = FP32LayerNorm(dim, eps, elementwise_affine=False)
        self.scale_shift_table_mot_ref = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)
        self.attention_core: AttentionCore = local_attention

    def forward(  # type: ignore[override]
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        temb: torch.Tensor,
        rotary_emb: Rotary,
        ref_states: torch.Tensor,
        ref_context: torch.Tensor,
        ref_temb: torch.Tensor,
        ref_rotary: Rotary,
        ref_output_needed: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Both streams; with `ref_output_needed=False` (last expert block) the reference stream
        only contributes keys/values: its queries, output projection, cross-attention and FFN would
        never reach the model output. (`forward`, so that regional `torch.compile` covers it.)"""
        mod = _modulation(self.scale_shift_table, temb)
        rmod = _modulation(self.scale_shift_table_mot_ref, ref_temb)
        shift, scale, gate = mod[:3]
        r_shift, r_scale, r_gate = rmod[:3]

        x = (self.norm1(hidden_states.float()) * (1 + scale) + shift).type_as(hidden_states)
        xr = (self.norm1_mot_ref(ref_states.float()) * (1 + r_scale) + r_shift).type_as(ref_states)
        q, k, v = _qkv(self.attn1, x, rotary_emb)
        qr, kr, vr = _qkv(self.attn1_mot_ref, xr, ref_rotary, need_query=ref_output_needed)
        assert q is not None
        n_main = q.shape[1]
        query = q if qr is None else torch.cat([q, qr], dim=1)
        out = self.attention_core(
            query,
            torch.cat([k, kr], dim=1),
            torch.cat([v, vr], dim=1),
            getattr(self.attn1.processor, "_attention_backend", None),
        )
        out = out.flatten(2, 3).type_as(q)
        attn_out = self.attn1.to_out[1](self.attn1.to_out[0](out[:, :n_main]))
        hidden_states = (hidden_states.float() + attn_out * gate).type_as(hidden_states)
        hidden_states = _cross_and_ffn(
            self.norm2, self.attn2, self.norm3, self.ffn, hidden_states, encoder_hidden_states, mod
        )
        if not ref_output_needed:
            return hidden_states, None

        ref_out = self.attn1_mot_ref.to_out[1](self.attn1_mot_ref.to_out[0](out[:, n_main:]))
        ref_states = (ref_states.float() + ref_out * r_gate).type_as(ref_states)
        ref_states = _cross_and_ffn(
            self.norm2_mot_ref,
            self.attn2_mot_ref,
            self.norm3_mot_ref,
            self.ffn_mot_ref,
            ref_states,
            ref_context,
            rmod,
        )
        return hidden_states, ref_states


class WanTransformer3DMOTModel(ModelMixin, ConfigMixin, AttentionMixin):  # type: ignore[misc]
    """VAP transformer. Class name and config keys match the released checkpoint's
    `transformer/config.json`, so `from_pretrained` loads it with strict key matching."""

    _supports_gradient_checkpointing = False
    _skip_layerwise_casting_patterns = ["patch_embedding", "condition_embedder", "norm"]  # type: ignore[assignment]  # noqa: RUF012
    _no_split_modules = ["WanTransformerBlock", "VAPExpertBlock"]  # type: ignore[assignment]  # noqa: RUF012
    _repeated_blocks = ["WanTransformerBlock", "VAPExpertBlock"]  # noqa: RUF012
    _keep_in_fp32_modules = KEEP_IN_FP32  # type: ignore[assignment]
    _keys_to_ignore_on_load_unexpected = ["norm_added_q"]  # type: ignore[assignment]  # noqa: RUF012

    @register_to_config
    def __init__(
        self,
        patch_size: Sequence[int] = (1, 2, 2),
        num_attention_heads: int = 40,
        attention_head_dim: int = 128,
        in_channels: int = 16,
        out_channels: int = 16,
        text_dim: int = 4096,
        freq_dim: int = 256,
        ffn_dim: int = 13824,
        num_layers: int = 40,
        cross_attn_norm: bool = True,
        qk_norm: str | None = "rms_norm_across_heads",
        eps: float = 1e-6,
        image_dim: int | None = None,
        added_kv_proj_dim: int | None = None,
        rope_max_seq_len: int = 1024,
        pos_embed_seq_len: int | None = None,
        block_idx_with_mot_ref: Sequence[int] = (0, 10, 20),
        attention_head_dim_mot_ref: int | None = None,
        supported_effect_types: list[str] | None = None,
        num_ref_embeddings: int | None = None,
        reference_train_mode: str | None = None,
    ) -> None:
        super().__init__()
        # Variants of the reference code the released checkpoint does not use: refuse them loudly
        # rather than load weights into a structure that computes something else.
        if attention_head_dim_mot_ref not in (None, attention_head_dim):
            raise NotImplementedError("a reference stream with its own head dim is not supported")
        if reference_train_mode == "reference_independent":
            raise NotImplementedError("reference_train_mode='reference_independent' is not supported")
        if qk_norm != "rms_norm_across_heads":
            raise NotImplementedError(f"qk_norm={qk_norm!r} is not supported")
        if image_dim is None or added_kv_proj_dim is None:
            raise ValueError("VAP is image-to-video: image_dim and added_kv_proj_dim are required")
        experts = sorted(set(block_idx_with_mot_ref))
        if any(not 0 <= i < num_layers for i in experts):
            raise ValueError(f"block_idx_with_mot_ref {experts} outside 0..{num_layers - 1}")

        inner_dim = num_attention_heads * attention_head_dim
        out_channels = out_channels or in_channels
        self.expert_blocks: tuple[int, ...] = tuple(experts)
        # Set False only to check that skipping the dead reference work changes nothing.
        self.skip_dead_reference_work = True
        self._rotary = RotaryCache(attention_head_dim)
        # Set by gpu.parallel to split the token streams over processes; None: all tokens here.
        self.sequence_parallel: SequenceParallel | None = None

        patch = (int(patch_size[0]), int(patch_size[1]), int(patch_size[2]))
        self.patch_embedding = nn.Conv3d(in_channels, inner_dim, kernel_size=patch, stride=patch)
        self.patch_embedding_mot_ref = nn.Conv3d(in_channels, inner_dim, kernel_size=patch, stride=patch)
        embed_kwargs: dict[str, Any] = {
            "dim": inner_dim,
            "time_freq_dim": freq_dim,
            "time_proj_dim": inner_dim * 6,
            "text_embed_dim": text_dim,
            "image_embed_dim": image_dim,
            "pos_embed_seq_len": pos_embed_seq_len,
        }
        self.condition_embedder = WanTimeTextImageEmbedding(**embed_kwargs)
        self.condition_embedder_mot_ref = WanTimeTextImageEmbedding(**embed_kwargs)

        args = (inner_dim, ffn_dim, num_attention_heads, qk_norm, cross_attn_norm, eps, added_kv_proj_dim)
        self.blocks = nn.ModuleList(
            [VAPExpertBlock(*args) if i in experts else WanTransformerBlock(*args) for i in range(num_layers)]
        )

        self.norm_out = FP32LayerNorm(inner_dim, eps, elementwise_affine=False)
        self.proj_out = nn.Linear(inner_dim, out_channels * math.prod(patch_size))
        self.scale_shift_table = nn.Parameter(torch.randn(1, 2, inner_dim) / inner_dim**0.5)

    # -- reference stream -------------------------------------------------------------------
    def prepare_reference(
        self,
        hidden_states_mot_ref: torch.Tensor,
        encoder_hidden_states_mot_ref: torch.Tensor,
        encoder_hidden_states_image_mot_ref: torch.Tensor,
        timestep_mot_ref: float = 1.0,
    ) -> ReferenceContext:
        """Embed the reference stream once per generation (it does not change between steps).

        `hidden_states_mot_ref`: [1 or B, C_in, F, H, W] reference latents + mask + condition;
        the text/image embeddings carry the CFG batch (cond, uncond)."""
        _, _, frames, height, width = hidden_states_mot_ref.shape
        p_t, p_h, p_w = self.config["patch_size"]
        grid = (frames // p_t, height // p_h, width // p_w)
        # Temporal positions -F..-1 (the reference's RoPE numbers frames from -latent_frames).
        rotary = self._rotary.get(grid, -frames, hidden_states_mot_ref.device)
        tokens = self.patch_embedding_mot_ref(hidden_states_mot_ref).flatten(2).transpose(1, 2).contiguous()
        timestep = torch.full((1,), timestep_mot_ref, device=tokens.device)
        _, proj, text, image = self.condition_embedder_mot_ref(
            timestep, encoder_hidden_states_mot_ref, encoder_hidden_states_image_mot_ref
        )
        assert image is not None
        return ReferenceContext(
            tokens=tokens,
            timestep_proj=proj.unflatten(1, (6, -1)),
            encoder_hidden_states=torch.cat([image, text], dim=1),
            rotary=rotary,
        )

    # -- forward ----------------------------------------------------------------------------
    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        encoder_hidden_states_image: torch.Tensor,
        hidden_states_mot_ref: torch.Tensor | None = None,
        encoder_hidden_states_mot_ref: torch.Tensor | None = None,
        encoder_hidden_states_image_mot_ref: torch.Tensor | None = None,
        reference: ReferenceContext | None = None,
        return_dict: bool = True,
    ) -> Transformer2DModelOutput | tuple[torch.Tensor]:
        """Noise prediction for the target stream.

        Pass either the raw reference inputs (`*_mot_ref`) or a `reference` from
        `prepare_reference` (the pipeline computes it once per generation)."""
        if reference is None:
            if (
                hidden_states_mot_ref is None
                or encoder_hidden_states_mot_ref is None
                or encoder_hidden_states_image_mot_ref is None
            ):
                raise ValueError("the reference stream inputs (or `reference=`) are required")
            reference = self.prepare_reference(
                hidden_states_mot_ref, encoder_hidden_states_mot_ref, encoder_hidden_states_image_mot_ref
            )

        batch, _, frames, height, width = hidden_states.shape
        p_t, p_h, p_w = self.config["patch_size"]
        grid = (frames // p_t, height // p_h, width // p_w)
        rotary = self._rotary.get(grid, 0, hidden_states.device)

        x = self.patch_embedding(hidden_states).flatten(2).transpose(1, 2).contiguous()
        if timestep.ndim == 0:
            timestep = timestep.expand(batch)
        temb, timestep_proj, text, image = self.condition_embedder(
            timestep, encoder_hidden_states, encoder_hidden_states_image
        )
        assert image is not None
        timestep_proj = timestep_proj.unflatten(1, (6, -1))
        context = torch.cat([image, text], dim=1)

        ref: torch.Tensor | None = reference.tokens.expand(batch, -1, -1)
        ref_rotary = reference.rotary
        if self.sequence_parallel is not None:  # this process's slice of both token streams
            x, rotary, ref, ref_rotary = self.sequence_parallel.shard(x, rotary, ref, ref_rotary)
        last_expert = self.expert_blocks[-1] if self.expert_blocks else -1
        for i, block in enumerate(self.blocks):
            if isinstance(block, VAPExpertBlock):
                assert ref is not None
                x, ref = block(
                    x,
                    context,
                    timestep_proj,
                    rotary,
                    ref,
                    reference.encoder_hidden_states,
                    reference.timestep_proj,
                    ref_rotary,
                    ref_output_needed=not (self.skip_dead_reference_work and i == last_expert),
                )
            else:
                x = block(x, context, timestep_proj, rotary)

        shift, scale = (self.scale_shift_table + temb.unsqueeze(1)).chunk(2, dim=1)
        x = (self.norm_out(x.float()) * (1 + scale) + shift).type_as(x)
        x = self.proj_out(x)
        if self.sequence_parallel is not None:  # all tokens again, in order
            x = self.sequence_parallel.gather(x)
        # Unpatchify [B, F·H·W, p_t·p_h·p_w·C] -> [B, C, F·p_t, H·p_h, W·p_w].
        x = x.reshape(batch, *grid, p_t, p_h, p_w, -1).permute(0, 7, 1, 4, 2, 5, 3, 6)
        out = x.flatten(6, 7).flatten(4, 5).flatten(2, 3)
        if not return_dict:
            return (out,)
        return Transformer2DModelOutput(sample=out)


def cast_like_checkpoint(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast to `dtype` but keep the `KEEP_IN_FP32` tensors in float32, as a checkpoint load would."""
    model.to(dtype)
    for name, param in model.named_parameters():
        if any(part in KEEP_IN_FP32 for part in name.split(".")):
            param.data = param.data.float()
    return model


# The released `ByteDance/Video-As-Prompt-Wan2.1-14B` transformer config (expert on every 4th block):
# the benchmark builds it with random weights, the tests and the parity check on the meta device.
RELEASED_14B_CONFIG: dict[str, Any] = {
    "patch_size": (1, 2, 2),
    "num_attention_heads": 40,
    "attention_head_dim": 128,
    "in_channels": 36,
    "out_channels": 16,
    "text_dim": 4096,
    "freq_dim": 256,
    "ffn_dim": 13824,
    "num_layers": 40,
    "image_dim": 1280,
    "added_kv_proj_dim": 5120,
    "block_idx_with_mot_ref": list(range(0, 40, 4)),
}
