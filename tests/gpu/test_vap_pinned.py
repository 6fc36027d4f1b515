"""What keeping the encoders in pinned host memory really costs (the caching host allocator rounds
each pinned tensor up to a power of two)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from gpu.vap.offload import host_block_nbytes, pinned_nbytes
from gpu.vap.released import build_components


def test_pinned_blocks_are_the_next_power_of_two():
    assert [host_block_nbytes(n) for n in (0, 1, 2, 3, 1024, 1025, 3 * 2**30)] == [
        0, 1, 2, 4, 1024, 2048, 4 * 2**30,
    ]  # fmt: skip


def test_tied_tensors_are_pinned_once():
    layer = nn.Linear(3, 5)  # weight 60 B -> 64, bias 20 B -> 32
    module = nn.Sequential(layer, layer)
    assert pinned_nbytes(module) == 64 + 32


@pytest.mark.slow
def test_released_encoders_pin_far_more_than_their_weights():
    parts = build_components(with_transformer=False, with_safety=False)
    text = pinned_nbytes(parts.text_encoder)
    raw = sum(p.numel() * p.element_size() for p in parts.text_encoder.parameters())
    assert parts.text_encoder.shared.weight.device == torch.device("meta")
    assert round(raw / 1e9, 1) == 11.4 and round(text / 1e9, 1) == 15.0
    assert round(pinned_nbytes(parts.image_encoder) / 1e9, 2) == 3.23
