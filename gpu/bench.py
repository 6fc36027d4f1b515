"""Benchmark one VAP denoising step (transformer, CFG as one batch of 2) per attention backend.

Full size: the released 14B layout (expert blocks 0, 4, ..., 36) with random bf16 weights built
directly on the GPU (no download), 480p / 49 frames: 13×30×52 = 20,280 tokens per stream.
Prints s/step, achieved TFLOP/s against the nominal 2.44e15 FLOP per CFG step, the projected
50-step time and peak memory. `--tiny` runs the same code path on the CPU with the tiny config
(the test suite does, so this script can't rot).

    python -m gpu.bench                      # on an H100
    python -m gpu.bench --compile            # + regional torch.compile of the blocks
    python -m gpu.bench --tiny               # CPU smoke run
"""

from __future__ import annotations

import argparse
import importlib.util
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from gpu.vap.tiny import TINY_TRANSFORMER_CONFIG
from gpu.vap.transformer import KEEP_IN_FP32, RELEASED_14B_CONFIG, WanTransformer3DMOTModel

NOMINAL_STEP_FLOPS = 2.44e15  # 480p/49 frames, CFG batch 2 (docs/model.md)
H100_TARGET_TFLOPS = 550.0

FULL_CONFIG = RELEASED_14B_CONFIG


@dataclass
class Shape:
    frames: int  # pixel frames (4k+1)
    height: int
    width: int
    text_tokens: int = 512
    image_tokens: int = 257

    def latent(self) -> tuple[int, int, int]:
        return (self.frames - 1) // 4 + 1, self.height // 8, self.width // 8


def step_flops(cfg: dict[str, Any], shape: Shape, batch: int = 2) -> float:
    """Matmul + attention FLOPs of one step as this implementation computes it (dead work skipped)."""
    d = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    f, h, w = shape.latent()
    p = cfg["patch_size"]
    s = (f // p[0]) * (h // p[1]) * (w // p[2])
    ctx = shape.text_tokens + shape.image_tokens
    experts = sorted(cfg["block_idx_with_mot_ref"])
    per_token = 2 * (6 * d * d + 2 * d * cfg["ffn_dim"])  # self QKVO + cross Q,O + FFN
    ctx_kv = 2 * 2 * ctx * d * d  # cross-attention K/V over text + image context
    cross = 4 * s * ctx * d
    total = 0.0
    for i in range(cfg["num_layers"]):
        total += s * per_token + ctx_kv + cross
        if i not in experts:
            total += 4 * s * s * d
        elif i != experts[-1]:
            total += s * per_token + ctx_kv + cross + 4 * (2 * s) * (2 * s) * d
        else:  # last expert: reference K/V only, main queries over both streams
            total += s * 2 * 3 * d * d + 4 * s * (2 * s) * d
    return batch * total


def build_random(cfg: dict[str, Any], device: torch.device, dtype: torch.dtype) -> WanTransformer3DMOTModel:
    """Random weights allocated directly on `device` in `dtype` (fp32 where the checkpoint keeps it)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            model = WanTransformer3DMOTModel(**cfg)
    finally:
        torch.set_default_dtype(previous)
    model.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if any(part in KEEP_IN_FP32 for part in name.split(".")):
                param.data = param.data.float()
            if name.endswith("bias"):
                param.zero_()
            elif param.ndim == 1:  # norm weights
                param.fill_(1.0)
            else:
                param.normal_(0.0, 0.02, generator=gen)
    return model.eval()


def inputs(cfg: dict[str, Any], shape: Shape, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    f, h, w = shape.latent()
    g = torch.Generator(device=device).manual_seed(1)

    def rnd(*s: int) -> torch.Tensor:
        return torch.randn(*s, generator=g, device=device, dtype=dtype)

    return {
        "hidden_states": rnd(2, cfg["in_channels"], f, h, w),
        "timestep": torch.tensor([999, 999], device=device),
        "encoder_hidden_states": rnd(2, shape.text_tokens, cfg["text_dim"]),
        "encoder_hidden_states_image": rnd(2, shape.image_tokens, cfg["image_dim"]),
        "ref": rnd(1, cfg["in_channels"], f, h, w),
        "ref_text": rnd(2, shape.text_tokens, cfg["text_dim"]),
        "ref_image": rnd(2, shape.image_tokens, cfg["image_dim"]),
    }


def candidate_backends(device: torch.device) -> list[str]:
    if device.type != "cuda":
        return ["native"]
    names = ["native", "_native_cudnn", "_native_flash", "_native_efficient"]
    optional = {"flash": "flash_attn", "_flash_3": "flash_attn_interface", "sage": "sageattention"}
    names += [b for b, mod in optional.items() if importlib.util.find_spec(mod) is not None]
    return names


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_step(step: Callable[[], Any], device: torch.device, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        step()
    _sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        step()
    _sync(device)
    return (time.perf_counter() - start) / iters


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    tiny = bool(args.tiny)
    device = torch.device("cpu" if tiny else args.device)
    dtype = torch.float32 if tiny else torch.bfloat16
    cfg = dict(TINY_TRANSFORMER_CONFIG) if tiny else FULL_CONFIG
    shape = Shape(9, 32, 32) if tiny else Shape(args.frames, args.height, args.width)
    model = build_random(cfg, device, dtype)
    if args.compile:
        model.compile_repeated_blocks(fullgraph=True)
    x = inputs(cfg, shape, device, dtype)
    with torch.no_grad():
        reference = model.prepare_reference(x["ref"], x["ref_text"], x["ref_image"])

    def step() -> Any:
        with torch.no_grad():
            return model(
                x["hidden_states"],
                x["timestep"],
                x["encoder_hidden_states"],
                x["encoder_hidden_states_image"],
                reference=reference,
                return_dict=False,
            )[0]

    nominal = NOMINAL_STEP_FLOPS if not tiny else step_flops(cfg, shape)
    rows: list[dict[str, Any]] = []
    backends = args.backends.split(",") if args.backends else candidate_backends(device)
    for backend in backends:
        row: dict[str, Any] = {"backend": backend}
        try:
            if backend == "native":
                model.reset_attention_backend()
            else:
                model.set_attention_backend(backend)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            sec = time_step(step, device, args.warmup, args.iters)
            row.update(
                s_per_step=sec,
                tflops=nominal / sec / 1e12,
                s_50_steps=50 * sec,
                peak_gib=(torch.cuda.max_memory_allocated(device) / 2**30) if device.type == "cuda" else None,
            )
        except Exception as exc:  # a backend missing on this machine is a row, not a crash
            row["error"] = f"{type(exc).__name__}: {str(exc)[:120]}"
        rows.append(row)
    return rows


def bench_vae(tiny: bool, device: torch.device) -> list[dict[str, Any]]:
    """VAE decode of one video's latents in fp32 vs bf16: time, peak memory, and how far the bf16
    frames are from the fp32 ones (random weights: the time is meaningful, the PSNR only a hint)."""
    from diffusers.models import AutoencoderKLWan

    torch.manual_seed(0)
    if tiny:
        vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1)
        latents = torch.randn(1, 16, 3, 4, 4)
    else:
        vae = AutoencoderKLWan()  # the Wan2.1 VAE layout (as in the checkpoint's vae/config.json)
        latents = torch.randn(1, 16, 13, 60, 104)
    vae = vae.to(device).eval()
    latents = latents.to(device)
    rows: list[dict[str, Any]] = []
    reference: torch.Tensor | None = None
    for dtype in (torch.float32, torch.bfloat16):
        vae.to(dtype)
        z = latents.to(dtype)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

        def decode(z: torch.Tensor = z) -> torch.Tensor:
            return vae.decode(z, return_dict=False)[0]

        with torch.no_grad():
            sec = time_step(decode, device, warmup=1, iters=1)
            video = decode().float().clamp(-1, 1)
        row: dict[str, Any] = {"dtype": str(dtype).removeprefix("torch."), "s": sec}
        row["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
        if reference is None:
            reference = video
        else:
            mse = float(((video - reference) / 2).pow(2).mean())  # frames in [0, 1]
            row["psnr_vs_fp32"] = 10 * torch.log10(torch.tensor(1.0 / max(mse, 1e-20))).item()
        rows.append(row)
    return rows


def print_table(rows: list[dict[str, Any]], device_name: str, flops: float) -> None:
    print(
        f"device: {device_name}   FLOP/step: {flops:.3g}   target: >= {H100_TARGET_TFLOPS:.0f} TFLOP/s (H100)"
    )
    print(f"{'backend':<18} {'s/step':>8} {'TFLOP/s':>8} {'50 steps (s)':>12} {'peak GiB':>9}")
    for r in rows:
        if "error" in r:
            print(f"{r['backend']:<18} {'error':>8}  {r['error']}")
            continue
        peak = f"{r['peak_gib']:.1f}" if r["peak_gib"] is not None else "-"
        timing = f"{r['s_per_step']:>8.3f} {r['tflops']:>8.1f} {r['s_50_steps']:>12.1f}"
        print(f"{r['backend']:<18} {timing} {peak:>9}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tiny", action="store_true", help="tiny config on CPU (smoke test)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--frames", type=int, default=49)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=832)
    parser.add_argument("--backends", default="", help="comma list (default: all available)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="regional torch.compile of the blocks")
    parser.add_argument("--vae", action="store_true", help="also time the VAE decode in fp32 vs bf16")
    args = parser.parse_args(argv)
    if not args.tiny and not torch.cuda.is_available():
        parser.error("no CUDA device: use --tiny for the CPU smoke run")
    rows = run(args)
    if args.tiny:
        name, flops = "cpu (tiny config)", step_flops(dict(TINY_TRANSFORMER_CONFIG), Shape(9, 32, 32))
    else:
        shape = Shape(args.frames, args.height, args.width)
        name, flops = torch.cuda.get_device_name(), NOMINAL_STEP_FLOPS
        print(f"computed here (dead reference work skipped): {step_flops(FULL_CONFIG, shape):.3g} FLOP/step")
    print_table(rows, name, flops)
    if args.vae:
        device = torch.device("cpu" if args.tiny else args.device)
        print(f"\nVAE decode of one video's latents ({'tiny' if args.tiny else '13x60x104 -> 49x480x832'})")
        print(f"{'dtype':<10} {'s':>8} {'peak GiB':>9} {'PSNR vs fp32 (random weights)':>30}")
        for r in bench_vae(bool(args.tiny), device):
            peak = f"{r['peak_gib']:.1f}" if r["peak_gib"] is not None else "-"
            psnr = f"{r['psnr_vs_fp32']:.1f} dB" if "psnr_vs_fp32" in r else "-"
            print(f"{r['dtype']:<10} {r['s']:>8.3f} {peak:>9} {psnr:>30}")
    return 0 if any("error" not in r for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
