"""FLOPs of the VAP transformer counted by torch, on the model itself (meta device).

    python -m gpu.tools.flop_count --frames 49 --height 480 --width 832

`count_step` runs our `WanTransformer3DMOTModel` on meta tensors under
`torch.utils.flop_counter.FlopCounterMode` (matmuls, convolutions, attention kernels; 2 FLOPs per
multiply-add): no weights, no memory, the released 14B layout in about a second, split into
attention, linear and convolution work. Two ways of running a CFG step (batch 2):

- `steady=True`: as the pipeline runs steps 2..N: context K/V, the first expert block's reference
  Q/K/V and the reference embedding reused, CFG rows shared up to the first cross-attention;
- `steady=False`: every step computes everything (only the dead reference work after the last
  expert block skipped): the count in the project's GPU performance notes (2.377e15 at 480p/49).

The formula in `gpu.tools.flops` is the same count from the layer shapes; tests hold the two
equal, on tiny layouts and on the released one.
"""

from __future__ import annotations

import argparse
import functools
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from gpu.vap.configs import RELEASED_14B_CONFIG
from gpu.vap.geometry import IMAGE_TOKENS, TEXT_TOKENS, geometry_of
from gpu.vap.metering import CudaKernels
from gpu.vap.transformer import WanTransformer3DMOTModel


@dataclass(frozen=True)
class StepFlops:
    total: int
    attention: int  # attention kernels (self, joint and cross)
    linear: int  # matmuls (projections, FFN, embedders)
    conv: int  # patch embedding

    def share(self, part: int) -> float:
        return part / self.total if self.total else 0.0


def _model(cfg: dict[str, Any]) -> Any:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("meta"):
            return WanTransformer3DMOTModel(**cfg).eval()
    finally:
        torch.set_default_dtype(previous)


@functools.cache
def _count(cfg_items: tuple[tuple[str, Any], ...], grid: tuple[int, int, int], steady: bool) -> StepFlops:
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
