"""ESTIMATED time and GPU cost of one VAP job on 1, 2, 4 or 8 GPUs (sequence parallel).

Nothing here is measured: per-step time = the transformer's FLOPs / (N × peak × efficiency) +
the Ulysses all-to-all bytes per GPU / all-to-all bandwidth (on the critical path, not
overlapped), plus the once-per-video work that runs on rank 0 only (text/image encoders, three
VAE encodes, one VAE decode). FLOPs are counted analytically from the model's dimensions
(tests/gpu/test_parallel_scaling.py ties the count to torch's FLOP counter on the real model
on the meta device). Pure Python, no torch: cheap to import wherever the cost model runs.

    python -m gpu.tools.scaling                         # default job: 480p 16:9, 49 frames, 50 steps
    python -m gpu.tools.scaling --resolution 720p --frames 121 --efficiency 0.5
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from vap_shared.cost import DEFAULT_MODAL_PER_SECOND

from gpu.service.generation import LANDSCAPE_SIZES
from gpu.vap.geometry import RELEASED

GPU_COUNTS = (1, 2, 4, 8)


@dataclass(frozen=True)
class ModelDims:
    """The released VAP-Wan2.1-I2V-14B transformer (RELEASED_14B_CONFIG)."""

    layers: int = 40
    # Blocks 0, 4, ..., 36: joint [main; ref] attention. Block 0 is always the first expert block
    # here (as in the released config): the one whose work CFG rows share (`step_flops`).
    expert_blocks: int = 10
    width: int = 5120  # 40 heads × 128
    heads: int = 40
    ffn: int = 13824
    text_tokens: int = 512
    image_tokens: int = 257
    text_dim: int = 4096
    image_dim: int = 1280
    in_channels: int = 36
    out_channels: int = 16
    patch: tuple[int, int, int] = (1, 2, 2)
    freq_dim: int = 256


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
    width: int = 832
    height: int = 480
    num_frames: int = 49
    steps: int = 50
    cfg: bool = True  # CFG runs as one transformer batch of 2

    @property
    def tokens(self) -> int:
        """Tokens per stream (the reference stream has as many)."""
        return RELEASED.tokens_per_stream(self.num_frames, self.height, self.width)

    @property
    def batch(self) -> int:
        return 2 if self.cfg else 1


def step_flops(shape: JobShape, dims: ModelDims | None = None, steady: bool = True) -> float:
    """FLOPs of one denoising step (one transformer forward at the CFG batch), dead reference work
    skipped. `steady` (default): as the pipeline runs steps 2..N (`reuse_step_invariants`): the
    context embedding, every block's context K/V and block 0's reference Q/K/V are computed once
    per video, and the CFG rows (views of one row) share the patch/time embedding and block 0 up
    to its cross-attention. `steady=False`: everything recomputed at every step (gpu/tools/flops.py
    counts both on the model itself)."""
    dims = dims or ModelDims()
    s = r = shape.tokens
    d, f = dims.width, dims.ffn
    ctx = dims.text_tokens + dims.image_tokens
    context_kv = 0 if steady else 4 * ctx * d * d  # per stream and block: K, V over the context

    def stream(n: int, keys: int) -> float:
        """Per-token work of one stream in one block: self-attn projections + core, cross, FFN."""
        return 8 * n * d * d + 4 * n * keys * d + 4 * n * d * d + context_kv + 4 * n * ctx * d + 4 * n * d * f

    ref_qkv = 6 * r * d * d  # block 0's reference Q, K, V
    plain = (dims.layers - dims.expert_blocks) * stream(s, s)
    experts = (dims.expert_blocks - 1) * (stream(s, s + r) + stream(r, s + r))
    last = stream(s, s + r) + 4 * r * d * d  # the reference only gives keys/values there
    patch = 2 * s * dims.in_channels * dims.patch[0] * dims.patch[1] * dims.patch[2] * d
    out = 2 * s * d * dims.out_channels * dims.patch[0] * dims.patch[1] * dims.patch[2]
    time = 2 * (dims.freq_dim * d + d * d + 6 * d * d)
    embed_context = 2 * dims.text_tokens * (dims.text_dim * d + d * d) + 2 * dims.image_tokens * (
        dims.image_dim * dims.image_dim + dims.image_dim * d
    )
    per_row = plain + experts + last + patch + out + time + (0 if steady else embed_context)
    if not steady:
        return float(shape.batch * per_row)
    per_row -= ref_qkv
    # Block 0 up to its cross-attention: main Q/K/V/O + joint core, reference O + core (its Q/K/V
    # are per video), or main Q/K/V/O + core and reference K/V if it is the only expert block.
    if dims.expert_blocks > 1:
        block0 = 8 * s * d * d + 4 * s * (s + r) * d + 2 * r * d * d + 4 * r * (s + r) * d
    else:
        block0 = 8 * s * d * d + 4 * s * (s + r) * d
    shared = patch + time + block0
    return float(shape.batch * (per_row - shared) + shared)


def all_to_all_bytes_per_gpu(
    shape: JobShape, gpus: int, dims: ModelDims | None = None, steady: bool = True
) -> float:
    """Bytes one GPU sends per step (bf16): Q, K, V in and the output back, for every self-attention
    (`steady`: block 0's at one row, the CFG rows being views of one row until its cross-attention)."""
    dims = dims or ModelDims()
    if gpus == 1:
        return 0.0
    s = r = shape.tokens
    row = shape.batch * dims.width  # elements per token
    plain = (dims.layers - dims.expert_blocks) * 4 * s * row
    experts = (dims.expert_blocks - 1) * 4 * (s + r) * row
    last = (2 * s + 2 * (s + r)) * row  # queries/output main only, keys/values main + ref
    elements = plain + experts + last
    if steady:
        block0 = 4 * (s + r) if dims.expert_blocks > 1 else 2 * s + 2 * (s + r)
        elements -= (shape.batch - 1) * block0 * dims.width
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


def estimate(shape: JobShape, gpus: int, hw: Hardware = H100, dims: ModelDims | None = None) -> Estimate:
    """ESTIMATE of the GPU time of one job on `gpus` GPUs (excludes download, upload, cold start)."""
    if gpus not in GPU_COUNTS:
        raise ValueError(f"gpus must be one of {GPU_COUNTS}")
    dims = dims or ModelDims()
    if dims.heads % gpus or shape.tokens < gpus:
        raise ValueError(f"{shape} cannot be split over {gpus} GPUs")

    def run(n: int) -> tuple[float, float, float, float]:
        compute = step_flops(shape, dims) / (n * hw.peak_tflops * 1e12 * hw.efficiency)
        comm = all_to_all_bytes_per_gpu(shape, n, dims) / (hw.all_to_all_gb_s * 1e9)
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
    parser.add_argument("--resolution", choices=sorted(LANDSCAPE_SIZES), default="480p")
    parser.add_argument("--aspect", choices=["16:9", "9:16"], default="16:9")
    parser.add_argument("--frames", type=int, default=49)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--gpu", choices=["H100", "H200"], default="H100")
    parser.add_argument("--efficiency", type=float, default=H100.efficiency)
    args = parser.parse_args(argv)
    width, height = LANDSCAPE_SIZES[args.resolution]
    if args.aspect == "9:16":
        width, height = height, width
    base = H100 if args.gpu == "H100" else H200
    hw = Hardware(**{**base.__dict__, "efficiency": args.efficiency})
    print(format_table(JobShape(width, height, args.frames, args.steps), hw))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
