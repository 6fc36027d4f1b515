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
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.attention import AttentionMixin, FeedForward
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.normalization import FP32LayerNorm
from diffusers.models.transformers.transformer_wan import (
    WanAttention,
    WanAttnProcessor,
    WanTimeTextImageEmbedding,
    WanTransformerBlock,
)

from gpu.vap.attention import FLASH_4, has_module, heads_major, heads_major_cat, local_attention
from gpu.vap.geometry import TEXT_TOKENS
from gpu.vap.rotary import Rotary, RotaryCache, apply_rotary
from gpu.vap.split_plan import AttentionCore, SequenceSplitPlan, TokenSplit

# Exactly the reference's list: matched per dotted name component at load time, so the expert's
# `scale_shift_table_mot_ref` / `norm2_mot_ref` load in the model dtype (as in the reference).
KEEP_IN_FP32 = ["time_embedder", "scale_shift_table", "norm1", "norm2", "norm3"]

QKV = tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]


@dataclass
class ContextKV:
    """One block's cross-attention keys/values over one stream's context (`[B, L, H, Dh]` each).

    The context (text + image tokens) is the same at every denoising step, so these are computed
    once per video instead of once per step."""

    key: torch.Tensor
    value: torch.Tensor
    key_img: torch.Tensor
    value_img: torch.Tensor


@dataclass
class MainContext:
    """The target stream's step-invariant context: embedded text/image tokens and every block's
    cross-attention K/V (`WanTransformer3DMOTModel.prepare_context`)."""

    dtype: torch.dtype  # dtype of the raw text states (the time embedding is cast to it)
    kv: list[ContextKV]


@dataclass
class ReferenceContext:
    """Everything about the reference stream that is constant over the denoising loop."""

    tokens: torch.Tensor  # [1 or B, S_ref, D] patch-embedded reference latents
    timestep_proj: torch.Tensor  # [1, 6, D] modulation from the fixed "clean" timestep
    encoder_hidden_states: torch.Tensor  # [B, 257 + 512, D] image + text context of the reference
    rotary: Rotary
    kv: dict[int, ContextKV] = field(default_factory=dict)  # per expert block: cross-attention K/V
    # The first expert block's reference Q/K/V: its input (the tokens, the "clean" modulation)
    # never changes, so it is computed on the first step (after any sequence split) and reused.
    # Not an init field: it is this process's state (its token slice), never handed to another.
    first_expert_qkv: QKV | None = field(default=None, init=False)


def _modulation(table: torch.Tensor, temb: torch.Tensor) -> tuple[torch.Tensor, ...]:
    # [1, 6, D] + [B, 6, D] in float32 -> six [B, 1, D] tensors (shift, scale, gate, c_shift, ...).
    return tuple((table + temb.float()).chunk(6, dim=1))


def _modulated_norm(
    norm: nn.Module, x: torch.Tensor, scale: torch.Tensor | None, shift: torch.Tensor | None
) -> torch.Tensor:
    """`(norm(x.float()) * (1 + scale) + shift).type_as(x)`, the same float32 arithmetic done in
    place: one float32 copy of the activations alive instead of three."""
    out = norm(x.float())
    if scale is not None and shift is not None:
        out.mul_(1 + scale).add_(shift)
    return out.type_as(x)


def _gated_residual(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """`(x.float() + y.float() * gate).type_as(x)` with one float32 temporary (addition commutes
    exactly, and bf16 -> fp32 is exact, so the result is bit-identical)."""
    acc = y * gate  # gate is float32, so this is float32 (bf16 -> fp32 promotion is exact)
    return acc.add_(x).type_as(x)


def _qkv(
    attn: WanAttention,
    norm: nn.Module,
    hidden_states: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    rotary: Rotary,
    need_query: bool = True,
    value_heads_major: bool = True,
) -> QKV:
    """Self-attention Q/K/V (`[B, S, H, Dh]`, QK-norm and rotary applied, diffusers' layout) of the
    modulated, normalised `hidden_states`; each intermediate is dropped as soon as it is used.
    Q and K come out in heads-major memory (`gpu.vap.attention.heads_major`), and V too unless
    `value_heads_major=False` (the expert block copies it into the joint V anyway).

    Uses the fused QKV projection when `fuse_qkv_projections()` was called (one GEMM)."""
    x = _modulated_norm(norm, hidden_states, scale, shift)
    if need_query and getattr(attn, "fused_projections", False):
        q, k, v = attn.to_qkv(x).chunk(3, dim=-1)
    else:
        q = attn.to_q(x) if need_query else None
        k, v = attn.to_k(x), attn.to_v(x)
    del x
    key = apply_rotary(attn.norm_k(k).unflatten(2, (attn.heads, -1)), *rotary)
    del k
    query = None if q is None else apply_rotary(attn.norm_q(q).unflatten(2, (attn.heads, -1)), *rotary)
    del q
    value = v.unflatten(2, (attn.heads, -1))
    del v
    return query, key, heads_major(value) if value_heads_major else value


def context_kv(attn: WanAttention, context: torch.Tensor) -> ContextKV:
    """Cross-attention K/V of `attn` over `context` = [image tokens; 512 text tokens] (diffusers'
    I2V split), with the same projections and norms as `WanAttnProcessor`."""
    n_img = context.shape[1] - TEXT_TOKENS
    image, text = context[:, :n_img], context[:, n_img:]
    if getattr(attn, "fused_projections", False):
        key, value = attn.to_kv(text).chunk(2, dim=-1)
        key_img, value_img = attn.to_added_kv(image).chunk(2, dim=-1)
    else:
        assert attn.add_k_proj is not None and attn.add_v_proj is not None
        key, value = attn.to_k(text), attn.to_v(text)
        key_img, value_img = attn.add_k_proj(image), attn.add_v_proj(image)

    def heads(t: torch.Tensor) -> torch.Tensor:
        return t.unflatten(2, (attn.heads, -1))

    return ContextKV(
        key=heads(attn.norm_k(key)),
        value=heads(value),
        key_img=heads(attn.norm_added_k(key_img)),
        value_img=heads(value_img),
    )


def _cross_attention(attn: WanAttention, x: torch.Tensor, kv: ContextKV) -> torch.Tensor:
    """`WanAttnProcessor`'s I2V cross-attention with precomputed K/V: text + image attention."""
    backend = getattr(attn.processor, "_attention_backend", None)
    query = attn.norm_q(attn.to_q(x)).unflatten(2, (attn.heads, -1))
    image = local_attention(query, kv.key_img, kv.value_img, backend).flatten(2, 3).type_as(query)
    out = local_attention(query, kv.key, kv.value, backend).flatten(2, 3).type_as(query)
    del query
    out = out + image
    del image
    return attn.to_out[1](attn.to_out[0](out))


def _feed_forward(ffn: FeedForward, x: torch.Tensor) -> torch.Tensor:
    """diffusers' `FeedForward` (proj -> tanh-GELU -> dropout -> proj) with the GELU in place: one
    [B, S, ffn_dim] activation alive instead of two (same kernel, same result)."""
    act: Any = ffn.net[0]
    hidden = act.proj(x)
    if getattr(act, "approximate", None) == "tanh" and hidden.device.type != "mps":
        hidden = torch.ops.aten.gelu_(hidden, approximate="tanh")
    else:
        hidden = act.gelu(hidden)
    for module in ffn.net[1:]:
        hidden = module(hidden)
    return hidden


def _self_attention(
    attn: WanAttention,
    core: AttentionCore,
    norm: nn.Module,
    hidden_states: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    rotary: Rotary,
) -> torch.Tensor:
    """Self-attention of one stream (plain block): Q/K/V, the attention core, output projection;
    Q/K/V live only in this frame, so they are freed as soon as the core is done."""
    q, k, v = _qkv(attn, norm, hidden_states, scale, shift, rotary)
    assert q is not None
    out = core(q, k, v, getattr(attn.processor, "_attention_backend", None))
    del q, k, v
    out = out.flatten(2, 3).type_as(hidden_states)
    return attn.to_out[1](attn.to_out[0](out))


def _cross_and_ffn(
    norm2: nn.Module,
    attn2: WanAttention,
    norm3: nn.Module,
    ffn: FeedForward,
    hidden_states: torch.Tensor,
    kv: ContextKV,
    mod: tuple[torch.Tensor, ...],
) -> torch.Tensor:
    """Steps 2-3 of a Wan block (cross-attention, modulated FFN), same arithmetic as diffusers'.

    `hidden_states` may still hold one row shared by the CFG batch: from the cross-attention on
    the rows differ (each has its own context), so it is expanded to the context's batch here."""
    _, _, _, c_shift, c_scale, c_gate = mod
    hidden_states = hidden_states.expand(kv.key.shape[0], -1, -1)
    normed = norm2(hidden_states.float()).type_as(hidden_states)
    hidden_states = hidden_states + _cross_attention(attn2, normed, kv)
    del normed
    normed = _modulated_norm(norm3, hidden_states, c_scale, c_shift)
    ff = _feed_forward(ffn, normed)
    del normed
    return _gated_residual(hidden_states, ff, c_gate)


class VAPBlock(WanTransformerBlock):
    """diffusers' `WanTransformerBlock` (same parameters and names) with a forward that takes the
    step-invariant cross-attention K/V and drops each activation as soon as it is dead."""

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
        self.attention_core: AttentionCore = local_attention

    def forward(  # type: ignore[override]
        self, hidden_states: torch.Tensor, context: ContextKV, temb: torch.Tensor, rotary_emb: Rotary
    ) -> torch.Tensor:
        mod = _modulation(self.scale_shift_table, temb)
        shift, scale, gate = mod[:3]
        attn_out = _self_attention(
            self.attn1, self.attention_core, self.norm1, hidden_states, scale, shift, rotary_emb
        )
        hidden_states = _gated_residual(hidden_states, attn_out, gate)
        del attn_out
        return _cross_and_ffn(self.norm2, self.attn2, self.norm3, self.ffn, hidden_states, context, mod)


def _rows(t: torch.Tensor, batch: int) -> torch.Tensor:
    # A tensor whose batch is 1 (shared by every row) broadcast to `batch` rows (a view).
    return t if t.shape[0] == batch else t.expand(batch, *t.shape[1:])


class VAPExpertBlock(VAPBlock):
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

    def reference_qkv(
        self, ref_states: torch.Tensor, ref_temb: torch.Tensor, ref_rotary: Rotary, need_query: bool = True
    ) -> QKV:
        """The reference stream's Q/K/V for the joint attention (its queries only when its output
        is needed)."""
        r_shift, r_scale = _modulation(self.scale_shift_table_mot_ref, ref_temb)[:2]
        return _qkv(
            self.attn1_mot_ref,
            self.norm1_mot_ref,
            ref_states,
            r_scale,
            r_shift,
            ref_rotary,
            need_query,
            value_heads_major=False,
        )

    def forward(  # type: ignore[override]
        self,
        hidden_states: torch.Tensor,
        context: ContextKV,
        temb: torch.Tensor,
        rotary_emb: Rotary,
        ref_states: torch.Tensor,
        ref_context: ContextKV | None,
        ref_temb: torch.Tensor,
        ref_rotary: Rotary,
        ref_output_needed: bool = True,
        ref_qkv: QKV | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Both streams; with `ref_output_needed=False` (last expert block) the reference stream
        only contributes keys/values: its queries, output projection, cross-attention and FFN would
        never reach the model output. `ref_qkv`: the reference Q/K/V when already known (first
        expert block). (`forward`, so that regional `torch.compile` covers it.)"""
        mod = _modulation(self.scale_shift_table, temb)
        shift, scale, gate = mod[:3]
        q, k, v = _qkv(
            self.attn1, self.norm1, hidden_states, scale, shift, rotary_emb, value_heads_major=False
        )
        assert q is not None
        if ref_qkv is None:
            ref_qkv = self.reference_qkv(ref_states, ref_temb, ref_rotary, need_query=ref_output_needed)
        qr, kr, vr = ref_qkv
        del ref_qkv
        batch, n_main = q.shape[0], q.shape[1]
        # The joint Q/K/V, [main; ref] along the sequence, in heads-major memory (any backend
        # reads them without a copy); the last expert block's queries are the main stream's.
        query = q if qr is None else heads_major_cat([q, _rows(qr, batch)])
        del q, qr
        key = heads_major_cat([k, _rows(kr, batch)])
        del k, kr
        value = heads_major_cat([v, _rows(vr, batch)])
        del v, vr
        out = self.attention_core(
            query, key, value, getattr(self.attn1.processor, "_attention_backend", None)
        )
        del query, key, value
        out = out.flatten(2, 3).type_as(hidden_states)
        attn_out = self.attn1.to_out[1](self.attn1.to_out[0](out[:, :n_main]))
        hidden_states = _gated_residual(hidden_states, attn_out, gate)
        del attn_out
        if not ref_output_needed:
            del out
            hidden_states = _cross_and_ffn(
                self.norm2, self.attn2, self.norm3, self.ffn, hidden_states, context, mod
            )
            return hidden_states, None

        assert ref_context is not None
        ref_out = self.attn1_mot_ref.to_out[1](self.attn1_mot_ref.to_out[0](out[:, n_main:]))
        del out
        rmod = _modulation(self.scale_shift_table_mot_ref, ref_temb)
        ref_states = _gated_residual(_rows(ref_states, batch), ref_out, rmod[2])
        del ref_out
        hidden_states = _cross_and_ffn(
            self.norm2, self.attn2, self.norm3, self.ffn, hidden_states, context, mod
        )
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
    _no_split_modules = ["VAPBlock", "VAPExpertBlock"]  # type: ignore[assignment]  # noqa: RUF012
    _repeated_blocks = ["VAPBlock", "VAPExpertBlock"]  # noqa: RUF012
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
        # Set False only to check (and count) the plain computation: every step recomputes the
        # context K/V and the first expert block's reference Q/K/V, and CFG rows that are views
        # of one row are computed twice up to the first cross-attention.
        self.reuse_step_invariants = True
        self._rotary = RotaryCache(attention_head_dim)
        # The split of the token streams over processes (`split_sequence`); None: all tokens here.
        self.sequence_split: TokenSplit | None = None

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
            [VAPExpertBlock(*args) if i in experts else VAPBlock(*args) for i in range(num_layers)]
        )

        self.norm_out = FP32LayerNorm(inner_dim, eps, elementwise_affine=False)
        self.proj_out = nn.Linear(inner_dim, out_channels * math.prod(patch_size))
        self.scale_shift_table = nn.Parameter(torch.randn(1, 2, inner_dim) / inner_dim**0.5)

    def set_attention_backend(self, backend: str) -> None:
        """diffusers' backends, plus `flash_4` (FlashAttention 4 from the `flash-attn-4` package),
        which every attention of this model reaches through `local_attention`."""
        if backend != FLASH_4:
            super().set_attention_backend(backend)
            return
        if not has_module("flash_attn.cute"):
            raise RuntimeError("the flash_4 backend needs the flash-attn-4 package")
        for module in self.modules():
            if isinstance(module, WanAttention):
                processor: Any = module.processor
                processor._attention_backend = FLASH_4

    # -- how the model may be split across GPUs (gpu.vap.split_plan) -------------------------
    @property
    def sequence_split_plan(self) -> SequenceSplitPlan:
        """The token streams may be split along the sequence; each self-attention exchanges its
        heads, so a world size must divide them (cross-attention keys are the whole context)."""
        return SequenceSplitPlan(heads=int(self.config["num_attention_heads"]))

    def split_sequence(self, split: TokenSplit | None) -> None:
        """Run every forward through `split`'s seams (None: all tokens on this process again):
        its shard and gather around the blocks, its attention as every block's self-attention."""
        self.sequence_split = split
        core: AttentionCore = local_attention if split is None else split.attention
        for block in self.blocks:
            assert isinstance(block, VAPBlock)  # plain and expert blocks alike
            block.attention_core = core

    # -- step-invariant inputs (once per video) --------------------------------------------
    def rotary(
        self, latent_grid: tuple[int, int, int], device: torch.device, reference: bool = False
    ) -> Rotary:
        """The rotary tables of one stream for latents of `latent_grid` (a bounded cache,
        `gpu.vap.rotary.RotaryCache`): the reference stream's temporal positions are -F..-1 (the
        reference numbers its frames from -latent_frames), the target's 0..F-1."""
        frames, height, width = latent_grid
        p_t, p_h, p_w = self.config["patch_size"]
        grid = (frames // p_t, height // p_h, width // p_w)
        return self._rotary.get(grid, -frames if reference else 0, device)

    def prepare_reference(
        self,
        hidden_states_mot_ref: torch.Tensor,
        encoder_hidden_states_mot_ref: torch.Tensor,
        encoder_hidden_states_image_mot_ref: torch.Tensor,
        timestep_mot_ref: float = 1.0,
    ) -> ReferenceContext:
        """Embed the reference stream once per generation (it does not change between steps):
        patch embedding, the "clean" time modulation, its context and each expert block's
        cross-attention K/V over it, the rotary tables.

        `hidden_states_mot_ref`: [1 or B, C_in, F, H, W] reference latents + mask + condition;
        the text/image embeddings carry the CFG batch (cond, uncond)."""
        _, _, frames, height, width = hidden_states_mot_ref.shape
        rotary = self.rotary((frames, height, width), hidden_states_mot_ref.device, reference=True)
        tokens = self.patch_embedding_mot_ref(hidden_states_mot_ref).flatten(2).transpose(1, 2).contiguous()
        timestep = torch.full((1,), timestep_mot_ref, device=tokens.device)
        _, proj, text, image = self.condition_embedder_mot_ref(
            timestep, encoder_hidden_states_mot_ref, encoder_hidden_states_image_mot_ref
        )
        assert image is not None
        context = torch.cat([image, text], dim=1)
        reference = ReferenceContext(
            tokens=tokens,
            timestep_proj=proj.unflatten(1, (6, -1)),
            encoder_hidden_states=context,
            rotary=rotary,
        )
        if self.reuse_step_invariants:
            reference.kv = self._reference_kv(context)
        return reference

    def _reference_kv(self, context: torch.Tensor) -> dict[int, ContextKV]:
        # Only the expert blocks whose reference output is used have a reference cross-attention.
        return {
            i: context_kv(block.attn2_mot_ref, context)
            for i, block in enumerate(self.blocks)
            if isinstance(block, VAPExpertBlock) and self._ref_output_needed(i)
        }

    def _ref_output_needed(self, index: int) -> bool:
        return not (self.skip_dead_reference_work and index == self.expert_blocks[-1])

    def prepare_context(
        self, encoder_hidden_states: torch.Tensor, encoder_hidden_states_image: torch.Tensor
    ) -> MainContext:
        """The target stream's context, once per generation: text/image embedding and every
        block's cross-attention K/V (the pipeline passes it as `context=` at every step)."""
        emb = self.condition_embedder
        assert emb.image_embedder is not None
        image = emb.image_embedder(encoder_hidden_states_image)
        context = torch.cat([image, emb.text_embedder(encoder_hidden_states)], dim=1)
        kv = [context_kv(block.attn2, context) for block in self.blocks if isinstance(block, VAPBlock)]
        return MainContext(dtype=encoder_hidden_states.dtype, kv=kv)

    def _time_embedding(
        self, timestep: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`WanTimeTextImageEmbedding`'s time branch alone (the text/image branches are per video)."""
        emb = self.condition_embedder
        t = emb.timesteps_proj(timestep)
        t_dtype = next(iter(emb.time_embedder.parameters())).dtype
        if t.dtype != t_dtype and t_dtype != torch.int8:
            t = t.to(t_dtype)
        temb = emb.time_embedder(t).to(dtype)
        return temb, emb.time_proj(emb.act_fn(temb)).unflatten(1, (6, -1))

    # -- forward ----------------------------------------------------------------------------
    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_hidden_states_image: torch.Tensor | None = None,
        hidden_states_mot_ref: torch.Tensor | None = None,
        encoder_hidden_states_mot_ref: torch.Tensor | None = None,
        encoder_hidden_states_image_mot_ref: torch.Tensor | None = None,
        reference: ReferenceContext | None = None,
        return_dict: bool = True,
        *,
        context: MainContext | None = None,
    ) -> Transformer2DModelOutput | tuple[torch.Tensor]:
        """Noise prediction for the target stream.

        Pass either the raw reference inputs (`*_mot_ref`) or a `reference` from
        `prepare_reference`, and either the raw context (`encoder_hidden_states*`) or a `context`
        from `prepare_context` (the pipeline computes both once per generation).

        CFG rows that are views of one row (the pipeline's `expand`: same latents, same timestep)
        are computed once up to the first cross-attention, where their contexts make them differ."""
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
        reuse = self.reuse_step_invariants
        if context is None or not reuse:
            if encoder_hidden_states is None or encoder_hidden_states_image is None:
                raise ValueError("the context inputs (or `context=`) are required")
            context = self.prepare_context(encoder_hidden_states, encoder_hidden_states_image)
        ref_kv = (
            reference.kv if reuse and reference.kv else self._reference_kv(reference.encoder_hidden_states)
        )

        batch, _, frames, height, width = hidden_states.shape
        p_t, p_h, p_w = self.config["patch_size"]
        grid = (frames // p_t, height // p_h, width // p_w)
        rotary = self.rotary((frames, height, width), hidden_states.device)

        if timestep.ndim == 0:
            timestep = timestep.expand(batch)
        # Identical rows cost one row until the first cross-attention (stride 0 = views of one row).
        shared = reuse and batch > 1 and hidden_states.stride(0) == 0 and timestep.stride(0) == 0
        rows = 1 if shared else batch
        x = self.patch_embedding(hidden_states[:rows]).flatten(2).transpose(1, 2).contiguous()
        temb, timestep_proj = self._time_embedding(timestep[:rows], context.dtype)

        # (the plain computation runs the reference stream per row from the start)
        ref: torch.Tensor | None = reference.tokens if reuse else reference.tokens.expand(batch, -1, -1)
        ref_rotary = reference.rotary
        if self.sequence_split is not None:  # this process's slice of both token streams
            x, rotary, ref, ref_rotary = self.sequence_split.shard(x, rotary, ref, ref_rotary)
        first_expert = self.expert_blocks[0] if self.expert_blocks else -1
        for i, block in enumerate(self.blocks):
            if isinstance(block, VAPExpertBlock):
                assert ref is not None
                needed = self._ref_output_needed(i)
                ref_qkv = None
                if i == first_expert:
                    ref_qkv = reference.first_expert_qkv if reuse else None
                    # (a cache filled for another token slice is recomputed, never mixed in)
                    if ref_qkv is None or ref_qkv[1].shape[1] != ref.shape[1]:
                        ref_qkv = block.reference_qkv(ref, reference.timestep_proj, ref_rotary, needed)
                        if reuse:
                            reference.first_expert_qkv = ref_qkv
                x, ref = block(
                    x,
                    context.kv[i],
                    timestep_proj,
                    rotary,
                    ref,
                    ref_kv.get(i) if needed else None,
                    reference.timestep_proj,
                    ref_rotary,
                    ref_output_needed=needed,
                    ref_qkv=ref_qkv,
                )
                del ref_qkv
            else:
                x = block(x, context.kv[i], timestep_proj, rotary)

        shift, scale = (self.scale_shift_table + temb.unsqueeze(1)).chunk(2, dim=1)
        x = self.proj_out(_modulated_norm(self.norm_out, x, scale, shift))
        if self.sequence_split is not None:  # all tokens again, in order
            x = self.sequence_split.gather(x)
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
