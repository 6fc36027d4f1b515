"""How tokens and heads are laid out around a Ulysses all-to-all (pure tensor reshapes, no I/O).

A rank holds a slice of the sequence with all H heads, `[B, S_r, H, Dh]`. Before attention each
rank sends heads chunk j of its slice to rank j and receives every rank's slice of its own
H/N heads: `[B, S, H/N, Dh]` (sequence gathered, heads scattered). After attention the inverse
exchange gives each rank back its own rows with all heads. `torch.distributed.all_to_all_single`
exchanges along dim 0, so the send/receive buffers are laid out sequence-major here; slices may
be uneven (`split_sizes`), which the exchange supports directly: no padding, no masks.
"""

from __future__ import annotations

import torch

from gpu.vap.attention import heads_major


def split_sizes(length: int, world: int) -> list[int]:
    """Lengths of each rank's slice of `length` tokens: as even as possible, the first ones longer."""
    if length < world:
        raise ValueError(f"{length} tokens cannot be split over {world} processes (each needs one)")
    base, extra = divmod(length, world)
    return [base + (1 if r < extra else 0) for r in range(world)]


def bounds(sizes: list[int], rank: int) -> tuple[int, int]:
    """[start, end) of `rank`'s slice."""
    start = sum(sizes[:rank])
    return start, start + sizes[rank]


def heads_to_send(x: torch.Tensor, world: int) -> torch.Tensor:
    """`[B, S_r, H, Dh]` → `[N·S_r, B, H/N, Dh]`: rows `j·S_r … (j+1)·S_r` are heads chunk j (for rank j)."""
    batch, seq, heads, dim = x.shape
    if heads % world:
        raise ValueError(f"{heads} heads do not split over {world} processes")
    return x.reshape(batch, seq, world, heads // world, dim).permute(2, 1, 0, 3, 4).flatten(0, 1).contiguous()


def received_sequence(y: torch.Tensor) -> torch.Tensor:
    """`[S, B, H/N, Dh]` (every rank's rows of this rank's heads, in rank order) → `[B, S, H/N, Dh]`
    in heads-major memory (`gpu.vap.attention.heads_major`: one copy, after which `y` can go),
    the layout every attention kernel reads as it is (cuDNN would copy a permuted view, and its
    output, again)."""
    return heads_major(y.permute(1, 0, 2, 3))


def sequence_to_send(out: torch.Tensor) -> torch.Tensor:
    """`[B, S, H/N, Dh]` → `[S, B, H/N, Dh]`: rank j's rows are a contiguous block (send them back)."""
    return out.permute(1, 0, 2, 3).contiguous()


def received_heads(y: torch.Tensor, world: int) -> torch.Tensor:
    """`[N·S_r, B, H/N, Dh]` (heads chunk j from rank j, for this rank's rows) → `[B, S_r, H, Dh]`."""
    rows, batch, heads, dim = y.shape
    return y.reshape(world, rows // world, batch, heads, dim).permute(2, 1, 0, 3, 4).flatten(2, 3)
