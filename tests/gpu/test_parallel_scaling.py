"""The scaling estimate's inputs are counted from the real model (its FLOPs are the one formula,
gpu.tools.flops); its table behaves as a cost model needs."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from vap_shared.contract import GPU_COUNTS

from gpu.tools.flops import analytic_step_flops
from gpu.tools.scaling import (
    H100,
    H200,
    JobShape,
    all_to_all_bytes_per_gpu,
    estimate,
    format_table,
    main,
    step_flops,
    table,
)
from gpu.vap.configs import RELEASED_14B_CONFIG
from gpu.vap.geometry import IMAGE_TOKENS, RELEASED, TEXT_TOKENS
from gpu.vap.tiny import TINY_TRANSFORMER_CONFIG
from gpu.vap.transformer import WanTransformer3DMOTModel


@pytest.fixture(scope="module")
def meta_model():
    with torch.device("meta"):
        return WanTransformer3DMOTModel(**RELEASED_14B_CONFIG)


@pytest.mark.slow
@pytest.mark.parametrize("steady", [True, False], ids=["steady", "plain"])
@pytest.mark.parametrize(
    "shape", [JobShape(), JobShape(720, 1280, 9), JobShape(1024, 576, 121, cfg=False)], ids=str
)
def test_analytic_step_flops_equal_torch_flop_counter_on_the_released_model(meta_model, shape, steady):
    """Steady: a step as the pipeline runs it after the first (context K/V prepared once, block 0's
    reference Q/K/V cached, CFG rows passed as views of one row); plain: everything recomputed."""
    f, h, w = RELEASED.latent_grid(shape.num_frames, shape.height, shape.width)
    b = shape.batch
    meta_model.reuse_step_invariants = steady
    with torch.device("meta"), torch.no_grad():
        text, image = torch.randn(b, TEXT_TOKENS, 4096), torch.randn(b, IMAGE_TOKENS, 1280)
        ref = meta_model.prepare_reference(torch.randn(1, 36, f, h, w), text, image)
        latents, t = torch.randn(1, 36, f, h, w).expand(b, -1, -1, -1, -1), torch.tensor(500.0).expand(b)
        if steady:
            step = {"context": meta_model.prepare_context(text, image)}
            meta_model(latents, t, reference=ref, **step)  # the first step fills the per-video memo
        else:
            step = {"encoder_hidden_states": text, "encoder_hidden_states_image": image}
        with FlopCounterMode(display=False) as counter:
            meta_model(latents, t, reference=ref, return_dict=False, **step)
    meta_model.reuse_step_invariants = True
    assert step_flops(shape, steady=steady) == pytest.approx(counter.get_total_flops(), rel=1e-9)


def test_default_job_figures_match_the_notes():
    shape = JobShape()
    assert shape.tokens == 20280
    assert step_flops(shape, steady=False) == pytest.approx(2.377e15, rel=1e-3)  # ../shared/notes
    assert step_flops(shape) == pytest.approx(2.3236e15, rel=1e-4)  # docs/model.md, steady step
    assert all_to_all_bytes_per_gpu(shape, 8, steady=False) == pytest.approx(9.0e9, rel=0.01)
    assert all_to_all_bytes_per_gpu(shape, 8) == pytest.approx(8.81e9, rel=0.01)  # block 0 at one row
    assert all_to_all_bytes_per_gpu(shape, 1) == 0.0


def test_all_to_all_volume_formula_matches_what_the_tiny_run_sends():
    # `python -m gpu.tools.check_parallel --world-size 2 4` reports 3024 elements sent by rank 0 per forward
    # at world 2 (tiny model: 3 blocks, experts 0-1, 4 heads × 6, 48×32 px, 9 frames, CFG rows shared
    # in block 0: 3888 if they were not).
    tiny = {**TINY_TRANSFORMER_CONFIG, "num_attention_heads": 4, "attention_head_dim": 6}
    assert all_to_all_bytes_per_gpu(JobShape(48, 32, 9), 2, tiny) == 3024 * 2
    assert all_to_all_bytes_per_gpu(JobShape(48, 32, 9), 2, tiny, steady=False) == 3888 * 2


def test_the_estimate_prices_the_one_flop_formula():
    # The compute time is the formula's FLOPs at the assumed rate: no second count of its own.
    for shape in (JobShape(), JobShape(1280, 720, 121, 50), JobShape(720, 1280, 9, 30, cfg=False)):
        rate = H100.peak_tflops * 1e12 * H100.efficiency
        formula = analytic_step_flops(
            RELEASED_14B_CONFIG, shape.num_frames, shape.height, shape.width, batch=shape.batch
        )
        assert step_flops(shape) == formula
        for gpus in (1, 8):
            assert estimate(shape, gpus).compute_s == pytest.approx(formula / (gpus * rate), rel=1e-12)


def test_table_trades_cost_for_latency():
    rows = table(JobShape())
    assert [r.gpus for r in rows] == list(GPU_COUNTS)
    assert all(a.total_s > b.total_s for a, b in itertools.pairwise(rows))
    assert all(a.cost_usd < b.cost_usd for a, b in itertools.pairwise(rows))
    one, eight = rows[0], rows[-1]
    assert one.speedup == 1.0 and 6.0 < eight.speedup < 8.0
    assert eight.cost_usd == pytest.approx(8 * H100.price_per_gpu_s * eight.total_s)
    assert estimate(JobShape(), 8, H200).cost_usd > eight.cost_usd  # same speed, dearer GPU


def test_refuses_counts_the_service_does_not_offer():
    with pytest.raises(ValueError):
        estimate(JobShape(), 3)


def test_cli_labels_the_figures_as_estimates(capsys):
    assert main(["--resolution", "720p", "--aspect", "9:16", "--frames", "121"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("ESTIMATE (not measured): 720x1280, 121 frames")
    assert len(out.strip().splitlines()) == 2 + 4
    assert "ESTIMATE" in format_table(JobShape())
