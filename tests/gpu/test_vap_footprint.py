"""Memory measured on the meta device: the live-bytes tracker, the CUDA-kernel stand-ins, the
exact interpolation of the denoising phase, the VAE bound."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gpu.vap import footprint
from gpu.vap.metering import CudaKernels, LiveBytes
from gpu.vap.tiny import build_tiny_transformer

pytestmark = pytest.mark.slow


def test_live_bytes_follow_creation_and_release():
    weight = torch.empty(1000, device="meta")
    with LiveBytes(ignore=[weight]) as live:
        a = torch.empty(256, device="meta") + 1  # the empty (1 KiB) dies, the sum lives
        b = a.view(16, 16) * weight[:256].view(16, 16)  # a view adds nothing; the product 1 KiB
        weight.add_(1)  # in place on an ignored tensor: nothing new
        assert live.live == 2048
        del a
        assert live.live == 1024
    assert live.peak == 2048 and b.numel() == 256  # (empty + sum), then (sum + product)


def test_attention_and_rms_norm_allocate_like_the_cuda_kernels():
    q = torch.empty(2, 8, 4096, 64, device="meta", dtype=torch.bfloat16)
    with LiveBytes() as math_path:
        F.scaled_dot_product_attention(q, q, q)
    with CudaKernels(), LiveBytes() as flash:
        out = F.scaled_dot_product_attention(q, q, q)
    assert out.shape == q.shape
    scores = 2 * 8 * 4096 * 4096 * 2
    assert math_path.peak > scores and flash.peak < scores / 16
    x, w = q.flatten(2), torch.empty(8 * 64, device="meta", dtype=torch.bfloat16)
    with CudaKernels(), LiveBytes() as fused:
        F.rms_norm(x, [8 * 64], w)
    assert fused.peak <= x.nbytes + x.shape[0] * x.shape[1] * 4  # output + per-row rstd


def test_denoise_peak_is_exactly_interpolated_between_two_sizes():
    with torch.device("meta"):
        model = build_tiny_transformer(0).to(torch.bfloat16)
    dm = footprint.DenoiseModel(model, ((2, 4, 4), (5, 8, 12)))
    grid = (3, 6, 10)
    direct = max(footprint.denoise_timeline(model, grid))
    # Exact up to the rotary pieces' rounding (tensor_split: sizes differ by at most a token).
    assert abs(dm.peak(3 * 3 * 5) - direct) <= 8 * 2 * 2 * 24 * 4


def test_vae_bound_is_symmetric_and_grows_with_frames():
    from diffusers.models import AutoencoderKLWan

    with torch.device("meta"):  # the tiny pipeline's VAE layout
        vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1)
    wide, tall = footprint.vae_peaks(vae, 9, 16, 32), footprint.vae_peaks(vae, 9, 32, 16)
    assert wide == tall
    longer = footprint.vae_peaks(vae, 17, 16, 32)
    assert longer.encode >= wide.encode and longer.decode >= wide.decode


def test_released_weights_match_the_checkpoint_sizes():
    w = footprint.weights()
    assert round(w.transformer / 1e9, 2) == 41.46
    assert round(w.text_encoder / 1e9, 2) == 11.36
    assert round(w.image_encoder / 1e9, 2) == 2.52
    assert round(w.vae / 1e9, 2) == 0.51
    assert round(w.safety / 1e9, 2) == 0.61
