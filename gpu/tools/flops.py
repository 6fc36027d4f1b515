"""FLOPs of the VAP transformer, counted from the model on the meta device.

`count_step` runs our `WanTransformer3DMOTModel` on meta tensors under
`torch.utils.flop_counter.FlopCounterMode` (matmuls, convolutions, attention kernels; 2 FLOPs per
multiply-add): no weights, no memory, the released 14B layout in about a second. Two ways of
running a CFG step (batch 2):

- `steady=True`: as the pipeline runs steps 2..N: context K/V, the first expert block's reference
  Q/K/V and the reference embedding reused, CFG rows shared up to the first cross-attention;
- `steady=False`: every step computes everything (only the dead reference work after the last
  expert block skipped): the count in the project's GPU performance notes (2.377e15 at 480p/49).

`analytic_step_flops` is the same count written out from the layer shapes, independently of the
model code; a test holds the two equal on the tiny model.
"""

from __future__ import annotations

import argparse
import functools
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import torch

from gpu.vap.configs import RELEASED_14B_CONFIG
from gpu.vap.geometry import IMAGE_TOKENS, TEXT_TOKENS, geometry_of


@dataclass(frozen=True)
class StepFlops:
    total: int
    attention: int  # attention kernels (self, joint and cross)
    linear: int  # matmuls (projections, FFN, embedders)
    conv: int  # patch embedding

    def share(self, part: int) -> float:
        return part / self.total if self.total else 0.0


def _model(cfg: dict[str, Any]) -> Any:
    from gpu.vap.transformer import WanTransformer3DMOTModel

    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("meta"):
            return WanTransformer3DMOTModel(**cfg).eval()
    finally:
        torch.set_default_dtype(previous)


@functools.cache
def _count(cfg_items: tuple[tuple[str, Any], ...], grid: tuple[int, int, int], steady: bool) -> StepFlops:
    from torch.utils.flop_counter import FlopCounterMode

    from gpu.vap.metering import CudaKernels

    cfg = dict(cfg_items)
    model = _model(cfg)
    model.reuse_step_invariants = steady
    meta, dtype = torch.device("meta"), torch.bfloat16

    def rnd(*shape: int) -> torch.Tensor:
        return torch.empty(*shape, device=meta, dtype=dtype)

    f, h, w = grid
    text, image = rnd(2, TEXT_TOKENS, cfg["text_dim"]), rnd(2, IMAGE_TOKENS, cfg["image_dim"])
    latents = rnd(1, cfg["in_channels"], f, h, w)
    t = torch.tensor(999, device=meta)
    with torch.no_grad(), CudaKernels():
        reference = model.prepare_reference(rnd(1, cfg["in_channels"], f, h, w), text, image)
        if steady:
            context = model.prepare_context(text, image)
            step: dict[str, Any] = {"context": context}
            x, timestep = latents.expand(2, -1, -1, -1, -1), t.expand(2)
            model(x, timestep, reference=reference, **step)  # first step: fills the per-video memo
        else:
            step = {"encoder_hidden_states": text, "encoder_hidden_states_image": image}
            x, timestep = latents.expand(2, -1, -1, -1, -1).contiguous(), t.expand(2).contiguous()
        counter = FlopCounterMode(display=False)
        with counter:
            model(x, timestep, reference=reference, **step)
    by_op: dict[str, int] = defaultdict(int)
    for op, count in counter.get_flop_counts()["Global"].items():
        by_op[str(op)] += count
    attention = sum(v for k, v in by_op.items() if "attention" in k)
    conv = sum(v for k, v in by_op.items() if "convolution" in k)
    total = counter.get_total_flops()
    return StepFlops(total=total, attention=attention, conv=conv, linear=total - attention - conv)


def count_step(
    cfg: dict[str, Any], num_frames: int, height: int, width: int, steady: bool = True
) -> StepFlops:
    """FLOPs of one CFG step (batch 2) of `cfg`'s transformer for a video of this size."""
    items = tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in cfg.items()))
    return _count(items, geometry_of(cfg).latent_grid(num_frames, height, width), steady)


def analytic_step_flops(
    cfg: dict[str, Any], num_frames: int, height: int, width: int, steady: bool = True
) -> int:
    """The same count from the layer shapes (2 FLOPs per multiply-add), CFG batch 2."""
    d = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    ffn, freq = cfg["ffn_dim"], cfg["freq_dim"]
    p = cfg["patch_size"]
    s = geometry_of(cfg).tokens_per_stream(num_frames, height, width)
    ctx = TEXT_TOKENS + IMAGE_TOKENS
    experts = sorted(cfg["block_idx_with_mot_ref"])
    batch = 2

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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--frames", type=int, default=49)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=832)
    args = parser.parse_args(argv)
    for steady in (False, True):
        c = count_step(RELEASED_14B_CONFIG, args.frames, args.height, args.width, steady)
        label = "steady step (reuse)" if steady else "plain step"
        print(
            f"{label:<20} {c.total:.4e} FLOP  attention {c.share(c.attention):.1%}  "
            f"linear {c.share(c.linear):.1%}  conv {c.share(c.conv):.2%}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
