"""FLOPs of one denoising step of the VAP transformer, from its layer shapes: THE formula.

The scaling estimate (`gpu.tools.scaling`) prices GPU counts with it; `gpu.tools.flop_count`
counts the same FLOPs with torch on the model itself, and tests hold the two equal (tiny layouts
with the expert blocks in various places, and the released 14B layout). 2 FLOPs per
multiply-add. Pure Python: the API container's routing estimates run times with it.

- `steady=True` (default): a step as the pipeline runs steps 2..N: the context embedding, every
  block's context K/V and the first expert block's reference Q/K/V are computed once per video,
  and the CFG rows (views of one row) share the patch/time embedding and block 0 up to its
  cross-attention;
- `steady=False`: everything recomputed at every step (only the reference work that never reaches
  the output, after the last expert block, skipped).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from gpu.vap.geometry import IMAGE_TOKENS, TEXT_TOKENS, geometry_of


def analytic_step_flops(
    cfg: Mapping[str, Any], num_frames: int, height: int, width: int, steady: bool = True, batch: int = 2
) -> int:
    """FLOPs of one transformer forward of `cfg`'s layout for a video of this size: `batch` rows
    (2: CFG's conditional and unconditional rows in one call; 1: no CFG)."""
    d = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    ffn, freq = cfg["ffn_dim"], cfg["freq_dim"]
    p = cfg["patch_size"]
    s = geometry_of(cfg).tokens_per_stream(num_frames, height, width)
    ctx = TEXT_TOKENS + IMAGE_TOKENS
    experts = sorted(set(cfg["block_idx_with_mot_ref"]))

    def linear(tokens: int, fan_in: int, fan_out: int) -> int:
        return 2 * tokens * fan_in * fan_out

    qkvo, q_or_o = 4 * linear(s, d, d), linear(s, d, d)
    ffn_flops = linear(s, d, ffn) + linear(s, ffn, d)
    context_kv = 2 * linear(TEXT_TOKENS, d, d) + 2 * linear(IMAGE_TOKENS, d, d)
    cross_core = 4 * s * ctx * d
    embed_context = (  # text: d_text -> d -> d; image: d_img -> d_img -> d
        linear(TEXT_TOKENS, cfg["text_dim"], d)
        + linear(TEXT_TOKENS, d, d)
        + linear(IMAGE_TOKENS, cfg["image_dim"], cfg["image_dim"])
        + linear(IMAGE_TOKENS, cfg["image_dim"], d)
    )
    patch = 2 * s * cfg["in_channels"] * p[0] * p[1] * p[2] * d
    time = linear(1, freq, d) + linear(1, d, d) + linear(1, d, 6 * d)
    proj_out = linear(s, d, cfg["out_channels"] * p[0] * p[1] * p[2])

    # Per row of the CFG batch (each row has its own context).
    row = proj_out + patch + time
    shared = 0  # work on the rows' common input before the first cross-attention (once if steady)
    invariant = embed_context  # per video if steady
    for i in range(cfg["num_layers"]):
        row += 2 * q_or_o + ffn_flops + cross_core  # cross Q/O, FFN, cross core
        invariant += context_kv
        if i not in experts:
            self_part = qkvo + 4 * s * s * d
        elif i != experts[-1]:
            ref_qkv = 3 * linear(s, d, d)
            self_part = qkvo + linear(s, d, d) + 4 * (2 * s) * (2 * s) * d  # + reference O
            row += 2 * q_or_o + ffn_flops + cross_core  # reference cross Q/O, FFN, cross core
            invariant += context_kv
            if i == experts[0]:
                invariant += ref_qkv  # its input never changes
            else:
                self_part += ref_qkv
        else:  # last expert: reference K/V only, main queries over both streams
            self_part = qkvo + 4 * s * (2 * s) * d
            if i == experts[0]:
                invariant += 2 * linear(s, d, d)
            else:
                self_part += 2 * linear(s, d, d)
        if i == 0:
            shared += self_part
        else:
            row += self_part
    if not steady:
        return batch * (row + shared + invariant)
    # Steady: per-video work gone, the shared part (patch, time, block 0 before cross) once.
    return batch * (row - patch - time) + patch + time + shared
