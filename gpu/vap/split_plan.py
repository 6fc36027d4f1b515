"""How the VAP transformer may be split across GPUs: its declaration, which `gpu.parallel` applies.

Everything the transformer does per token (modulation, norms, projections, cross-attention
against the context K/V, which every process holds whole, FFN) runs on any slice of the tokens
without communication; only self-attention mixes tokens, and its heads are independent of each
other. So the model may run split along the sequence (Ulysses): each process holds a slice of
both token streams, and every self-attention trades the sequence for the heads and back. The
model declares that split (`SequenceSplitPlan`: what it must respect) and calls three seams of
the `TokenSplit` it is given:

- `shard`, after the patch embedding and before the first block: this process's slice of the
  main and reference tokens and of their rotary tables;
- `attention`, every block's self-attention core (plain blocks: the main stream; expert blocks:
  the joint [main; ref] attention), in place of the local one;
- `gather`, after `proj_out`: all tokens again, in order.

`gpu.parallel.sequence` implements a `TokenSplit` over a process group and applies the plan;
the model never imports it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from gpu.vap.rotary import Rotary

# (query, key, value [B, S, H, Dh], backend) -> [B, S_q, H, Dh]: the self-attention seam.
AttentionCore = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Any], torch.Tensor]


class TokenSplit(Protocol):
    """The seams a split forward goes through (one process's side of it)."""

    def shard(
        self, x: torch.Tensor, rotary: Rotary, ref: torch.Tensor | None, ref_rotary: Rotary
    ) -> tuple[torch.Tensor, Rotary, torch.Tensor, Rotary]:
        """This process's slices of `[B, S, D]` main / `[B, S_ref, D]` reference tokens and tables."""
        ...

    def attention(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, backend: Any
    ) -> torch.Tensor:
        """Self-attention over every process's tokens for this process's query rows."""
        ...

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """`[B, S_r, C]` on each process → `[B, S, C]` (all tokens, in order) on every process."""
        ...


@dataclass(frozen=True)
class SequenceSplitPlan:
    """What a split along the sequence must respect."""

    heads: int  # every self-attention's heads: the exchange hands each process heads / world

    def check(self, world: int) -> None:
        """Raise `ValueError` unless `world` processes can share the work."""
        if self.heads % world:
            raise ValueError(f"{self.heads} attention heads do not split over {world} processes")


class SequenceSplittable(Protocol):
    """A model that declares its split and runs through the seams of the one it is given."""

    @property
    def sequence_split_plan(self) -> SequenceSplitPlan: ...

    def split_sequence(self, split: TokenSplit | None) -> None: ...
