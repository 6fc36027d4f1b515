"""The transformer's declared split (gpu/vap/split_plan.py) and gpu.parallel applying it."""

from __future__ import annotations

import socket
from datetime import timedelta
from typing import Any

import pytest
import torch
import torch.distributed as dist

from gpu.parallel.sequence import SequenceParallel, apply_split
from gpu.vap.attention import local_attention
from gpu.vap.geometry import TEXT_TOKENS
from gpu.vap.rotary import Rotary
from gpu.vap.split_plan import SequenceSplitPlan
from gpu.vap.tiny import IMAGE_DIM, TEXT_DIM, build_tiny_transformer


class RecordingSplit:
    """A one-process `TokenSplit`: every token stays here; it counts the seams it is called at."""

    def __init__(self) -> None:
        self.calls = {"shard": 0, "attention": 0, "gather": 0}

    def shard(
        self, x: torch.Tensor, rotary: Rotary, ref: torch.Tensor | None, ref_rotary: Rotary
    ) -> tuple[torch.Tensor, Rotary, torch.Tensor, Rotary]:
        assert ref is not None
        self.calls["shard"] += 1
        return x, rotary, ref, ref_rotary

    def attention(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, backend: Any
    ) -> torch.Tensor:
        self.calls["attention"] += 1
        return local_attention(query, key, value, backend)

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        self.calls["gather"] += 1
        return x


def _inputs(seed: int = 0) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    return {
        "hidden_states": torch.randn(2, 36, 3, 4, 6, generator=g),
        "timestep": torch.tensor([700, 700]),
        "encoder_hidden_states": torch.randn(2, TEXT_TOKENS, TEXT_DIM, generator=g),
        "encoder_hidden_states_image": torch.randn(2, 5, IMAGE_DIM, generator=g),
        "hidden_states_mot_ref": torch.randn(1, 36, 3, 4, 6, generator=g),
        "encoder_hidden_states_mot_ref": torch.randn(2, TEXT_TOKENS, TEXT_DIM, generator=g),
        "encoder_hidden_states_image_mot_ref": torch.randn(2, 5, IMAGE_DIM, generator=g),
        "return_dict": False,
    }


def test_the_model_declares_its_heads_as_what_a_split_must_divide():
    model = build_tiny_transformer()
    assert model.sequence_split_plan == SequenceSplitPlan(heads=2)
    model.sequence_split_plan.check(2)
    with pytest.raises(ValueError, match="2 attention heads do not split over 4 processes"):
        model.sequence_split_plan.check(4)


@torch.no_grad()
def test_a_given_split_takes_every_seam_and_none_gives_them_back():
    model = build_tiny_transformer().eval()
    want = model(**_inputs())[0]
    split = RecordingSplit()
    model.split_sequence(split)
    got = model(**_inputs())[0]
    # Once around the blocks, and every block's self-attention (plain and expert alike).
    assert split.calls == {"shard": 1, "attention": len(model.blocks), "gather": 1}
    assert torch.equal(got, want)
    model.split_sequence(None)
    assert model.sequence_split is None
    assert torch.equal(model(**_inputs())[0], want) and split.calls["attention"] == len(model.blocks)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@torch.no_grad()
def test_apply_split_on_one_rank_runs_the_exchanges_and_changes_nothing():
    model = build_tiny_transformer().eval()
    want = model(**_inputs())[0]
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{_free_port()}",
        rank=0,
        world_size=1,
        timeout=timedelta(seconds=60),
    )
    try:
        split = apply_split(model)
        assert isinstance(split, SequenceParallel) and model.sequence_split is split
        got = model(**_inputs())[0]
    finally:
        dist.destroy_process_group()
    assert split.exchanges > 0  # the all-to-all path ran (with one rank it moves nothing)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
