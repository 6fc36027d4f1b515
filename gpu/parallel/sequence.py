"""Sequence parallel for the VAP transformer: each rank runs every block on a slice of the tokens.

The transformer declares how it may be split (`gpu.vap.split_plan`); `apply_split` checks that
declaration against the world size and hands the model a `SequenceParallel`, whose three seams
the model's forward calls:
- `shard` after the patch embedding, before the first block: this rank's slice of the main and
  reference tokens and of their rotary tables. Everything per token (modulation, norms,
  projections, cross-attention against the context K/V, which every rank holds whole, FFN) then
  runs on the slice without communication. The first expert block's reference Q/K/V, cached in
  the `ReferenceContext` for the next steps, is computed after the shard, so each rank caches
  its own slice. CFG rows that are views of one row stay one row until the first
  cross-attention on every rank alike (the exchanges carry whatever batch the rows have).
- `attention_core` of every block (plain blocks: main stream; expert blocks: the joint
  [main; ref] attention): all-to-all of Q/K/V (sequence gathered, heads scattered), attention over
  the full sequence for H/N heads, inverse all-to-all of the output.
- `gather` after `proj_out` (64 channels per token instead of 5,120): all tokens, in order.

In an expert block a rank's local sequence is [main slice; ref slice], so after the exchange the
keys are in the order [m_0; r_0; m_1; r_1; …], a permutation of [main; ref]. Unmasked attention
does not depend on key order, and the inverse exchange returns each rank exactly its own query
rows, so the output equals the single-process one (tests/gpu/test_parallel_layout.py checks both).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

from gpu.parallel.layout import (
    bounds,
    heads_to_send,
    received_heads,
    received_sequence,
    sequence_to_send,
    split_sizes,
)
from gpu.vap.attention import local_attention
from gpu.vap.rotary import Rotary
from gpu.vap.split_plan import SequenceSplittable


class SequenceParallel:
    """The split of one forward's token streams over the ranks of `group`, and the exchanges (a
    `gpu.vap.split_plan.TokenSplit`)."""

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        group = group if group is not None else dist.group.WORLD
        if group is None:
            raise RuntimeError("torch.distributed is not initialised")
        self.group: dist.ProcessGroup = group
        self.rank = dist.get_rank(self.group)
        self.world = dist.get_world_size(self.group)
        # Local sequence length -> every rank's length, set by `shard` for the current forward:
        # main-only (plain blocks, the last expert block's queries) and [main; ref] (expert blocks).
        self._sizes: dict[int, list[int]] = {}
        self._main: list[int] = []
        self.last_split: tuple[list[int], list[int]] = ([], [])  # (main, ref) tokens per rank
        self.exchanges = 0  # all-to-alls done (the checks use it to prove the work was split)
        self.sent_elements = 0  # sent to other ranks by the all-to-alls of the last forward

    def shard(
        self, x: torch.Tensor, rotary: Rotary, ref: torch.Tensor | None, ref_rotary: Rotary
    ) -> tuple[torch.Tensor, Rotary, torch.Tensor, Rotary]:
        """This rank's slices of `[B, S, D]` main / `[B, S_ref, D]` reference tokens and their tables."""
        if ref is None:
            raise ValueError("the reference stream is required")
        main = split_sizes(x.shape[1], self.world)
        refs = split_sizes(ref.shape[1], self.world)
        joint = [m + r for m, r in zip(main, refs, strict=True)]
        # Both lengths differ (every ref slice has >= 1 token), so a length names its layout.
        self._sizes = {main[self.rank]: main, joint[self.rank]: joint}
        self._main = main
        self.last_split = (main, refs)
        self.sent_elements = 0
        lo, hi = bounds(main, self.rank)
        rlo, rhi = bounds(refs, self.rank)
        return (
            x[:, lo:hi].contiguous(),
            (rotary[0][:, lo:hi], rotary[1][:, lo:hi]),
            ref[:, rlo:rhi].contiguous(),
            (ref_rotary[0][:, rlo:rhi], ref_rotary[1][:, rlo:rhi]),
        )

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """`[B, S_r, C]` per rank → `[B, S, C]` on every rank (slices padded to one length to gather)."""
        longest = max(self._main)
        if x.shape[1] < longest:
            x = torch.nn.functional.pad(x, (0, 0, 0, longest - x.shape[1]))
        gathered = funcol.all_gather_single(x.contiguous(), gather_dim=1, group=self.group)
        pieces = gathered.split(longest, dim=1)
        return torch.cat([p[:, :n] for p, n in zip(pieces, self._main, strict=True)], dim=1)

    def _all_sizes(self, local: int) -> list[int]:
        try:
            return self._sizes[local]
        except KeyError:
            raise RuntimeError(
                f"attention over {local} local tokens does not match this forward's split {self._sizes}"
            ) from None

    def _exchange(self, buffer: torch.Tensor, receive: list[int], send: list[int]) -> torch.Tensor:
        self.exchanges += 1
        self.sent_elements += (buffer.numel() // buffer.shape[0]) * (sum(send) - send[self.rank])
        return funcol.all_to_all_single(buffer, receive, send, group=self.group)

    def _gather_sequence(self, x: torch.Tensor) -> torch.Tensor:
        sizes = self._all_sizes(x.shape[1])
        return received_sequence(
            self._exchange(heads_to_send(x, self.world), sizes, [x.shape[1]] * self.world)
        )

    def attention(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, backend: Any
    ) -> torch.Tensor:
        """Ulysses self-attention: same result as `local_attention` over all ranks' tokens."""
        rows = query.shape[1]
        out = local_attention(
            self._gather_sequence(query), self._gather_sequence(key), self._gather_sequence(value), backend
        )
        sizes = self._all_sizes(rows)
        back = self._exchange(sequence_to_send(out), [rows] * self.world, sizes)
        return received_heads(back, self.world)


def apply_split(model: SequenceSplittable, group: dist.ProcessGroup | None = None) -> SequenceParallel:
    """Split `model`'s forward over the ranks of `group` as it declares it may be (call on every
    rank); the returned split counts the exchanges."""
    split = SequenceParallel(group)
    model.sequence_split_plan.check(split.world)
    model.split_sequence(split)
    return split
