"""How much GPU memory each accepted job needs, measured on the model, and the GPU it fits.

    python -m gpu.tools.plan          # measure (meta device), print every size; 1 if one does not fit
    python -m gpu.tools.plan --write  # ... and rewrite gpu/tools/plan_table.py (the table routing reads)
    python -m gpu.tools.plan --check  # ... and exit 1 if gpu/tools/plan_table.py is not what the model gives

A job's peak is the largest of its phases (`gpu.vap.footprint`): encode (UMT5 + CLIP), VAE encode,
denoising (the transformer step and what the loop keeps, with the attention kernel family that
allocates most), VAE decode, each on top of what stays resident on the GPU (transformer, VAE,
safety checker, the rotary tables' cache bound, and the encoders unless they are kept in host
memory), plus the allocator margin: `MARGIN_FIXED_GIB` (CUDA context, cuBLAS/cuDNN
workspaces) and `MARGIN_FRACTION` of the phase's activations (caching-allocator rounding and
fragmentation; run with `PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True` to keep it small).

Each job goes to the cheapest offered GPU it fits (`gpu.service.routing.OFFERED`); a GPU class
keeps the encoders in host memory (`offload_encoders`) only if some job routed to it needs the
room. With `gpus=N` (sequence parallel) each GPU holds all weights and 1/N of each token stream;
the VAE runs on one GPU. The table this writes is what `gpu.service.routing.choose_gpu` reads.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from vap_shared.contract import (
    ASPECT_RATIOS,
    GPU_COUNTS,
    NUM_FRAMES_MAX,
    NUM_FRAMES_MIN,
    RESOLUTIONS,
    frame_size,
)

from gpu.service.generation import valid_num_frames
from gpu.service.routing import GIB, OFFERED, gpu_type, modal_gpu, read_table
from gpu.vap import footprint
from gpu.vap.geometry import RELEASED

MARGIN_FIXED_GIB = 2.0
MARGIN_FRACTION = 0.10
TABLE_PATH = Path(__file__).with_name("plan_table.py")


def accepted_sizes() -> Iterator[tuple[str, str, int, int]]:
    """(resolution, aspect, width, height) of every size a sidecar may ask for."""
    for resolution in RESOLUTIONS:
        for aspect in ASPECT_RATIOS:
            yield resolution, aspect, *frame_size(aspect, resolution)


def gpu_frame_counts() -> list[int]:
    """The frame counts the GPU runs (each requested 9..121 maps to its nearest 4k+1)."""
    return sorted({valid_num_frames(n) for n in range(NUM_FRAMES_MIN, NUM_FRAMES_MAX + 1)})


# -- measuring (torch, meta device) ----------------------------------------------------------


PHASES = ("encode", "vae_encode", "denoise", "vae_decode")


def _phases(width: int, height: int, frames: int, gpus: int) -> dict[str, int]:
    """Bytes above the weights in each phase of one job (per GPU for `gpus` > 1)."""
    enc = footprint.encode()
    # The VAE runs frame by frame (its trace depends on the frame count, ~seconds each): its peak
    # at the longest accepted video bounds every shorter one at that size. Transposed sizes
    # allocate the same, so one orientation is measured (footprint.vae).
    vae = footprint.vae(NUM_FRAMES_MAX, min(width, height), max(width, height))
    tokens = RELEASED.tokens_per_stream(frames, height, width)
    return {
        "encode": enc.peak,
        "vae_encode": enc.outputs + vae.encode + 2 * vae.latents,
        "denoise": footprint.denoise_model().peak(math.ceil(tokens / gpus))
        + footprint.sequence_exchange(tokens, gpus),
        "vae_decode": vae.decode,
    }


def _weights() -> dict[str, int]:
    return dict(vars(footprint.weights()))


def peak_bytes(weights: dict[str, int], phases: dict[str, int], offload_encoders: bool) -> int:
    """Peak of a job: the largest phase on top of the resident weights, margin included."""
    resident = weights["transformer"] + weights["vae"] + weights["safety"] + weights["rotary_cache"]
    encoders = weights["text_encoder"] + weights["image_encoder"]
    if not offload_encoders:
        resident += encoders
    worst = 0
    for name, active in phases.items():
        lent = encoders if (offload_encoders and name == "encode") else 0
        worst = max(worst, resident + lent + round(active * (1 + MARGIN_FRACTION)))
    return worst + round(MARGIN_FIXED_GIB * GIB)


def build_table() -> dict[str, Any]:
    """Measure every accepted job and route it (what `--write` stores in gpu/tools/plan_table.py)."""
    weights = _weights()
    jobs: list[dict[str, Any]] = []
    for _, _, width, height in accepted_sizes():
        for frames in gpu_frame_counts():
            for gpus in GPU_COUNTS:
                phases = _phases(width, height, frames, gpus)
                route = None
                for gpu in OFFERED:
                    for offload in (False, True):
                        if peak_bytes(weights, phases, offload) <= gpu.capacity_gib * GIB:
                            route = (gpu.name, offload)
                            break
                    if route:
                        break
                jobs.append(
                    {
                        "width": width,
                        "height": height,
                        "num_frames": frames,
                        "gpus": gpus,
                        "phases": phases,
                        "gpu": route[0] if route else None,
                        "needs_offload": bool(route and route[1]),
                    }
                )
    # A GPU class (type × count) keeps the encoders on the host if any job routed to it needs that.
    policy: dict[str, bool] = {}
    for job in jobs:
        needs = job.pop("needs_offload")
        if job["gpu"]:
            key = f"{job['gpu']}:{job['gpus']}"
            policy[key] = policy.get(key, False) or needs
    for job in jobs:
        offload = policy.get(f"{job['gpu']}:{job['gpus']}", False)
        job["peak_bytes"] = peak_bytes(weights, job["phases"], offload)
    return {"weights": weights, "offload_encoders": policy, "jobs": jobs}


JOB_FIELDS = ("width", "height", "num_frames", "gpus", "gpu", "peak_bytes")


def _literal(value: Any) -> str:
    # Python literals as ruff format writes them (double quotes), so the file stays lint-clean.
    return json.dumps(value) if isinstance(value, str) else repr(value)


def _block(name: str, items: dict[str, Any]) -> str:
    body = "".join(f"    {_literal(k)}: {_literal(v)},\n" for k, v in items.items())
    return f"{name} = {{\n{body}}}\n"


def write_table(table: dict[str, Any], path: Path = TABLE_PATH) -> None:
    """One row per job: JOB_FIELDS, then the phases' bytes in PHASES order."""
    rows = "".join(
        "    ("
        + ", ".join([*(_literal(job[f]) for f in JOB_FIELDS), *(str(job["phases"][p]) for p in PHASES)])
        + "),\n"
        for job in table["jobs"]
    )
    path.write_text(
        '"""Generated by `python -m gpu.tools.plan --write` from the model (meta device): do not edit.\n\n'
        "Bytes per phase above the weights and the route of every accepted job, and each GPU class's\n"
        'encoder policy; gpu/tools/plan.py explains them."""\n\n'
        + _block("WEIGHTS", table["weights"])
        + _block("OFFLOAD_ENCODERS", table["offload_encoders"])
        + f"JOB_FIELDS = ({', '.join(map(_literal, JOB_FIELDS))})\n"
        + f"PHASES = ({', '.join(map(_literal, PHASES))})\n"
        + f"JOBS = [\n{rows}]\n"
    )


# -- report -----------------------------------------------------------------------------------


def _requested_ranges() -> dict[int, tuple[int, int]]:
    ranges: dict[int, tuple[int, int]] = {}
    for n in range(NUM_FRAMES_MIN, NUM_FRAMES_MAX + 1):
        lo, hi = ranges.get(valid_num_frames(n), (n, n))
        ranges[valid_num_frames(n)] = (min(lo, n), max(hi, n))
    return ranges


def report(table: dict[str, Any], gpus: int = 1) -> tuple[list[str], int]:
    """Printable lines for every accepted size at `gpus` GPUs, and how many do not fit."""
    ranges = _requested_ranges()
    by_key = {(j["width"], j["height"], j["num_frames"], j["gpus"]): j for j in table["jobs"]}
    weights = table["weights"]
    lines = [
        "weights (GiB): " + ", ".join(f"{k} {v / GIB:.2f}" for k, v in sorted(weights.items())),
        f"margin: {MARGIN_FIXED_GIB} GiB + {MARGIN_FRACTION:.0%} of each phase's activations; "
        "encoders in host memory on: "
        + (", ".join(k for k, v in sorted(table["offload_encoders"].items()) if v) or "none"),
        f"{'size':<11} {'aspect':<6} {'frames':>6} {'requested':>9}  {'gpu':<9} {'peak GiB':>8} "
        f"{'capacity':>8}  {'denoise':>7} {'vae dec*':>8}  fits",
    ]
    failures = 0
    for resolution, aspect, width, height in accepted_sizes():
        for frames in gpu_frame_counts():
            job = by_key[(width, height, frames, gpus)]
            lo, hi = ranges[frames]
            gpu = gpu_type(job["gpu"]) if job["gpu"] else None
            fits = gpu is not None and job["peak_bytes"] <= gpu.capacity_gib * GIB
            failures += not fits
            lines.append(
                f"{resolution + f' {width}x{height}':<11} {aspect:<6} {frames:>6} {f'{lo}-{hi}':>9}  "
                f"{modal_gpu(gpu, gpus) if gpu else 'none':<9} {job['peak_bytes'] / GIB:>8.1f} "
                f"{gpu.capacity_gib if gpu else 0:>8.1f}  {job['phases']['denoise'] / GIB:>7.1f} "
                f"{job['phases']['vae_decode'] / GIB:>8.1f}  {'yes' if fits else 'NO'}"
            )
    lines.append(
        "peak: per GPU, margin included; denoise / vae dec: activations above the weights "
        f"(* measured at {NUM_FRAMES_MAX} frames, a bound for fewer)"
    )
    return lines, failures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--gpus", type=int, default=1, choices=GPU_COUNTS, help="GPUs per job to print")
    parser.add_argument("--write", action="store_true", help="rewrite gpu/tools/plan_table.py")
    parser.add_argument("--check", action="store_true", help="exit 1 if gpu/tools/plan_table.py is stale")
    args = parser.parse_args(argv)
    table = build_table()
    lines, failures = report(table, args.gpus)
    print("\n".join(lines))
    status = 0
    if failures:
        print(f"{failures} accepted job(s) do not fit any offered GPU", file=sys.stderr)
        status = 1
    if args.write:
        write_table(table)
        print(f"wrote {TABLE_PATH}")
    elif args.check and table != read_table():
        print(f"{TABLE_PATH} is stale: run python -m gpu.tools.plan --write", file=sys.stderr)
        status = 1
    return status


if __name__ == "__main__":
    raise SystemExit(main())
