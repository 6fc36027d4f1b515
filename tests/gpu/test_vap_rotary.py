"""gpu/vap/rotary.py: the rotary tables' cache stays bounded however many sizes a container serves."""

from __future__ import annotations

import math

import pytest
import torch

from gpu.tools.plan import accepted_sizes, gpu_frame_counts
from gpu.vap import rotary
from gpu.vap.configs import RELEASED_14B_CONFIG
from gpu.vap.geometry import RELEASED
from gpu.vap.rotary import CACHE_BYTES, RotaryCache, table_bytes

HEAD_DIM = int(RELEASED_14B_CONFIG["attention_head_dim"])
META = torch.device("meta")


def _video_grids() -> list[tuple[int, int, int]]:
    """The token grid of every accepted job, in the order a warm container might meet them."""
    grids = []
    for _, _, width, height in accepted_sizes():
        for frames in gpu_frame_counts():
            grids.append(RELEASED.token_grid(RELEASED.latent_grid(frames, height, width)))
    return grids


@pytest.fixture
def shapes_only(monkeypatch):
    # The cache is under test, not the angles: tables of the right shape without the float64
    # work (348 real tables would take a minute).
    def tables(head_dim, grid, t_start=0):
        f, h, w = grid
        return torch.empty(1, f * h * w, 1, head_dim), torch.empty(1, f * h * w, 1, head_dim)

    monkeypatch.setattr(rotary, "rotary_tables", tables)


def test_a_warm_containers_cache_stays_bounded_over_every_accepted_size(shapes_only):
    cache = RotaryCache(HEAD_DIM)
    for grid in _video_grids():
        frames = grid[0]
        reference = cache.get(grid, -frames, META)
        target = cache.get(grid, 0, META)
        # Both streams of the video being served are there, and the cache holds no more than its bound.
        assert cache.get(grid, -frames, META) is reference and cache.get(grid, 0, META) is target
        assert cache.nbytes <= CACHE_BYTES
    assert cache.nbytes > 0


def test_the_bound_holds_the_largest_accepted_videos_two_streams():
    largest = max(math.prod(grid) for grid in _video_grids())
    assert largest == 31 * 45 * 80  # 720p, 121 frames
    assert 2 * table_bytes(HEAD_DIM, largest) <= CACHE_BYTES


def test_least_recently_used_tables_go_first_and_a_table_larger_than_the_bound_is_still_served(
    shapes_only,
):
    one = table_bytes(4, 8)  # a (1, 2, 4) grid
    cache = RotaryCache(4, max_bytes=2 * one)
    a, b = cache.get((1, 2, 4), 0, META), cache.get((1, 2, 4), -1, META)
    assert cache.get((1, 2, 4), 0, META) is a  # a used again: b is now the oldest
    cache.get((1, 4, 2), 0, META)
    assert cache.get((1, 2, 4), 0, META) is a and cache.nbytes == 2 * one
    assert cache.get((1, 2, 4), -1, META) is not b  # evicted, made again
    huge = cache.get((4, 4, 4), 0, META)
    assert huge[0].shape[1] == 64 and cache.nbytes == table_bytes(4, 64)  # alone, over the bound


def test_the_memory_plan_counts_the_bound_as_resident():
    from gpu.service import routing
    from gpu.tools import plan

    weights = routing.read_table()["weights"]
    assert weights["rotary_cache"] == CACHE_BYTES
    phases = {"encode": 0, "vae_encode": 0, "denoise": 0, "vae_decode": 0}
    without = {**weights, "rotary_cache": 0}
    assert plan.peak_bytes(weights, phases, True) - plan.peak_bytes(without, phases, True) == CACHE_BYTES
