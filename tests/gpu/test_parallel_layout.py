"""Ulysses layout on one process: the all-to-all is simulated, the reshapes are the real ones."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn
from vap_shared.contract import LANDSCAPE_SIZES, NUM_FRAMES_MAX, NUM_FRAMES_MIN

from gpu.parallel.layout import (
    bounds,
    heads_to_send,
    received_heads,
    received_sequence,
    sequence_to_send,
    split_sizes,
)
from gpu.vap.geometry import RELEASED


def _attention(q, k, v):
    return dispatch_attention_fn(q, k, v, dropout_p=0.0, is_causal=False)


def _all_to_all(sent: list[torch.Tensor], send_sizes: list[list[int]]) -> list[torch.Tensor]:
    """`all_to_all_single` along dim 0: rank j gets block j of every rank's buffer, in rank order."""
    world = len(sent)
    blocks = [list(buf.split(sizes, dim=0)) for buf, sizes in zip(sent, send_sizes, strict=True)]
    return [torch.cat([blocks[src][dst] for src in range(world)], dim=0) for dst in range(world)]


def _ulysses(qs, ks, vs, world):
    """Per-rank [B, S_r, H, Dh] slices in, per-rank outputs out: `SequenceParallel.attention`'s steps."""

    def gather(xs):
        return [received_sequence(y) for y in _all_to_all([heads_to_send(x, world) for x in xs],
                                                          [[x.shape[1]] * world for x in xs])]  # fmt: skip

    q_full, k_full, v_full = gather(qs), gather(ks), gather(vs)
    outs = [_attention(q, k, v) for q, k, v in zip(q_full, k_full, v_full, strict=True)]
    q_sizes = [q.shape[1] for q in qs]
    back = _all_to_all([sequence_to_send(o) for o in outs], [q_sizes] * world)
    return [received_heads(b, world) for b in back]


def _slices(x, sizes):
    return [x[:, slice(*bounds(sizes, r))] for r in range(len(sizes))]


def test_split_sizes_even_uneven_and_too_short():
    assert split_sizes(20280, 8) == [2535] * 8
    assert split_sizes(18, 4) == [5, 5, 4, 4]
    assert bounds([5, 5, 4, 4], 2) == (10, 14)
    with pytest.raises(ValueError, match="cannot be split"):
        split_sizes(3, 4)


def test_heads_must_divide():
    with pytest.raises(ValueError, match="heads"):
        heads_to_send(torch.zeros(1, 4, 6, 2), 4)


def test_key_order_is_irrelevant_to_unmasked_attention():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 11, 3, 8, generator=g) for _ in range(3))
    perm = torch.randperm(11, generator=g)
    torch.testing.assert_close(
        _attention(q, k[:, perm], v[:, perm]), _attention(q, k, v), rtol=1e-6, atol=1e-6
    )


@pytest.mark.parametrize("world", [2, 4])
def test_plain_self_attention_matches_one_process(world):
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 18, 4, 6, generator=g) for _ in range(3))
    sizes = split_sizes(18, world)
    outs = _ulysses(_slices(q, sizes), _slices(k, sizes), _slices(v, sizes), world)
    torch.testing.assert_close(torch.cat(outs, dim=1), _attention(q, k, v), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("queries", ["main+ref", "main only"])
def test_joint_attention_with_interleaved_slices_matches_one_process(world, queries):
    """Each rank holds [main slice; ref slice]: the gathered keys are [m0; r0; m1; r1; ...], yet
    every rank gets exactly its own rows of attention over [main; ref] (uneven slices too)."""
    g = torch.Generator().manual_seed(2)
    n_main, n_ref = 18, 13
    main = [torch.randn(2, n_main, 4, 6, generator=g) for _ in range(3)]
    ref = [torch.randn(2, n_ref, 4, 6, generator=g) for _ in range(3)]
    ms, rs = split_sizes(n_main, world), split_sizes(n_ref, world)
    local = [
        [torch.cat([m, r], dim=1) for m, r in zip(_slices(main[i], ms), _slices(ref[i], rs), strict=True)]
        for i in range(3)
    ]
    # The last expert block: queries from the main stream only, keys/values from both.
    qs = _slices(main[0], ms) if queries == "main only" else local[0]
    outs = _ulysses(qs, local[1], local[2], world)

    full_q = main[0] if queries == "main only" else torch.cat([main[0], ref[0]], dim=1)
    want = _attention(full_q, torch.cat([main[1], ref[1]], dim=1), torch.cat([main[2], ref[2]], dim=1))
    want_main, want_ref = want[:, :n_main], want[:, n_main:]
    for r, out in enumerate(outs):
        torch.testing.assert_close(out[:, : ms[r]], want_main[:, slice(*bounds(ms, r))], rtol=1e-5, atol=1e-6)
        if queries == "main+ref":
            torch.testing.assert_close(
                out[:, ms[r] :], want_ref[:, slice(*bounds(rs, r))], rtol=1e-5, atol=1e-6
            )


def test_every_accepted_size_splits_evenly_over_2_4_8():
    """Tokens per stream of every accepted size (the released geometry): all divide by 8,
    so production never takes the uneven path (which works, see above) and 40 heads divide too."""
    sizes = [*LANDSCAPE_SIZES.values(), *[(h, w) for w, h in LANDSCAPE_SIZES.values()]]
    seen = 0
    for width, height in sizes:
        for frames in range(NUM_FRAMES_MIN, NUM_FRAMES_MAX + 1, 4):
            tokens = RELEASED.tokens_per_stream(frames, height, width)
            for world in (2, 4, 8):
                assert tokens % world == 0 and 40 % world == 0, (width, height, frames, world)
            seen += 1
    assert seen == 6 * 29
