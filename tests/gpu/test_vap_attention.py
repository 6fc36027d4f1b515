"""gpu/vap/attention.py: every shape is checked on first use and a kernel wrong on one shape is
replaced for that shape only; every backend reads the model's Q/K/V without copies."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn

from gpu.vap import attention
from gpu.vap.attention import local_attention


def _qkv(batch: int, seq: int, heads: int = 2, dim: int = 8, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, seq, heads, dim, generator=g) for _ in range(3)]


def _math(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return dispatch_attention_fn(q, k, v)


@pytest.fixture
def fresh(monkeypatch):
    """No shape checked yet in this test."""
    monkeypatch.setattr(attention, "_SERVED", {})


def test_a_kernel_wrong_on_one_shape_is_replaced_for_that_shape_only(monkeypatch, fresh):
    calls: list[int] = []

    def wrong_on_long(q, k, v):  # right up to 40 keys, then off (as a kernel overflowing an index)
        calls.append(k.shape[1])
        out = _math(q, k, v)
        return out * 3 if k.shape[1] > 40 else out

    monkeypatch.setitem(attention.KERNELS, "wrong_on_long", wrong_on_long)
    short, long = _qkv(2, 24), _qkv(2, 64, seed=1)
    assert torch.allclose(local_attention(*short, "wrong_on_long"), _math(*short), atol=1e-6)
    assert torch.allclose(local_attention(*long, "wrong_on_long"), _math(*long), atol=1e-6)
    served = attention.served_shapes()
    assert sorted(served.values()) == ["native", "wrong_on_long"]
    calls.clear()
    local_attention(*short, "wrong_on_long")
    local_attention(*long, "wrong_on_long")
    assert calls == [24]  # still serves the short shape; the long one goes straight to torch SDPA


def test_each_layout_is_checked_on_its_own(monkeypatch, fresh):
    # The sequence-parallel exchange hands the kernel a permuted view ([S, B, H, D] memory).
    def wrong_when_permuted(q, k, v):
        out = _math(q, k, v)
        return out if q.is_contiguous() else -out

    monkeypatch.setitem(attention.KERNELS, "wrong_when_permuted", wrong_when_permuted)
    plain = _qkv(2, 16)
    permuted = [t.permute(1, 0, 2, 3).contiguous().permute(1, 0, 2, 3) for t in _qkv(2, 16, seed=2)]
    local_attention(*plain, "wrong_when_permuted")
    out = local_attention(*permuted, "wrong_when_permuted")
    assert torch.allclose(out, _math(*permuted), atol=1e-6)
    assert sorted(attention.served_shapes().values()) == ["native", "wrong_when_permuted"]


def test_the_check_reads_the_last_rows_where_offsets_are_largest(monkeypatch, fresh):
    def wrong_last_row(q, k, v):
        out = _math(q, k, v).clone()
        out[-1, -1, -1] = 0.0  # only the very last row of the last head: a 32-bit offset overflow
        return out

    monkeypatch.setitem(attention.KERNELS, "wrong_last_row", wrong_last_row)
    q, k, v = _qkv(2, 300, heads=3)
    assert torch.equal(local_attention(q, k, v, "wrong_last_row"), _math(q, k, v).contiguous())
    assert list(attention.served_shapes().values()) == ["native"]


def test_a_kernel_that_raises_on_a_shape_falls_back(monkeypatch, fresh):
    def unsupported(q, k, v):
        raise RuntimeError("head dim not supported")

    monkeypatch.setitem(attention.KERNELS, "unsupported", unsupported)
    q, k, v = _qkv(1, 10)
    assert torch.allclose(local_attention(q, k, v, "unsupported"), _math(q, k, v), atol=1e-6)


def test_no_kernel_right_for_a_shape_is_an_error_naming_it(monkeypatch, fresh):
    def wrong(q, k, v):
        return torch.zeros_like(q)

    monkeypatch.setitem(attention.KERNELS, "wrong", wrong)
    monkeypatch.setitem(attention.KERNELS, "native", wrong)
    with pytest.raises(RuntimeError, match=r"no attention kernel computes q \(1, 10, 2, 8\).*wrong: rel err"):
        local_attention(*_qkv(1, 10), "wrong")


def test_named_backends_go_through_the_custom_op(monkeypatch, fresh):
    seen: list[str] = []
    real = attention.checked_attention

    def spy(q, k, v, backend):
        seen.append(backend)
        return real(q, k, v, backend)

    monkeypatch.setattr(attention, "checked_attention", spy)
    q, k, v = _qkv(1, 12)
    torch.ops.vap.attention(q, k, v, "native")
    local_attention(q, k, v, None)  # the CPU default: diffusers' dispatcher directly
    assert seen == ["native"]


def _heads_major(x: torch.Tensor) -> bool:
    return x.transpose(1, 2).is_contiguous()


def test_every_self_attention_gets_q_k_v_in_heads_major_memory():
    # cuDNN SDPA needs [B, H, S, D] contiguous: in any other layout diffusers copies Q, K and V
    # (4.3 GiB each at 720p/121). The flash kernels read the same memory through its strides.
    from gpu.vap.tiny import build_tiny_transformer
    from tests.gpu.test_vap_model import _inputs

    model = build_tiny_transformer(0).eval()
    layouts: list[tuple[bool, bool, bool]] = []

    def spy(q, k, v, backend):
        layouts.append((_heads_major(q), _heads_major(k), _heads_major(v)))
        return local_attention(q, k, v, backend)

    for block in model.blocks:
        block.attention_core = spy
    with torch.no_grad():
        model(**_inputs(2), return_dict=False)
    assert len(layouts) == len(model.blocks) and all(all(x) for x in layouts), layouts


@pytest.mark.slow
def test_cudnn_attention_plans_no_more_memory_than_the_flash_kernels_at_the_largest_size():
    from gpu.vap import footprint
    from gpu.vap.geometry import RELEASED

    model = footprint.components().transformer
    grid = RELEASED.latent_grid(121, 720, 1280)
    model.rotary(grid, torch.device("meta"), reference=True)  # the tables outside both traces
    model.rotary(grid, torch.device("meta"))
    flash = max(footprint.denoise_timeline(model, grid))
    model.set_attention_backend("_native_cudnn")
    try:
        cudnn = max(footprint.denoise_timeline(model, grid))
    finally:
        model.reset_attention_backend()
    assert cudnn == flash


@pytest.mark.slow
def test_the_plan_takes_the_largest_of_every_kernel_family():
    from gpu.vap import footprint
    from gpu.vap.geometry import RELEASED

    planned = footprint.denoise_model()
    assert set(planned.models) == set(footprint.PLANNED_BACKENDS) == {"native", "_native_cudnn", "flash_4"}
    for frames, height, width in ((49, 480, 832), (121, 720, 1280)):
        tokens = RELEASED.tokens_per_stream(frames, height, width)
        assert planned.peak(tokens) == max(m.peak(tokens) for m in planned.models.values())
