"""ESTIMATED time and GPU cost of one VAP job on 1, 2, 4 or 8 GPUs (sequence parallel).

Nothing here is measured: per-step time = the transformer's FLOPs / (N × peak × efficiency) +
the Ulysses all-to-all bytes per GPU / all-to-all bandwidth (on the critical path, not
overlapped), plus the once-per-video work that runs on rank 0 only (text/image encoders, three
VAE encodes, one VAE decode). The FLOPs are `gpu.tools.flops`' formula for the released config
(`gpu.vap.configs`), which tests hold equal to torch's FLOP counter on the model. Pure Python, no
torch: cheap to import wherever the cost model runs (the API container's routing included).

    python -m gpu.tools.scaling                         # default job: 480p 16:9, 49 frames, 50 steps
    python -m gpu.tools.scaling --resolution 720p --frames 121 --efficiency 0.5
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from vap_shared.contract import (
    ASPECT_RATIOS,
    DEFAULT_NUM_FRAMES,
    DEFAULT_RESOLUTION,
    DEFAULT_STEPS,
    GPU_COUNTS,
    LANDSCAPE_SIZES,
    RESOLUTIONS,
    frame_size,
)
from vap_shared.cost import DEFAULT_MODAL_PER_SECOND

from gpu.tools.flops import analytic_step_flops
from gpu.vap.configs import RELEASED_14B_CONFIG
from gpu.vap.geometry import RELEASED, geometry_of

Config = Mapping[str, Any]  # a transformer config (`gpu.vap.configs.RELEASED_14B_CONFIG`'s keys)


# Dense bf16 tensor-core peak per GPU (SXM parts), TFLOP/s: what "% of peak" is measured against.
PEAK_TFLOPS = {"H100": 989.4, "H200": 989.4, "B200": 2250.0, "A100": 312.0}


@dataclass(frozen=True)
class Hardware:
    name: str = "H100"
    peak_tflops: float = PEAK_TFLOPS["H100"]
    efficiency: float = 0.6  # fraction of peak the transformer reaches (issue 10 targets >= 0.63)
    all_to_all_gb_s: float = 350.0  # effective per-GPU all-to-all bandwidth over NVLink
    price_per_gpu_s: float = DEFAULT_MODAL_PER_SECOND["H100"]  # Modal list price
    # Once-per-video work on rank 0 (VAE fp32 convs on TF32 tensor cores, encoders): effective rate.
    serial_tflops: float = 150.0


H100 = Hardware()
H200 = Hardware(
    name="H200", peak_tflops=PEAK_TFLOPS["H200"], price_per_gpu_s=DEFAULT_MODAL_PER_SECOND["H200"]
)


@dataclass(frozen=True)
class JobShape:
    """A job's size; by default the sidecar's defaults, landscape (16:9)."""

    width: int = LANDSCAPE_SIZES[DEFAULT_RESOLUTION][0]
    height: int = LANDSCAPE_SIZES[DEFAULT_RESOLUTION][1]
    num_frames: int = DEFAULT_NUM_FRAMES
    steps: int = DEFAULT_STEPS
    cfg: bool = True  # CFG runs as one transformer batch of 2

    @property
    def tokens(self) -> int:
        """Tokens per stream (the reference stream has as many)."""
        return RELEASED.tokens_per_stream(self.num_frames, self.height, self.width)

    @property
    def batch(self) -> int:
        return 2 if self.cfg else 1


def step_flops(shape: JobShape, cfg: Config = RELEASED_14B_CONFIG, steady: bool = True) -> float:
    """FLOPs of one denoising step (one transformer forward at the CFG batch): `gpu.tools.flops`'
    formula. `steady` (default): as the pipeline runs steps 2..N (`reuse_step_invariants`);
    `steady=False`: everything recomputed at every step."""
    return float(
        analytic_step_flops(cfg, shape.num_frames, shape.height, shape.width, steady, batch=shape.batch)
    )


def all_to_all_bytes_per_gpu(
    shape: JobShape, gpus: int, cfg: Config = RELEASED_14B_CONFIG, steady: bool = True
) -> float:
    """Bytes one GPU sends per step (bf16): Q, K, V in and the output back, for every self-attention
    (`steady`: block 0's at one row, the CFG rows being views of one row until its cross-attention)."""
    if gpus == 1:
        return 0.0
    s = r = geometry_of(cfg).tokens_per_stream(shape.num_frames, shape.height, shape.width)
    width = int(cfg["num_attention_heads"]) * int(cfg["attention_head_dim"])
    experts = sorted(set(cfg["block_idx_with_mot_ref"]))

    def exchanged(block: int) -> int:
        """Tokens of Q, K, V and the output exchanged per row: plain blocks the main stream's,
        expert blocks [main; ref]'s, the last one queries/output main only, keys/values both."""
        if block not in experts:
            return 4 * s
        if block != experts[-1]:
            return 4 * (s + r)
        return 2 * s + 2 * (s + r)

    elements = sum(exchanged(i) for i in range(int(cfg["num_layers"]))) * shape.batch * width
    if steady:
        elements -= (shape.batch - 1) * exchanged(0) * width
    # Each GPU holds 1/N of every tensor and keeps 1/N of that; 2 bytes per element.
    return elements / gpus * (gpus - 1) / gpus * 2.0


def once_per_video_flops(shape: JobShape) -> float:
    """Encoders + 3 VAE encodes + 1 decode, scaled from 4.9e14 at 480p/49 (docs: gpu-perf notes)."""
    pixels = shape.width * shape.height * shape.num_frames
    return 1.97e13 + 4.7e14 * pixels / (832 * 480 * 49)


@dataclass(frozen=True)
class Estimate:
    gpus: int
    compute_s: float  # per step
    all_to_all_s: float  # per step
    serial_s: float  # once per video, rank 0 only
    total_s: float  # steps × (compute + all-to-all) + serial
    cost_usd: float  # gpus × price × total
    speedup: float  # versus one GPU

    @property
    def step_s(self) -> float:
        return self.compute_s + self.all_to_all_s


def estimate(shape: JobShape, gpus: int, hw: Hardware = H100, cfg: Config = RELEASED_14B_CONFIG) -> Estimate:
    """ESTIMATE of the GPU time of one job on `gpus` GPUs (excludes download, upload, cold start)."""
    if gpus not in GPU_COUNTS:
        raise ValueError(f"gpus must be one of {GPU_COUNTS}")
    if int(cfg["num_attention_heads"]) % gpus or shape.tokens < gpus:
        raise ValueError(f"{shape} cannot be split over {gpus} GPUs")

    def run(n: int) -> tuple[float, float, float, float]:
        compute = step_flops(shape, cfg) / (n * hw.peak_tflops * 1e12 * hw.efficiency)
        comm = all_to_all_bytes_per_gpu(shape, n, cfg) / (hw.all_to_all_gb_s * 1e9)
        serial = once_per_video_flops(shape) / (hw.serial_tflops * 1e12)
        return compute, comm, serial, shape.steps * (compute + comm) + serial

    compute, comm, serial, total = run(gpus)
    return Estimate(
        gpus=gpus,
        compute_s=compute,
        all_to_all_s=comm,
        serial_s=serial,
        total_s=total,
        cost_usd=gpus * hw.price_per_gpu_s * total,
        speedup=run(1)[3] / total,
    )


def table(shape: JobShape, hw: Hardware = H100, gpu_counts: tuple[int, ...] = GPU_COUNTS) -> list[Estimate]:
    """Cost vs latency per GPU count (ESTIMATES), for the cost model and the sidecar's `gpus` choice."""
    return [estimate(shape, n, hw) for n in gpu_counts]


def format_table(shape: JobShape, hw: Hardware = H100) -> str:
    lines = [
        f"ESTIMATE (not measured): {shape.width}x{shape.height}, {shape.num_frames} frames, "
        f"{shape.steps} steps, {shape.tokens} tokens/stream, {step_flops(shape) / 1e15:.3f} PFLOP/step; "
        f"{hw.name} at "
        f"{hw.efficiency:.0%} of {hw.peak_tflops:.0f} TFLOP/s, all-to-all {hw.all_to_all_gb_s:.0f} GB/s",
        f"{'GPUs':>4} {'s/step':>7} {'a2a s/step':>10} {'rank-0 s':>8} {'job s':>7} {'speedup':>7} "
        f"{'GPU $':>7}",
    ]
    for e in table(shape, hw):
        lines.append(
            f"{e.gpus:>4} {e.step_s:>7.3f} {e.all_to_all_s:>10.4f} {e.serial_s:>8.1f} {e.total_s:>7.1f} "
            f"{e.speedup:>6.2f}x {e.cost_usd:>7.3f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Estimated time/cost per GPU count (sequence parallel).")
    parser.add_argument("--resolution", choices=RESOLUTIONS, default=DEFAULT_RESOLUTION)
    parser.add_argument("--aspect", choices=ASPECT_RATIOS, default="16:9")
    parser.add_argument("--frames", type=int, default=DEFAULT_NUM_FRAMES)
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    parser.add_argument("--gpu", choices=["H100", "H200"], default="H100")
    parser.add_argument("--efficiency", type=float, default=H100.efficiency)
    args = parser.parse_args(argv)
    width, height = frame_size(args.aspect, args.resolution)
    base = H100 if args.gpu == "H100" else H200
    hw = Hardware(**{**base.__dict__, "efficiency": args.efficiency})
    print(format_table(JobShape(width, height, args.frames, args.steps), hw))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
