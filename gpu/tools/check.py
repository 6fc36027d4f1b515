"""A GPU's first contact: one command that measures what the first GPU run has to settle.

    python -m gpu.tools.check --write docs/gpu-benchmarks.md   # a CUDA machine: at most 9 minutes
    python -m gpu.tools.check --cpu --write /tmp/check.md      # no CUDA: the same sections, tiny shapes

`make gpu-check` runs it on any machine with a CUDA GPU and PyTorch, offline, after installing
the wheels of `.whl/` (`make gpu-wheels` fills it where the package registry is reachable).

Sections, each in a process of its own under a time limit, so that a crash, a hang or a sticky
CUDA error in one is a line of the report and the next one starts clean; the report is printed
as the sections run and rewritten after each one:

1. `machine`: GPU, capability, memory, driver, CUDA, cuDNN, torch, `/dev/shm`, CPUs, host memory,
   the packages that matter;
2. `attention`: every attention kernel on the model's real shapes (`attention_shapes`: joint
   self-attention at 480p/49 and at 720p/121 with the CFG batch of 2, past 2^31 elements;
   cross-attention over 257 image and 512 text keys; a sequence-parallel shard of 8 GPUs as the
   exchange delivers it, permuted, and as the model hands it on, heads-major): error against
   float32 math attention on sampled rows (`gpu.vap.attention.sampled_error`), ms, TFLOP/s, and
   the memory the kernel needs beyond its inputs and output;
3. `bench`: `python -m gpu.tools.bench --full` (s/step, achieved TFLOP/s and % of peak from
   `gpu.tools.flops`, a 2-step pipeline at full size with random weights, planned vs measured
   peak memory; `--smoke` on the CPU);
4. `sequence_parallel`: the Ulysses path (`gpu.parallel.sequence`) at world size 1 on NCCL (gloo
   on the CPU) against the unsplit model;
5. `host_to_device`: pinned and pageable host-to-device copy bandwidth.

Exit status 1 when a section failed or timed out, or reported a problem.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
MARKER = "<!-- gpu.tools.check output below: generated, do not edit -->"
TOTAL_LIMIT_S = 540.0  # 9 minutes on one H100/H200, sections and process starts included
GIB = 2**30
SHM = "/dev/shm"  # noqa: S108 - only its size is read (DataLoader workers and NCCL live in it)


@dataclass(frozen=True)
class Section:
    name: str
    title: str
    limit_s: float  # on a GPU; the CPU path's tiny shapes need far less


SECTIONS: list[Section] = [
    Section("machine", "Machine", 30),
    Section("attention", "Attention kernels on the model's shapes", 120),
    Section("bench", "Denoising step, pipeline and memory (`gpu.tools.bench`)", 300),
    Section("sequence_parallel", "Sequence parallel at world size 1", 50),
    Section("host_to_device", "Host to device", 30),
]
MIN_SECTION_S = 15.0  # kept for each section still to run


# -- sections (each runs in its own process: `--section NAME`) ------------------------------------


class Result:
    """A section's findings, saved to disk as they come (the parent reads whatever is there)."""

    def __init__(self, path: Path, deadline: float) -> None:
        self.path = path
        self.deadline = deadline
        self.data: dict[str, Any] = {"rows": [], "problems": []}
        self.save()

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, default=str))
        tmp.replace(self.path)

    def row(self, **row: Any) -> None:
        self.data["rows"].append(row)
        self.save()

    def problem(self, text: str) -> None:
        self.data["problems"].append(text)
        self.save()

    def left_s(self) -> float:
        return self.deadline - time.monotonic()


def _device(cpu: bool) -> Any:
    import torch

    return torch.device("cpu" if cpu else "cuda")


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _versions() -> dict[str, str]:
    import importlib.metadata

    out = {"python": platform.python_version()}
    for pkg in (
        "torch",
        "diffusers",
        "transformers",
        "flash-attn-4",
        "nvidia-cutlass-dsl",
        "quack-kernels",
        "flash_attn_3",
        "flash-attn",
        "pydantic",
        "numpy",
    ):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            out[pkg] = importlib.metadata.version(pkg)
    return out


def _driver() -> str:
    smi = shutil.which("nvidia-smi")
    try:
        if smi is None:
            raise FileNotFoundError("nvidia-smi")
        run = subprocess.run(  # noqa: S603 - fixed arguments, no shell
            [smi, "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=15,
            check=True,
        )
        return run.stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        with contextlib.suppress(OSError):
            return Path("/proc/driver/nvidia/version").read_text().splitlines()[0]
    return "unknown"


def section_machine(result: Result, cpu: bool) -> None:
    import torch

    row: dict[str, Any] = {
        "cpus": os.cpu_count(),
        "host_gib": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB,
        "torch": torch.__version__,
        "cuda": torch.version.cuda or "-",
        "cudnn": torch.backends.cudnn.version() or "-",
        "shm_gib": shutil.disk_usage(SHM).total / GIB if os.path.isdir(SHM) else None,
        "versions": _versions(),
    }
    if not cpu:
        props = torch.cuda.get_device_properties(0)
        row.update(
            gpu=props.name,
            count=torch.cuda.device_count(),
            capability=f"{props.major}.{props.minor}",
            memory_gib=props.total_memory / GIB,
            driver=_driver(),
        )
    else:
        row.update(gpu="none (CPU path)", driver="-", capability="-")
    result.row(**row)
    print(f"machine: {row}", flush=True)


@dataclass(frozen=True)
class AttentionShape:
    name: str
    batch: int
    queries: int
    keys: int
    heads: int
    dim: int
    layout: str  # "heads-major", "contiguous" ([B, S, H, D]) or "received" ([S, B, H, D] memory)

    @property
    def elements(self) -> int:
        return self.batch * max(self.queries, self.keys) * self.heads * self.dim

    @property
    def flops(self) -> int:
        return 4 * self.batch * self.heads * self.queries * self.keys * self.dim


def attention_shapes(cpu: bool) -> list[AttentionShape]:
    """The attention calls the model really makes (batch 2: the CFG rows), from its geometry."""
    from gpu.vap.configs import RELEASED_14B_CONFIG
    from gpu.vap.geometry import IMAGE_TOKENS, RELEASED, TEXT_TOKENS

    heads = int(RELEASED_14B_CONFIG["num_attention_heads"])
    dim = int(RELEASED_14B_CONFIG["attention_head_dim"])
    small = RELEASED.tokens_per_stream(49, 480, 832)
    large = RELEASED.tokens_per_stream(121, 720, 1280)
    if cpu:  # the same calls, tiny
        heads, dim, small, large = 4, 16, 48, 160
    shard = max(heads // 8, 1)  # heads per GPU of an 8-GPU job
    return [
        AttentionShape("joint self-attention 480p/49", 2, 2 * small, 2 * small, heads, dim, "heads-major"),
        AttentionShape("joint self-attention 720p/121", 2, 2 * large, 2 * large, heads, dim, "heads-major"),
        AttentionShape("cross-attention 480p/49, image", 2, small, IMAGE_TOKENS, heads, dim, "contiguous"),
        AttentionShape("cross-attention 480p/49, text", 2, small, TEXT_TOKENS, heads, dim, "contiguous"),
        AttentionShape("8-GPU shard 480p/49, received", 2, 2 * small, 2 * small, shard, dim, "received"),
        AttentionShape("8-GPU shard 480p/49", 2, 2 * small, 2 * small, shard, dim, "heads-major"),
    ]


def _attention_inputs(shape: AttentionShape, device: Any, dtype: Any) -> list[Any]:
    import torch

    from gpu.vap.attention import heads_major

    g = torch.Generator(device=device).manual_seed(0)

    def make(seq: int) -> Any:
        b, h, d = shape.batch, shape.heads, shape.dim
        if shape.layout == "received":
            return torch.randn(seq, b, h, d, generator=g, device=device, dtype=dtype).permute(1, 0, 2, 3)
        x = torch.randn(b, seq, h, d, generator=g, device=device, dtype=dtype)
        return heads_major(x) if shape.layout == "heads-major" else x

    return [make(shape.queries), make(shape.keys), make(shape.keys)]


def section_attention(result: Result, cpu: bool) -> None:
    import torch

    from gpu.vap.attention import CHECK_REL_TOL, FLASH_4, candidate_backends, run_kernel, sampled_error

    device = _device(cpu)
    dtype = torch.float32 if cpu else torch.bfloat16
    names = candidate_backends(device)
    extra = ["_native_flash", "_native_efficient"] if not cpu else ["_native_math", FLASH_4]
    names += [b for b in extra if b not in names]
    for shape in attention_shapes(cpu):
        print(f"attention: {shape.name} {shape.batch}x{shape.queries}x{shape.heads}x{shape.dim}", flush=True)
        try:
            q, k, v = _attention_inputs(shape, device, dtype)
        except Exception as exc:  # e.g. out of memory on a small GPU: the shape's rows say so
            result.row(
                shape=shape.name, backend="-", status=f"inputs: {type(exc).__name__}: {str(exc)[:120]}"
            )
            continue
        for name in names:
            row: dict[str, Any] = {"shape": shape.name, "elements": shape.elements, "backend": name}
            if result.left_s() < 10:
                result.row(**row, status="skipped: time limit")
                continue
            try:
                _sync(device)
                before = torch.cuda.memory_allocated(device) if not cpu else 0
                if not cpu:
                    torch.cuda.reset_peak_memory_stats(device)
                start = time.perf_counter()
                out = run_kernel(name, q, k, v)  # first call: JIT, autotuning
                _sync(device)
                row["first_s"] = time.perf_counter() - start
                if not cpu:
                    beyond = torch.cuda.max_memory_allocated(device) - before - out.nbytes
                    row["extra_gib"] = max(beyond, 0) / GIB
                row["rel_err"] = float(sampled_error(out, q, k, v))
                iters = max(1, min(5, int(2e14 / max(shape.flops, 1))))
                start = time.perf_counter()
                for _ in range(iters):
                    out = run_kernel(name, q, k, v)
                _sync(device)
                seconds = (time.perf_counter() - start) / iters
                row.update(ms=1e3 * seconds, tflops=shape.flops / seconds / 1e12)
                del out
                ok = row["rel_err"] <= CHECK_REL_TOL
                row["status"] = "ok" if ok else f"wrong: rel err {row['rel_err']:.1e} > {CHECK_REL_TOL}"
                if not ok:
                    result.problem(f"{name} on {shape.name}: rel err {row['rel_err']:.1e}")
            except Exception as exc:  # unsupported here: a row, and the next kernel
                row["status"] = f"unavailable: {type(exc).__name__}: {str(exc)[:120]}"
            result.row(**row)
            print(f"  {name}: {row.get('status')} {row.get('ms', 0):.2f} ms", flush=True)
        del q, k, v
        if not cpu:
            torch.cuda.empty_cache()


def section_bench(result: Result, cpu: bool) -> None:
    from gpu.tools import bench

    budget = max(30.0, result.left_s() - 20)
    argv = ["--smoke", "--vae"] if cpu else ["--full", "--budget-s", f"{budget:.0f}"]

    printed: list[str] = []

    def done(report: Any) -> None:
        result.data["markdown"] = bench.render(report)
        result.data["problems"] = list(report.problems)
        result.save()
        for row in report.sections[len(printed) :]:
            printed.append(row["name"])
            print(f"bench: {row['name']}: {row['status']} ({row.get('s', 0.0):.1f} s)", flush=True)

    bench.run(bench.parse_args(argv), done)


def section_sequence_parallel(result: Result, cpu: bool) -> None:
    import torch
    import torch.distributed as dist

    from gpu.parallel.sequence import apply_split
    from gpu.vap.geometry import TEXT_TOKENS
    from gpu.vap.tiny import IMAGE_DIM as TINY_IMAGE_DIM
    from gpu.vap.tiny import TEXT_DIM as TINY_TEXT_DIM
    from gpu.vap.tiny import TINY_TRANSFORMER_CONFIG
    from gpu.vap.transformer import WanTransformer3DMOTModel

    device = _device(cpu)
    backend = "gloo" if cpu else "nccl"
    heads = 8
    config = {**TINY_TRANSFORMER_CONFIG, "num_attention_heads": heads, "attention_head_dim": 64}
    config["added_kv_proj_dim"] = 64 * heads
    grid = (3, 4, 6) if cpu else (13, 60, 104)  # latents of a 480p/49 video on the GPU
    dtype = torch.float32 if cpu else torch.bfloat16
    torch.manual_seed(0)
    model = WanTransformer3DMOTModel(**config).to(device=device, dtype=dtype).eval()
    g = torch.Generator(device=device).manual_seed(1)

    def rand(*shape: int) -> Any:
        return torch.randn(*shape, generator=g, device=device, dtype=dtype)

    text, image = TINY_TEXT_DIM, TINY_IMAGE_DIM
    inputs = {
        "hidden_states": rand(2, 36, *grid),
        "timestep": torch.tensor([700.0, 700.0], device=device),
        "encoder_hidden_states": rand(2, TEXT_TOKENS, text),
        "encoder_hidden_states_image": rand(2, 257, image),
        "hidden_states_mot_ref": rand(1, 36, *grid),
        "encoder_hidden_states_mot_ref": rand(2, TEXT_TOKENS, text),
        "encoder_hidden_states_image_mot_ref": rand(2, 257, image),
        "return_dict": False,
    }

    def timed() -> tuple[Any, float]:
        with torch.no_grad():
            model(**inputs)  # warm-up
            _sync(device)
            start = time.perf_counter()
            out = model(**inputs)[0]
            _sync(device)
        return out, time.perf_counter() - start

    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        dist.init_process_group(backend, init_method=f"file://{tmp}/store", rank=0, world_size=1)
        init_s = time.perf_counter() - started
        try:
            whole, whole_s = timed()
            split = apply_split(model)
            out, split_s = timed()
            model.split_sequence(None)
        finally:
            dist.destroy_process_group()
    rel = float((out.float() - whole.float()).norm() / whole.float().norm())
    tolerance = 1e-5 if cpu else 1e-2
    row = {
        "backend": backend,
        "world": 1,
        "tokens": math.prod(grid) // 4,
        "rel_err": rel,
        "init_s": init_s,
        "split_ms": 1e3 * split_s,
        "whole_ms": 1e3 * whole_s,
        "exchanges": split.exchanges,
        "status": "ok" if rel <= tolerance and split.exchanges > 0 else f"rel err {rel:.1e} > {tolerance}",
    }
    result.row(**row)
    if row["status"] != "ok":
        result.problem(f"sequence parallel at world size 1: {row['status']}")
    print(f"sequence parallel: {row}", flush=True)


def section_host_to_device(result: Result, cpu: bool) -> None:
    import torch

    device = _device(cpu)
    size = (64 if cpu else 1024) * 2**20
    for pinned in (True, False):
        if pinned and cpu:
            result.row(memory="pinned", mib=size / 2**20, status="skipped: needs CUDA")
            continue
        src = torch.empty(size, dtype=torch.uint8, pin_memory=pinned)
        dst = torch.empty(size, dtype=torch.uint8, device=device)
        dst.copy_(src, non_blocking=pinned)  # warm-up
        _sync(device)
        iters = 5
        start = time.perf_counter()
        for _ in range(iters):
            dst.copy_(src, non_blocking=pinned)
        _sync(device)
        seconds = (time.perf_counter() - start) / iters
        label = ("pinned" if pinned else "pageable") + (" (host to host: no CUDA)" if cpu else "")
        result.row(memory=label, mib=size / 2**20, gb_s=size / seconds / 1e9, status="ok")
        print(f"host to device: {label} {size / seconds / 1e9:.1f} GB/s", flush=True)


SECTION_RUNNERS: dict[str, Callable[[Result, bool], None]] = {
    "machine": section_machine,
    "attention": section_attention,
    "bench": section_bench,
    "sequence_parallel": section_sequence_parallel,
    "host_to_device": section_host_to_device,
}


def run_section(name: str, result_path: Path, cpu: bool, limit_s: float) -> int:
    """The child process's side: run one section, saving its findings as they come."""
    result = Result(result_path, time.monotonic() + limit_s)
    try:
        SECTION_RUNNERS[name](result, cpu)
    except Exception as exc:
        result.data["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
        result.save()
        traceback.print_exc()
        return 1
    return 0


# -- the parent: sections in turn, each in a process under its limit ----------------------------


def _stream(pipe: Any, prefix: str) -> None:
    for line in iter(pipe.readline, ""):
        print(f"[{prefix}] {line}", end="", flush=True)


def run_child(section: Section, limit_s: float, cpu: bool, workdir: Path) -> dict[str, Any]:
    """Run `section` in a fresh process for at most `limit_s`; its findings and its fate."""
    result_path = workdir / f"{section.name}.json"
    command = [
        sys.executable,
        "-m",
        "gpu.tools.check",
        "--section",
        section.name,
        "--result",
        str(result_path),
        "--limit-s",
        f"{limit_s:.1f}",
        *(["--cpu"] if cpu else []),
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(ROOT), str(ROOT / "shared"), env.get("PYTHONPATH")) if p
    )
    started = time.monotonic()
    child = subprocess.Popen(  # noqa: S603 - this interpreter, fixed arguments, no shell
        command,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group: a timeout ends it and all it started
    )
    reader = threading.Thread(target=_stream, args=(child.stdout, section.name), daemon=True)
    reader.start()
    try:
        code: int | None = child.wait(timeout=limit_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGKILL)
        child.wait()
        code = None
    reader.join(timeout=5)
    found: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError):
        found = json.loads(result_path.read_text())
    if code is None:
        status = f"timed out after {limit_s:.0f} s"
    elif code != 0:
        status = f"failed: {found.get('error') or f'exit status {code}'}"
    else:
        status = "ok"
    return {**found, "status": status, "s": time.monotonic() - started, "limit_s": limit_s}


def run_all(
    cpu: bool, write: Path | None, sections: list[Section] | None = None
) -> dict[str, dict[str, Any]]:
    """Every section in turn, the report printed and written after each one."""
    sections = sections if sections is not None else SECTIONS
    started = time.monotonic()
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        for i, section in enumerate(sections):
            left = TOTAL_LIMIT_S - (time.monotonic() - started) - MIN_SECTION_S * (len(sections) - i - 1)
            limit = min(section.limit_s, left)
            print(f"== {section.name} (limit {limit:.0f} s)", flush=True)
            if left < MIN_SECTION_S:
                results[section.name] = {"status": "skipped: the 9-minute limit", "s": 0.0, "limit_s": 0.0}
            else:
                results[section.name] = run_child(section, limit, cpu, Path(tmp))
            print(f"== {section.name}: {results[section.name]['status']}", flush=True)
            if write is not None:
                write_report(write, render(results, sections, cpu, time.monotonic() - started))
    return results


def problems(results: dict[str, dict[str, Any]]) -> list[str]:
    out = []
    for name, found in results.items():
        if found.get("status") != "ok":
            out.append(f"{name}: {found.get('status')}")
        out += [f"{name}: {p}" for p in found.get("problems", [])]
    return out


# -- the report ------------------------------------------------------------------------------------


def _fmt(value: Any, spec: str = ".2f") -> str:
    if value is None:
        return "-"
    return format(value, spec) if isinstance(value, float) else str(value)


UNMEASURED = """\
**GPU figures: unmeasured.** No GPU has run `make gpu-check` yet: this is its CPU path (no CUDA,
tiny shapes, the same code), written by the command itself. Its times and sizes say nothing about
a GPU; every GPU figure in the repository stays an estimate until a GPU run replaces this section.
"""


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(r) + " |" for r in rows]


MACHINE_COLUMNS = [
    ("GPU", "gpu", None),
    ("count", "count", None),
    ("capability", "capability", None),
    ("memory GiB", "memory_gib", ".1f"),
    ("driver", "driver", None),
    ("CUDA", "cuda", None),
    ("cuDNN", "cudnn", None),
    ("torch", "torch", None),
    ("shm GiB", "shm_gib", ".1f"),
    ("CPUs", "cpus", None),
    ("host GiB", "host_gib", ".1f"),
]
ATTENTION_COLUMNS = [
    ("shape", "shape", None),
    ("elements", "elements", ".3g"),
    ("kernel", "backend", None),
    ("rel err vs math", "rel_err", ".1e"),
    ("ms", "ms", ".2f"),
    ("TFLOP/s", "tflops", ".1f"),
    ("extra GiB", "extra_gib", ".2f"),
    ("first call s", "first_s", ".1f"),
    ("status", "status", None),
]
SEQUENCE_PARALLEL_COLUMNS = [
    ("backend", "backend", None),
    ("world", "world", None),
    ("tokens per stream", "tokens", None),
    ("rel err vs unsplit", "rel_err", ".1e"),
    ("split ms", "split_ms", ".1f"),
    ("unsplit ms", "whole_ms", ".1f"),
    ("all-to-alls", "exchanges", None),
    ("init s", "init_s", ".2f"),
    ("status", "status", None),
]
HOST_TO_DEVICE_COLUMNS = [
    ("host memory", "memory", None),
    ("MiB", "mib", ".0f"),
    ("GB/s", "gb_s", ".1f"),
    ("status", "status", None),
]


def _columns(found: dict[str, Any], columns: list[tuple[str, str, str | None]]) -> list[str]:
    rows = []
    for r in found.get("rows", []):
        cells = []
        for _, key, spec in columns:
            value = r.get(key)
            cells.append(format(value, spec) if spec and isinstance(value, (int, float)) else _fmt(value))
        rows.append(cells)
    return _table([title for title, _, _ in columns], rows)


def _render_machine(found: dict[str, Any]) -> list[str]:
    lines = _columns(found, MACHINE_COLUMNS)
    for r in found.get("rows", []):
        lines += ["", "Packages: " + ", ".join(f"{k} {v}" for k, v in r.get("versions", {}).items())]
    return lines


def _render_attention(found: dict[str, Any]) -> list[str]:
    return _columns(found, ATTENTION_COLUMNS)


def _render_bench(found: dict[str, Any]) -> list[str]:
    text = str(found.get("markdown", "")).replace("### Run:", "Run:").replace("\nResult:", "\nBench result:")
    return text.strip().splitlines()


def _render_sequence_parallel(found: dict[str, Any]) -> list[str]:
    return _columns(found, SEQUENCE_PARALLEL_COLUMNS)


def _render_host_to_device(found: dict[str, Any]) -> list[str]:
    return _columns(found, HOST_TO_DEVICE_COLUMNS)


RENDERERS: dict[str, Callable[[dict[str, Any]], list[str]]] = {
    "machine": _render_machine,
    "attention": _render_attention,
    "bench": _render_bench,
    "sequence_parallel": _render_sequence_parallel,
    "host_to_device": _render_host_to_device,
}


def render(results: dict[str, dict[str, Any]], sections: list[Section], cpu: bool, wall_s: float) -> str:
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    mode = "the CPU path, tiny shapes" if cpu else "GPU"
    lines = [UNMEASURED] if cpu else []
    lines += [f"_Generated {stamp} by `python -m gpu.tools.check` ({mode}) in {wall_s:.0f} s._", ""]
    for section in sections:
        found = results.get(section.name)
        lines += [f"### {section.title}", ""]
        if found is None:
            lines += ["Not run yet.", ""]
            continue
        renderer = RENDERERS.get(section.name)
        body = renderer(found) if renderer else []
        lines += [*body, ""] if body else []
        seconds, limit = found.get("s", 0.0), found.get("limit_s", 0.0)
        lines += [f"Section status: {found.get('status')} ({seconds:.1f} s, limit {limit:.0f} s)", ""]
    found_problems = problems(results)
    lines += ["Result: " + ("; ".join(found_problems) if found_problems else "all checks passed"), ""]
    return "\n".join(lines)


def write_report(path: Path, text: str) -> None:
    """Replace the generated part of the document (after the marker), keeping the prose above."""
    head = path.read_text().split(MARKER)[0] if path.exists() else "# GPU benchmarks\n\n"
    path.write_text(f"{head.rstrip()}\n\n{MARKER}\n\n{text}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cpu", action="store_true", help="the CPU path: tiny shapes, no CUDA needed")
    parser.add_argument("--write", type=Path, help="write the report into this Markdown file")
    parser.add_argument("--section", choices=sorted(SECTION_RUNNERS), help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--limit-s", type=float, default=60.0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.section:
        return run_section(args.section, args.result, args.cpu, args.limit_s)
    cpu = args.cpu
    if not cpu:
        import torch

        if not torch.cuda.is_available():
            print("no CUDA device: running the CPU path (tiny shapes)", flush=True)
            cpu = True
    results = run_all(cpu, args.write)
    found = problems(results)
    print("Result: " + ("; ".join(found) if found else "all checks passed"), flush=True)
    return 1 if found else 0


if __name__ == "__main__":
    raise SystemExit(main())
