"""The GPU check: speed per attention backend, a full-size pipeline run, memory against the plan.

    python -m gpu.tools.bench --full       # one H100/H200, random full-size weights, no download (< 8 min)
    python -m gpu.tools.bench --smoke      # CPU: the same code on the tiny model, in seconds

`--full` builds the released 14B layout (and UMT5-XXL, CLIP ViT-H, the Wan VAE, the safety
checker) from configs with random weights directly on the GPU, then:

1. one CFG denoising step at 480p/49 frames per attention backend, eager and (time permitting)
   with regional `torch.compile`: s/step, achieved TFLOP/s and % of the GPU's dense bf16 peak,
   from the FLOPs counted on the model (`gpu.tools.flop_count`, steady step). Each backend's kernel is checked
   against the math kernel (float32) and its step output against the first backend's;
2. a 2-step end-to-end pipeline at full size (encoders, VAE, transformer, safety checker) with the
   memory options the plan gives the job's GPU class: time per phase and peak memory;
3. the largest job the plan sends to each GPU type this device can stand in for, 1 step: its peak
   memory against the plan's estimate and that GPU's capacity.

Each of these is a section of its own: an exception in one (out of memory, a kernel error, a
missing package) is recorded in the report and the next section runs. The report is printed and
(`--write PATH`) written after every section, so a run cut short still leaves what it measured.
FLOPs per step come from THE formula (`gpu.tools.flops`; tests hold it equal to torch's count on
the model). It exits 1 when a planned job does not fit, a backend's output disagrees with the
math kernel, a section failed, or nothing ran. `python -m gpu.tools.check` runs it as one section
of a GPU's first check (docs/gpu-benchmarks.md).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import importlib.metadata
import os
import platform
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from gpu.service import routing
from gpu.tools.flops import analytic_step_flops
from gpu.tools.scaling import PEAK_TFLOPS
from gpu.vap import compiling
from gpu.vap.attention import (
    FLASH_4,
    backend_works,
    candidate_backends,
    choose_backend,
    run_kernel,
    served_shapes,
)
from gpu.vap.configs import RELEASED_14B_CONFIG
from gpu.vap.geometry import IMAGE_TOKENS, RELEASED, TEXT_TOKENS
from gpu.vap.tiny import TINY_TRANSFORMER_CONFIG
from gpu.vap.transformer import WanTransformer3DMOTModel

GIB = 2**30
KERNEL_REL_TOL = 1e-2  # bf16 attention vs float32 math: ~3e-3 when right
MODEL_REL_TOL = 5e-2  # step output vs the first backend after 40 bf16 blocks (information + gross errors)
EXTRA_BACKENDS = ["_native_flash", "_native_efficient"]  # torch's other SDPA kernels, for comparison


@dataclass
class Shape:
    frames: int
    height: int
    width: int

    def latent(self) -> tuple[int, int, int]:
        return RELEASED.latent_grid(self.frames, self.height, self.width)

    def __str__(self) -> str:
        return f"{self.width}x{self.height}x{self.frames}"


@dataclass
class Report:
    mode: str  # "full" (GPU) or "smoke" (CPU, tiny)
    device: str
    versions: dict[str, str]
    shape: Shape
    flops_steady: int
    flops_plain: int
    peak_tflops: float | None
    backends: list[dict[str, Any]] = field(default_factory=list)
    pipeline: dict[str, Any] = field(default_factory=dict)
    memory: list[dict[str, Any]] = field(default_factory=list)
    vae: list[dict[str, Any]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    sections: list[dict[str, Any]] = field(default_factory=list)  # name, status, s
    wall_s: float = 0.0


@contextlib.contextmanager
def section(
    report: Report, name: str, device: torch.device, done: Callable[[Report], None]
) -> Iterator[dict[str, Any]]:
    """One isolated part of the run: any exception is recorded (status, problem) instead of ending
    the run; the memory it held is released; `done(report)` follows every section."""
    row: dict[str, Any] = {"name": name, "status": "running"}
    report.sections.append(row)
    started = time.monotonic()
    try:
        yield row
        if row["status"] == "running":
            row["status"] = "ok"
    except Exception as exc:  # the next section runs whatever this one hit
        row["status"] = f"failed: {type(exc).__name__}: {str(exc)[:200]}"
        report.problems.append(f"section {name}: {type(exc).__name__}: {str(exc)[:200]}")
        traceback.print_exc()
    finally:
        row["s"] = time.monotonic() - started
        _free(device)
        done(report)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for pkg in ("diffusers", "transformers", "flash-attn-4", "flash_attn_3", "flash-attn", "kernels"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            out[pkg] = importlib.metadata.version(pkg)
    if torch.cuda.is_available():
        out["cuda"] = str(torch.version.cuda)
    return out


def peak_tflops(device_name: str) -> float | None:
    return next((v for k, v in PEAK_TFLOPS.items() if k in device_name), None)


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    diff = (got.float() - want.float()).norm()
    return float(diff / want.float().norm().clamp_min(1e-30))


# -- the transformer step -----------------------------------------------------------------------


def build_transformer(
    cfg: dict[str, Any], device: torch.device, dtype: torch.dtype
) -> WanTransformer3DMOTModel:
    """Random weights allocated directly on `device` (fp32 where the checkpoint keeps it)."""
    from gpu.vap.released import build_transformer as released
    from gpu.vap.released import random_weights

    if cfg == RELEASED_14B_CONFIG:
        model = released(device)
        random_weights(model)
        return model
    torch.manual_seed(0)
    return WanTransformer3DMOTModel(**cfg).to(device=device, dtype=dtype).eval()


def step_inputs(
    cfg: dict[str, Any], shape: Shape, device: torch.device, dtype: torch.dtype
) -> dict[str, Any]:
    f, h, w = shape.latent()
    g = torch.Generator(device=device).manual_seed(1)

    def rnd(*s: int) -> torch.Tensor:
        return torch.randn(*s, generator=g, device=device, dtype=dtype)

    return {
        "latents": rnd(1, cfg["in_channels"], f, h, w),
        "text": rnd(2, TEXT_TOKENS, cfg["text_dim"]),
        "image": rnd(2, IMAGE_TOKENS, cfg["image_dim"]),
        "ref": rnd(1, cfg["in_channels"], f, h, w),
        "ref_text": rnd(2, TEXT_TOKENS, cfg["text_dim"]),
        "ref_image": rnd(2, IMAGE_TOKENS, cfg["image_dim"]),
    }


def time_call(
    fn: Callable[[], Any], device: torch.device, warmup: int, iters: int
) -> tuple[float, float, Any]:
    """(seconds of the warm-up calls, seconds per timed call, last output)."""
    start = time.perf_counter()
    out = None
    for _ in range(warmup):
        out = fn()
    _sync(device)
    warm = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(iters):
        out = fn()
    _sync(device)
    return warm, (time.perf_counter() - start) / max(iters, 1), out


def kernel_check(backend: str, device: torch.device, tokens: int, dtype: torch.dtype) -> float:
    """Relative error of `backend` against float32 math attention at a realistic size."""
    from diffusers.models.attention_dispatch import AttentionBackendName, dispatch_attention_fn

    g = torch.Generator(device=device).manual_seed(2)
    q, k, v = (torch.randn(1, tokens, 8, 128, generator=g, device=device, dtype=dtype) for _ in range(3))
    want = dispatch_attention_fn(
        q.float(), k.float(), v.float(), backend=AttentionBackendName("_native_math")
    )
    return rel_err(run_kernel(backend, q, k, v), want)  # the kernel itself, never a fallback


def bench_backends(
    model: WanTransformer3DMOTModel,
    cfg: dict[str, Any],
    shape: Shape,
    device: torch.device,
    dtype: torch.dtype,
    flops: int,
    peak: float | None,
    args: argparse.Namespace,
    deadline: float,
    compiled: bool = False,
    first: torch.Tensor | None = None,
) -> tuple[list[dict[str, Any]], torch.Tensor | None]:
    """One row per backend (eager, or regional compile): speed, memory, agreement. `first`: the
    step output the others are compared with (the first backend that ran)."""
    x = step_inputs(cfg, shape, device, dtype)
    with torch.no_grad():
        reference = model.prepare_reference(x["ref"], x["ref_text"], x["ref_image"])
        context = model.prepare_context(x["text"], x["image"])
    latents, t = x["latents"].expand(2, -1, -1, -1, -1), torch.tensor(999.0, device=device).expand(2)

    def step() -> torch.Tensor:
        with torch.no_grad():
            out = model(latents, t, reference=reference, context=context, return_dict=False)[0]
        assert isinstance(out, torch.Tensor)
        return out

    names = args.backends.split(",") if args.backends else candidate_backends(device)
    if not args.backends:  # torch's other kernels for comparison (on the CPU: math, and FA4's absence)
        extra = EXTRA_BACKENDS if device.type == "cuda" else ["_native_math", FLASH_4]
        names += [b for b in extra if b not in names]
    rows: list[dict[str, Any]] = []
    compile_s = 150.0  # expected cost of compiling + timing one backend, until one is measured
    for backend in names:
        row: dict[str, Any] = {"backend": backend, "compile": compiled}
        rows.append(row)
        if time.monotonic() + (compile_s if compiled else 0.0) > deadline:
            row["skipped"] = "time budget"
            continue
        if backend != "native" and not backend_works(backend, device):
            row["skipped"] = "unavailable (probe failed)"
            continue
        try:
            if not compiled:
                row["kernel_rel_err"] = kernel_check(backend, device, args.kernel_tokens, dtype)
                if row["kernel_rel_err"] > KERNEL_REL_TOL:
                    row["failed"] = f"kernel rel err {row['kernel_rel_err']:.2e} > {KERNEL_REL_TOL}"
            if backend == "native":
                model.reset_attention_backend()
            else:
                model.set_attention_backend(backend)
            if compiled:
                torch._dynamo.reset()
                compiling.compile_blocks(model)  # as served (gpu.vap.compiling)
            _reset_peak(device)
            started = time.monotonic()
            warm, sec, out = time_call(step, device, args.warmup, args.iters)
            if compiled:
                compile_s = time.monotonic() - started
            row.update(warmup_s=warm, s_per_step=sec, tflops=flops / sec / 1e12, s_50_steps=50 * sec)
            row["peak_gib"] = _peak_gib(device)
            planned = planned_step_gib(shape) if device.type == "cuda" else None
            if planned is not None and row["peak_gib"] is not None:
                row["planned_gib"] = planned
                if row["peak_gib"] > planned:
                    row["failed"] = f"step peak {row['peak_gib']:.1f} GiB above the plan's {planned:.1f}"
            if peak:
                row["pct_peak"] = 100 * flops / sec / 1e12 / peak
            # The checked attention replaces a kernel that is wrong on a shape: then this row
            # timed another kernel there.
            others = {v for k, v in served_shapes().items() if k[0] == backend and v != backend}
            if others:
                row["failed"] = f"replaced by {', '.join(sorted(others))} on some of the step's shapes"
            if first is None:
                first = out.float()
            else:
                row["model_rel_err"] = rel_err(out, first)
                if row["model_rel_err"] > MODEL_REL_TOL:
                    row["failed"] = f"step output rel err {row['model_rel_err']:.2e} vs the first backend"
        except Exception as exc:  # a backend that breaks here is a row, not a crash
            row["error"] = f"{type(exc).__name__}: {str(exc)[:160]}"
        finally:
            if compiled:
                uncompile(model)
    model.reset_attention_backend()
    return rows, first


def planned_step_gib(shape: Shape) -> float | None:
    """What the memory plan allows one denoising step of `shape` on one GPU: the transformer's
    weights, the rotary cache's bound and the denoising phase with the allocator's share of the
    margin (`gpu.tools.plan`). Eager and compiled steps are both held to it."""
    from gpu.tools.plan import MARGIN_FRACTION

    table = routing.read_table()
    key = (shape.width, shape.height, shape.frames, 1)
    job = next(
        (j for j in table["jobs"] if (j["width"], j["height"], j["num_frames"], j["gpus"]) == key), None
    )
    if job is None:
        return None
    weights = table["weights"]
    denoise = job["phases"]["denoise"] * (1 + MARGIN_FRACTION)
    planned = weights["transformer"] + weights["rotary_cache"] + denoise
    return planned / GIB


def uncompile(model: torch.nn.Module) -> None:
    """Undo `compile_repeated_blocks` (each block's compiled call goes back to eager)."""
    torch._dynamo.reset()
    for module in model.modules():
        if getattr(module, "_compiled_call_impl", None) is not None:
            module._compiled_call_impl = None


# -- the pipeline -------------------------------------------------------------------------------


def build_pipeline(full: bool, device: torch.device, offload_encoders: bool, transformer: Any = None) -> Any:
    """The VAP pipeline from configs with random weights (full size) or the tiny one (smoke)."""
    from gpu.vap.pipeline import VAPPipeline
    from gpu.vap.tiny import build_tiny_pipeline, build_tiny_tokenizer

    if not full:
        pipe = build_tiny_pipeline(0)
    else:
        from gpu.vap import released

        _free(device)  # the previous pipeline's encoders and VAE
        c = released.build_components(device, with_transformer=transformer is None, with_safety=False)
        for module in (c.text_encoder, c.image_encoder, c.vae, c.transformer):
            if module is not None:
                released.random_weights(module)
        pipe = VAPPipeline(
            tokenizer=build_tiny_tokenizer(),  # any ids < 256k work for random UMT5 weights
            text_encoder=c.text_encoder,
            image_encoder=c.image_encoder,
            image_processor=released.image_processor(),
            transformer=transformer if transformer is not None else c.transformer,  # type: ignore[arg-type]
            vae=c.vae,
            scheduler=released.scheduler(),
        )
    pipe.to(device)
    if offload_encoders:
        pipe.enable_encoder_offload()
    return pipe


def safety_classifier(full: bool, device: torch.device) -> Any:
    from gpu.service.safety import DiffusersSafetyClassifier

    if not full:
        return DiffusersSafetyClassifier.tiny(0)
    from gpu.vap import released

    checker = released.random_weights(released.safety_checker().to(device=device, dtype=torch.float16))
    return DiffusersSafetyClassifier(
        checker, released.image_processor(), device=str(device), dtype=torch.float16
    )


@contextlib.contextmanager
def _phase(timings: dict[str, float], name: str, device: torch.device) -> Iterator[None]:
    _sync(device)
    start = time.perf_counter()
    yield
    _sync(device)
    timings[name] = timings.get(name, 0.0) + time.perf_counter() - start


def run_pipeline(pipe: Any, safety: Any, shape: Shape, steps: int, device: torch.device) -> dict[str, Any]:
    """One generation with timings per phase (encode+VAE encode, denoising, decode, safety)."""
    from gpu.service.safety import check_image, check_output

    rng = np.random.default_rng(0)
    size = (shape.width, shape.height)
    image = Image.fromarray(rng.integers(0, 256, (shape.height, shape.width, 3), dtype=np.uint8))
    frames = [image.resize(size)] * shape.frames
    timings: dict[str, float] = {}
    steps_seen: list[float] = []

    def on_step(_pipe: Any, _i: int, _t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        _sync(device)
        steps_seen.append(time.perf_counter())
        return kwargs

    _reset_peak(device)
    start = time.perf_counter()
    with _phase(timings, "safety_in_s", device):
        check_image(safety, image)
    with _phase(timings, "pipeline_s", device), torch.inference_mode():
        video = pipe(
            image=image,
            ref_video=frames,
            prompt="a woman turns to the camera",
            prompt_mot_ref="a man turns into a toy character",
            height=shape.height,
            width=shape.width,
            num_frames=shape.frames,
            num_inference_steps=steps,
            generator=torch.Generator().manual_seed(0),
            callback_on_step_end=on_step,
        ).frames
    out = (np.clip(video[0], 0, 1) * 255).astype(np.uint8)
    # A random checker flags at random: only its run time matters here.
    with _phase(timings, "safety_out_s", device), contextlib.suppress(Exception):
        check_output(safety, out)
    total = time.perf_counter() - start
    if len(steps_seen) >= 2:
        timings["s_per_step"] = (steps_seen[-1] - steps_seen[0]) / (len(steps_seen) - 1)
    return {"shape": str(shape), "steps": steps, "total_s": total, **timings, "peak_gib": _peak_gib(device)}


def bench_vae(full: bool, device: torch.device) -> list[dict[str, Any]]:
    """VAE decode of one 480p/49 video's latents in fp32 vs bf16: time, peak memory, and how far the
    bf16 frames are from the fp32 ones (random weights: the time is meaningful, the PSNR a hint)."""
    from diffusers.models import AutoencoderKLWan

    from gpu.vap.released import random_weights

    torch.manual_seed(0)
    if full:
        vae = random_weights(AutoencoderKLWan().to(device))
        latents = torch.randn(1, 16, 13, 60, 104, device=device)
    else:
        vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1).to(device)
        latents = torch.randn(1, 16, 3, 4, 4, device=device)
    rows: list[dict[str, Any]] = []
    reference: torch.Tensor | None = None
    decoder: Any = vae
    for dtype in (torch.float32, torch.bfloat16):
        decoder.to(dtype)
        z = latents.to(dtype)
        _reset_peak(device)

        def decode(z: torch.Tensor = z) -> torch.Tensor:
            return decoder.decode(z, return_dict=False)[0]

        with torch.no_grad():
            _, sec, video = time_call(decode, device, 1, 1)
        video = video.float().clamp(-1, 1)
        row: dict[str, Any] = {
            "dtype": str(dtype).removeprefix("torch."),
            "s": sec,
            "peak_gib": _peak_gib(device),
        }
        if reference is None:
            reference = video
        else:
            mse = float(((video - reference) / 2).pow(2).mean())
            row["psnr_vs_fp32"] = 10 * float(np.log10(1.0 / max(mse, 1e-20)))
        rows.append(row)
    return rows


# -- memory against the plan ----------------------------------------------------------------------


def planned_jobs(device: torch.device) -> list[tuple[str, dict[str, Any]]]:
    """(GPU type, job) for the largest job the plan gives each GPU type this device can stand in for."""
    if device.type != "cuda":
        return []
    capacity = torch.cuda.get_device_properties(device).total_memory / GIB
    jobs = [j for j in routing.read_table()["jobs"] if j["gpus"] == 1 and j["gpu"]]
    out = []
    for gpu in routing.OFFERED:
        mine = [j for j in jobs if j["gpu"] == gpu.name]
        if mine and gpu.capacity_gib <= capacity + 0.5:
            out.append((gpu.name, max(mine, key=lambda j: j["peak_bytes"])))
    return out


def check_memory(
    name: str, job: dict[str, Any], pipe_factory: Callable[[bool], Any], device: torch.device
) -> dict[str, Any]:
    gpu = routing.gpu_type(name)
    offload = routing.offload_encoders(name, 1)
    shape = Shape(job["num_frames"], job["height"], job["width"])
    row: dict[str, Any] = {"gpu": name, "shape": str(shape), "offload_encoders": offload}
    row["planned_gib"] = job["peak_bytes"] / GIB
    row["capacity_gib"] = gpu.capacity_gib
    try:
        pipe = pipe_factory(offload)
        result = run_pipeline(pipe, safety_classifier(True, device), shape, 1, device)
        free, total = torch.cuda.mem_get_info(device)
        outside = (total - free - torch.cuda.memory_reserved(device)) / GIB  # context, workspaces
        row.update(
            measured_gib=result["peak_gib"],
            reserved_gib=torch.cuda.max_memory_reserved(device) / GIB,
            outside_torch_gib=outside,
            total_s=result["total_s"],
        )
        row["fits"] = row["reserved_gib"] + outside <= gpu.capacity_gib
    except torch.cuda.OutOfMemoryError as exc:
        row.update(fits=False, error=f"OutOfMemoryError: {str(exc)[:160]}")
    return row


# -- report -------------------------------------------------------------------------------------


def _fmt(value: Any, spec: str = ".3f") -> str:
    if value is None:
        return "-"
    return format(value, spec) if isinstance(value, float) else str(value)


def render(report: Report) -> str:
    """The Markdown report (format documented in docs/gpu-benchmarks.md)."""
    lines = [f"### Run: {report.mode} on {report.device}", ""]
    lines.append(
        f"- versions: {', '.join(f'{k} {v}' for k, v in report.versions.items())}; "
        f"wall time {report.wall_s:.0f} s"
    )
    lines.append(
        f"- step shape {report.shape} (CFG batch 2); FLOPs per step (gpu.tools.flops, held equal to the "
        f"count on the model): "
        f"{report.flops_steady:.4g} steady (reused step invariants), {report.flops_plain:.4g} plain; "
        f"device peak {_fmt(report.peak_tflops, '.1f')} dense bf16 TFLOP/s"
    )
    lines += [
        "",
        "| backend | compile | s/step | TFLOP/s | % of peak | 50 steps (s) | warm-up (s) | peak GiB "
        "| planned GiB | kernel rel err | step rel err | status |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report.backends:
        status = r.get("failed") or r.get("error") or r.get("skipped") or "ok"
        lines.append(
            f"| {r['backend']} | {'yes' if r['compile'] else 'no'} | {_fmt(r.get('s_per_step'))} "
            f"| {_fmt(r.get('tflops'), '.1f')} | {_fmt(r.get('pct_peak'), '.1f')} "
            f"| {_fmt(r.get('s_50_steps'), '.1f')} | {_fmt(r.get('warmup_s'), '.1f')} "
            f"| {_fmt(r.get('peak_gib'), '.1f')} | {_fmt(r.get('planned_gib'), '.1f')} "
            f"| {_fmt(r.get('kernel_rel_err'), '.1e')} "
            f"| {_fmt(r.get('model_rel_err'), '.1e')} | {status} |"
        )
    p = report.pipeline
    if p:
        lines += [
            "",
            f"End-to-end pipeline ({p['shape']}, {p['steps']} steps, encoders "
            f"{'in host memory' if p.get('offload_encoders') else 'resident'}): total {p['total_s']:.1f} s, "
            f"pipeline {p.get('pipeline_s', 0):.1f} s, s/step {_fmt(p.get('s_per_step'))}, safety "
            f"{p.get('safety_in_s', 0) + p.get('safety_out_s', 0):.2f} s, "
            f"peak {_fmt(p.get('peak_gib'), '.1f')} GiB "
            f"(planned {_fmt(p.get('planned_gib'), '.1f')} GiB with margin)",
        ]
    if report.memory:
        lines += [
            "",
            "| planned GPU | largest job | encoders on host | planned GiB | measured peak GiB | reserved GiB "
            "| outside torch GiB | capacity GiB | fits |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for m in report.memory:
            lines.append(
                f"| {m['gpu']} | {m['shape']} | {'yes' if m['offload_encoders'] else 'no'} "
                f"| {m['planned_gib']:.1f} | {_fmt(m.get('measured_gib'), '.1f')} "
                f"| {_fmt(m.get('reserved_gib'), '.1f')} | {_fmt(m.get('outside_torch_gib'), '.1f')} "
                f"| {m['capacity_gib']:.1f} | {'yes' if m.get('fits') else 'NO ' + m.get('error', '')} |"
            )
    if report.vae:
        lines += [
            "",
            "| VAE decode dtype | s | peak GiB | PSNR vs fp32 (random weights) |",
            "|---|---|---|---|",
        ]
        for v in report.vae:
            lines.append(
                f"| {v['dtype']} | {v['s']:.3f} | {_fmt(v.get('peak_gib'), '.1f')} "
                f"| {_fmt(v.get('psnr_vs_fp32'), '.1f')} |"
            )
    if report.sections:
        lines += ["", "| section | status | s |", "|---|---|---|"]
        lines += [f"| {r['name']} | {r['status']} | {_fmt(r.get('s'), '.1f')} |" for r in report.sections]
    lines += ["", "Result: " + ("; ".join(report.problems) if report.problems else "all checks passed"), ""]
    return "\n".join(lines)


UNMEASURED_HEADER = """\
**GPU figures: unmeasured.** No GPU has run `python -m gpu.tools.bench --full` yet. The run below is
the CPU smoke run (tiny model, same code): its times say nothing about a GPU.
"""


def write_report(path: Path, report: Report) -> None:
    """Replace the generated part of the document (after the marker), keeping the prose above."""
    marker = "<!-- gpu.tools.bench output below: generated, do not edit -->"
    head = path.read_text().split(marker)[0] if path.exists() else "# GPU benchmarks\n\n"
    prefix = UNMEASURED_HEADER + "\n" if report.mode == "smoke" else ""
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    path.write_text(f"{head.rstrip()}\n\n{marker}\n\n{prefix}_Generated {stamp}._\n\n{render(report)}")


# -- main -------------------------------------------------------------------------------------


def run(args: argparse.Namespace, done: Callable[[Report], None] = lambda report: None) -> Report:
    """The whole check, section by section (`section`); `done(report)` after each one."""
    started = time.monotonic()
    deadline = started + args.budget_s
    full = not args.smoke
    device = torch.device(args.device if full else "cpu")
    dtype = torch.bfloat16 if full else torch.float32
    cfg = RELEASED_14B_CONFIG if full else dict(TINY_TRANSFORMER_CONFIG)
    shape = Shape(args.frames, args.height, args.width) if full else Shape(9, 32, 48)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (tiny model)"
    report = Report(
        mode="full" if full else "smoke",
        device=name,
        versions=_versions(),
        shape=shape,
        flops_steady=analytic_step_flops(cfg, shape.frames, shape.height, shape.width, steady=True),
        flops_plain=analytic_step_flops(cfg, shape.frames, shape.height, shape.width, steady=False),
        peak_tflops=peak_tflops(name),
    )

    def finished(report: Report) -> None:
        report.wall_s = time.monotonic() - started
        done(report)

    if full:
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 VAE / CLIP convs and matmuls
        torch.backends.cudnn.allow_tf32 = True
    model: WanTransformer3DMOTModel | None = None
    first: torch.Tensor | None = None
    bench: tuple[Any, ...] = ()
    with section(report, "backends", device, finished):
        model = build_transformer(cfg, device, dtype)
        bench = (model, cfg, shape, device, dtype, report.flops_steady, report.peak_tflops, args, deadline)
        report.backends, first = bench_backends(*bench)
        _backend_problems(report, report.backends)

    if not args.no_pipeline and model is not None:
        with section(report, "pipeline", device, finished) as row:
            if time.monotonic() < deadline:
                run_served_pipeline(report, model, shape, device, dtype, full, args.pipeline_steps)
            else:
                row["status"] = "skipped: time budget"
        for gpu_name, job in planned_jobs(device):
            with section(report, f"memory {gpu_name}", device, finished) as row:
                if time.monotonic() + 150 > deadline:
                    row["status"] = "skipped: time budget"
                    report.problems.append(f"largest {gpu_name} job not checked: time budget")
                    continue
                check = check_memory(gpu_name, job, _pipeline_factory(full, device, model), device)
                report.memory.append(check)
                if not check.get("fits"):
                    report.problems.append(f"largest planned {gpu_name} job {check['shape']} does not fit")
        model.reset_attention_backend()

    if args.vae:
        with section(report, "vae", device, finished):
            report.vae = bench_vae(full, device)
    if args.compile and model is not None and (device.type == "cuda" or args.compile == "always"):
        with section(report, "compile", device, finished):
            compiled, _ = bench_backends(*bench, compiled=True, first=first)
            report.backends += compiled
            _backend_problems(report, compiled)
    if not any("s_per_step" in r for r in report.backends):
        report.problems.append("no attention backend ran")
    finished(report)
    return report


def _backend_problems(report: Report, rows: list[dict[str, Any]]) -> None:
    for r in rows:
        if "failed" in r:
            report.problems.append(f"{r['backend']} (compile={r['compile']}): {r['failed']}")


def _pipeline_factory(full: bool, device: torch.device, model: Any) -> Callable[[bool], Any]:
    def factory(offload: bool) -> Any:
        return build_pipeline(full, device, offload, transformer=model)

    return factory


def run_served_pipeline(
    report: Report,
    model: WanTransformer3DMOTModel,
    shape: Shape,
    device: torch.device,
    dtype: torch.dtype,
    full: bool,
    steps: int,
) -> None:
    """The end-to-end pipeline as served: the probed backend, the memory options the plan gives
    this job's GPU class; its planned peak next to the measured one."""
    backend = choose_backend(device, dtype)
    if backend != "native":
        model.set_attention_backend(backend)
    choice = routing.choose_gpu(shape.width, shape.height, shape.frames) if full else None
    offload = choice.offload_encoders if choice else False
    pipe = build_pipeline(full, device, offload, transformer=model)
    result = run_pipeline(pipe, safety_classifier(full, device), shape, steps, device)
    result.update(offload_encoders=offload, backend=backend)
    if choice:
        result["planned_gib"] = choice.peak_gib
    report.pipeline = result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The options of `python -m gpu.tools.bench` (also what `gpu.tools.check` runs it with)."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--full", action="store_true", help="full size on the GPU")
    mode.add_argument("--smoke", "--tiny", action="store_true", help="tiny model on the CPU (same code)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--frames", type=int, default=49)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=832)
    parser.add_argument("--backends", default="", help="comma list (default: every candidate here)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--iters", type=int, default=2)
    parser.add_argument(
        "--compile",
        nargs="?",
        const="yes",
        default="yes",
        choices=["yes", "no", "always"],
        help="also time regional torch.compile (GPU; 'always' also on the CPU)",
    )
    parser.add_argument(
        "--kernel-tokens", type=int, default=0, help="kernel check length (GPU 8192, CPU 256)"
    )
    parser.add_argument("--pipeline-steps", type=int, default=2)
    parser.add_argument("--no-pipeline", action="store_true", help="only the backend table")
    parser.add_argument("--vae", action="store_true", help="also time the VAE decode in fp32 vs bf16")
    parser.add_argument("--budget-s", type=float, default=400.0, help="skip optional work past this")
    parser.add_argument("--write", type=Path, help="write the report into this Markdown file")
    args = parser.parse_args(argv)
    args.compile = {"yes": True, "no": False, "always": "always"}[args.compile]
    args.kernel_tokens = args.kernel_tokens or (8192 if args.full else 256)
    if args.full and not torch.cuda.is_available():
        parser.error("no CUDA device: use --smoke for the CPU run")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    printed: list[str] = []

    def done(report: Report) -> None:
        for row in report.sections[len(printed) :]:
            printed.append(row["name"])
            print(f"[bench] {row['name']}: {row['status']} ({row.get('s', 0.0):.1f} s)", flush=True)
        if args.write:
            write_report(args.write, report)

    report = run(args, done)
    print(render(report), flush=True)
    return 1 if report.problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
