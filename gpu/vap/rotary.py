"""3-D rotary position tables for the Wan/VAP transformer (both token streams).

Angles are computed in float64 on the CPU once per (grid, temporal offset) and cached as float32
cos/sin on the target device, so the GPU hot path never touches float64. The layout is the one
diffusers' `WanAttnProcessor` consumes: `(cos, sin)`, each `[1, S, 1, head_dim]` with every value
repeated for the (real, imaginary) pair.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from gpu.vap.attention import empty_heads_major_like

Rotary = tuple[torch.Tensor, torch.Tensor]  # (cos, sin) of one token stream

_THETA = 10000.0


def axis_dims(head_dim: int) -> tuple[int, int, int]:
    """Channels given to the (time, height, width) axes: Wan splits 2·(d//6) to each spatial axis."""
    spatial = 2 * (head_dim // 6)
    return head_dim - 2 * spatial, spatial, spatial


def _axis_angles(dim: int, positions: torch.Tensor) -> torch.Tensor:
    # Same frequencies as diffusers.get_1d_rotary_pos_embed: theta^(-2i/dim), i < dim/2.
    inv = 1.0 / (_THETA ** (torch.arange(0, dim, 2, dtype=torch.float64)[: dim // 2] / dim))
    return torch.outer(positions.to(torch.float64), inv)


def rotary_tables(
    head_dim: int, grid: tuple[int, int, int], t_start: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin (float32, CPU) for a `frames×height×width` token grid, frames numbered from `t_start`.

    The reference stream uses `t_start = -frames` (temporally biased RoPE): its frames sit just
    before the target video's in time while sharing its spatial positions.
    """
    f, h, w = grid
    t_dim, h_dim, w_dim = axis_dims(head_dim)
    ang_t = _axis_angles(t_dim, torch.arange(t_start, t_start + f))
    ang_h = _axis_angles(h_dim, torch.arange(h))
    ang_w = _axis_angles(w_dim, torch.arange(w))
    angles = torch.cat(
        [
            ang_t[:, None, None, :].expand(f, h, w, -1),
            ang_h[None, :, None, :].expand(f, h, w, -1),
            ang_w[None, None, :, :].expand(f, h, w, -1),
        ],
        dim=-1,
    ).reshape(1, f * h * w, 1, head_dim // 2)
    angles = angles.repeat_interleave(2, dim=-1)
    return angles.cos().float(), angles.sin().float()


def table_bytes(head_dim: int, tokens: int) -> int:
    """Bytes of one stream's (cos, sin) tables on the device (float32)."""
    return 2 * tokens * head_dim * 4


# The most the cache keeps: both streams' tables of one video of the largest accepted size
# (720p, 121 frames: 111,600 tokens per stream, head_dim 128 -> 228.5 MB), with room to spare.
# A warm container serves every size in turn; without a bound it would keep every size's tables
# (~15 GB over all accepted sizes). The memory plan counts this bound as resident
# (gpu.vap.footprint), and a test holds it above the largest accepted video's tables.
CACHE_BYTES = 256 * 2**20


class RotaryCache:
    """Rotary tables per (grid, offset, device), least recently used evicted past `max_bytes`.

    Not a module, so `.to(dtype)` can't degrade it. The entry just made is always kept (a video
    larger than the bound still gets its tables: the others make room); an evicted table that a
    running forward still holds stays valid, the cache only forgets it."""

    def __init__(self, head_dim: int, max_bytes: int = CACHE_BYTES) -> None:
        self.head_dim = head_dim
        self.max_bytes = max_bytes
        self._cache: OrderedDict[tuple[int, int, int, int, str], Rotary] = OrderedDict()

    @property
    def nbytes(self) -> int:
        """Bytes of the tables the cache holds."""
        return sum(t.numel() * t.element_size() for pair in self._cache.values() for t in pair)

    def get(self, grid: tuple[int, int, int], t_start: int, device: torch.device) -> Rotary:
        key = (*grid, t_start, str(device))
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            return hit
        cos, sin = rotary_tables(self.head_dim, grid, t_start)
        hit = (cos.to(device), sin.to(device))
        self._cache[key] = hit
        while len(self._cache) > 1 and self.nbytes > self.max_bytes:
            self._cache.popitem(last=False)
        return hit


# The sequence is rotated in this many pieces, so the float32 temporaries are an eighth of the
# activations (bit-identical to one go). A fixed count, not a fixed size: the operations are then
# the same for every sequence length, which the memory plan relies on (gpu.vap.footprint).
ROTARY_PIECES = 8


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    c = cos[..., 0::2]
    s = sin[..., 1::2]
    return torch.stack((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1).flatten(-2)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate `[B, S, H, D]` pairs (x[2i], x[2i+1]) by the table angles; math in float32, piece by
    piece into an output of x's dtype (float32 intermediates of a whole 100k-token sequence would
    be several GiB). The output is in heads-major memory, the layout every attention kernel reads
    without a copy (`gpu.vap.attention`)."""
    out = empty_heads_major_like(x)
    pieces = zip(
        *(t.tensor_split(ROTARY_PIECES, dim=1) for t in (out, x, cos, sin)),
        strict=True,
    )
    for o, xs, c, s in pieces:
        o.copy_(_rotate(xs, c, s))
    return out
