"""The results table (printed) and docs/benchmarks.md (written) from one run's results."""

from __future__ import annotations

import datetime as dt
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.cold_start import ColdStartResult
from bench.common import ROOT, machine
from bench.cost import GENERATION_S, GENERATION_S_ESTIMATE, MODAL_H100_PER_S, CostResult
from bench.large_output import TransferResult
from bench.per_job import PerJobResult

# A ratio, not milliseconds: both sides are measured round-robin in one run, so a slower or busier
# machine moves them together (an absolute 300 ms would read MISSED on a slower machine).
COLD_TARGET_RATIO = 1.8  # x a bare `import boto3`, for every handler
PACKAGE_TARGET_MB = 20.0
GB_S_TARGET = 1.0
RSS_TARGET_MB = 150.0
THROUGHPUT_TARGET_RATIO = 1.5


@dataclass
class Results:
    cold: ColdStartResult | None = None
    jobs: PerJobResult | None = None
    output: list[TransferResult] | None = None
    cost: CostResult | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    args: dict[str, Any] = field(default_factory=dict)
    load: list[float] = field(default_factory=list)  # 1-minute load average at start and end


@dataclass
class Row:
    metric: str
    value: str
    compared: str
    ratio: str
    target: str
    met: bool | None  # None: no target


def _ok(met: bool | None) -> str:
    return "" if met is None else ("yes" if met else "**MISSED**")


def rows(r: Results) -> list[Row]:
    out: list[Row] = []
    if r.cold is not None:
        modes = r.cold.modes
        floor, clients = modes["floor"], modes["floor_clients"]
        for name in (mode for mode in modes if mode not in ("floor", "floor_clients")):
            m = modes[name]
            later = f"; first request + {m.median_first_use_ms:.0f}" if m.median_first_use_ms >= 0.5 else ""
            out.append(
                Row(
                    f"cold start {name}: import + clients, median of {m.runs} (ms)",
                    f"{m.median_ms:.0f} ({m.median_import_ms:.0f} + {m.median_clients_ms:.0f}){later}",
                    f"boto3 import {floor.median_ms:.0f}; boto3 + 4 clients {clients.median_ms:.0f}",
                    f"{m.median_ms / floor.median_ms:.1f}x / {m.median_ms / clients.median_ms:.1f}x",
                    f"<= {COLD_TARGET_RATIO:g}x boto3 import",
                    m.median_ms <= COLD_TARGET_RATIO * floor.median_ms,
                )
            )
        if r.cold.layer_mb is not None and r.cold.boto3_mb is not None:
            for name, code_kb in r.cold.function_kb.items():
                size = r.cold.layer_mb + code_kb / 1000
                out.append(
                    Row(
                        f"package {name}: layer + code, arm64, unzipped, no boto3 (MB)",
                        f"{size:.1f}",
                        f"with boto3 {size + r.cold.boto3_mb:.1f}; "
                        f"pip's .pyc would add {r.cold.layer_pyc_mb:.1f}",
                        "",
                        f"<= {PACKAGE_TARGET_MB:.0f}",
                        size <= PACKAGE_TARGET_MB,
                    )
                )
    if r.jobs is not None:
        j = r.jobs
        out.append(
            Row(
                f"sidecar upload -> GPU dispatch received, {j.jobs} jobs (ms)",
                f"p50 {j.dispatch_p50_ms:.0f}, p99 {j.dispatch_p99_ms:.0f}",
                f"{j.concurrency} jobs in flight, {j.jobs / j.wall_s:.1f} jobs/s",
                "",
                "",
                None,
            )
        )
        out.append(
            Row(
                "GPU callback received -> notification published (ms)",
                f"p50 {j.notify_p50_ms:.0f}, p99 {j.notify_p99_ms:.0f}",
                f"{j.succeeded}/{j.jobs} succeeded",
                "",
                "",
                None,
            )
        )
        out.append(
            Row(
                "Lambda GB-s per job (production: 9 progress callbacks)",
                f"{j.gb_s_per_job_production:.2f} (here: {j.gb_s_per_job_measured:.2f})",
                f"function waiting {GENERATION_S_LABEL}: {j.gb_s_waiting_design:.0f}",
                f"1/{j.gb_s_waiting_design / j.gb_s_per_job_production:.0f}",
                f"<= {GB_S_TARGET:.0f}",
                j.gb_s_per_job_production <= GB_S_TARGET,
            )
        )
    if r.output:
        by = {t.approach: t for t in r.output}
        s, n = by.get("streaming"), by.get("naive")
        if s is not None and n is not None:
            label = f"{s.size_bytes / 2**20:.0f} MiB"
            out.append(
                Row(
                    f"store a {label} fal output: peak RSS above baseline (MB)",
                    f"streaming {s.peak_above_baseline_mb:.0f}",
                    f"naive {n.peak_above_baseline_mb:.0f}",
                    f"{n.peak_above_baseline_mb / max(s.peak_above_baseline_mb, 1):.0f}x less",
                    f"<= {RSS_TARGET_MB:.0f}",
                    s.peak_above_baseline_mb <= RSS_TARGET_MB,
                )
            )
            ratio = n.throughput_mb_s / s.throughput_mb_s
            out.append(
                Row(
                    f"store a {label} fal output: throughput (MB/s)",
                    f"streaming {s.throughput_mb_s:.0f}",
                    f"naive {n.throughput_mb_s:.0f}",
                    f"naive/streaming {ratio:.2f}",
                    f"ratio <= {THROUGHPUT_TARGET_RATIO}",
                    ratio <= THROUGHPUT_TARGET_RATIO,
                )
            )
    if r.cost is not None:
        c = r.cost
        gpu = next(iter(c.gpu_usd.values()))
        out.append(
            Row(
                "cost per video, Modal H100 (estimate) + AWS (USD)",
                f"{c.modal_total_target:.3f} (GPU {gpu:.3f} + AWS {c.aws_usd:.4f})",
                f"fal {c.fal_usd:.2f}",
                f"{c.modal_total_target / c.fal_usd:.2f}x",
                "",
                None,
            )
        )
    return out


GENERATION_S_LABEL = f"{GENERATION_S_ESTIMATE:.0f} s x 1 GB"


def table(rs: list[Row], markdown: bool = False) -> str:
    header = ["metric", "measured", "compared with", "ratio", "target", "met"]
    body = [[r.metric, r.value, r.compared, r.ratio, r.target, _ok(r.met)] for r in rs]
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(row) + " |" for row in body]
        return "\n".join(lines)
    plain = [[cell.replace("**", "") for cell in row] for row in [header, *body]]
    widths = [max(len(row[i]) for row in plain) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*plain[0]), fmt.format(*["-" * w for w in widths])]
    lines += [fmt.format(*row) for row in plain[1:]]
    return "\n".join(lines)


def interpreter(path: str) -> str:
    """`python3.13 3.13.0`: the interpreter's name and version, never the build machine's path."""
    name = Path(path).name
    try:
        version = subprocess.run(  # noqa: S603 - the interpreter the benchmark itself ran
            [path, "-c", "import platform; print(platform.python_version())"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout.strip()
    except (subprocess.SubprocessError, OSError):
        return name
    return f"{name} {version}"


def _commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],  # noqa: S607
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (subprocess.SubprocessError, OSError):
        return "unknown"


def markdown(r: Results, missed_notes: dict[str, str]) -> str:
    m = machine()
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    rs = rows(r)
    parts = [
        "# Orchestration benchmarks",
        "",
        "Written by `make bench` (`python -m bench`); rerun it to refresh. Everything around the GPU:",
        "cold starts, per-job overhead, memory when storing large outputs, cost per video.",
        "",
        f"**Last run:** {now}, commit `{_commit()}`, options `{_options(r.args)}`, "
        f"sections took {', '.join(f'{k} {v:.0f} s' for k, v in r.seconds.items())}.",
        "",
        f"**Machine:** {m['cpu']}, {m['cores']} cores (shared with other work), {m['memory']} RAM, "
        f"{m['os']}; driver Python {m['python']}"
        + (f", cold starts on `{interpreter(r.cold.python)}`" if r.cold else "")
        + (
            f"; 1-minute load average {r.load[0]:.1f} at the start, {r.load[-1]:.1f} at the end "
            "(other work shares the cores: timings scale with it, ratios to the floors much less)"
            if r.load
            else ""
        )
        + ". No GPU: generation times are estimates.",
        "",
        table(rs, markdown=True),
        "",
    ]
    missed = [row for row in rs if row.met is False]
    parts += ["## Targets missed", ""]
    if not missed:
        parts += ["None in this run.", ""]
    grouped: dict[str, list[Row]] = {}
    for row in missed:  # rows that share a cause are listed together
        note = next((v for k, v in missed_notes.items() if row.metric.startswith(k)), "")
        grouped.setdefault(note, []).append(row)
    for note, group in grouped.items():
        what = "; ".join(f"**{row.metric}**: {row.value} (target {row.target})" for row in group)
        parts += [f"- {what}. {note}", ""]
    parts += details(r)
    parts += CAVEATS
    return "\n".join(parts).rstrip() + "\n"


CAVEATS = [
    "## Caveats and what is not measured",
    "",
    "- Cold starts are measured on this x86_64 machine, not on Lambda: Lambda's own init (sandbox,",
    "  code download, runtime bootstrap) comes on top, and a 1,024 MB function gets about 0.6 vCPU,",
    "  so expect slower imports there. The arm64 package is sized, the x86_64 one is imported.",
    "- Per-job latencies and handler durations come from the local stack: moto, the handlers, the",
    "  GPU server and the driver share one process and 2 cores (also used by other work), so they",
    "  are upper bounds of the orchestration's own cost; real AWS adds network round trips instead.",
    "  Jobs/s is bounded by the local GPU server (one worker, H.264 encode), not by the handlers.",
    "- The large-output test stores into a loopback S3 stand-in that discards bytes; against real S3",
    "  throughput depends on the network and both approaches would be bounded by it.",
    "- GPU time is an estimate (docs/model.md), not a measurement; the scheduled sweeper (every",
    "  5 minutes) is a fixed cost per stack, not per video, and is not included.",
    "",
]


def _options(args: dict[str, Any]) -> str:
    return " ".join(f"--{k.replace('_', '-')} {v}" for k, v in args.items() if v is not None)


def details(r: Results) -> list[str]:
    out: list[str] = []
    if r.cold is not None:
        c = r.cold
        out += [
            "## 1. Cold start and package size",
            "",
            "Each sample is a fresh `python3.13 -I` interpreter with Lambda's path order (function",
            "code, the layer, boto3) timing `import <handler>` + what the handler builds at cold start",
            "(`ingest.get_ingestor()`, `webhook.get_runtime()`, `store.get_runtime()`,",
            "`sweeper.get_runtime()`; no network).",
            "Clients are created on first use, so `first request ms` (not in the median) is what a",
            "handler's first request then builds: the jobs table and S3 client, plus Secrets Manager,",
            "the backends and the httpx client for ingest (a Modal dispatch), Secrets Manager for the",
            "webhook (a GPU callback; a fal webhook also loads PyNaCl and httpx, a result the SNS",
            "client), SQS and httpx for the store function (a result downloaded) and Secrets Manager and",
            "httpx for the sweeper. Modes run round-robin after one discarded warm-up each; every handler",
            "has the same target. Interpreter start-up itself (~20 ms) is",
            "outside the figure; `process` is spawn to exit; `modules` are those loaded at cold start.",
            "",
            "| mode | median ms | import ms | clients ms | first request ms | min-max ms | process ms "
            "| modules | peak RSS MB |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for mode in c.modes.values():
            out.append(
                f"| {mode.mode} | {mode.median_ms:.0f} | {mode.median_import_ms:.0f} | "
                f"{mode.median_clients_ms:.0f} | {mode.median_first_use_ms:.0f} | "
                f"{mode.min_ms:.0f}-{mode.max_ms:.0f} | "
                f"{mode.median_process_ms:.0f} | {mode.modules} | {mode.maxrss_mb:.0f} |"
            )
        out += ["", "Import time by top-level package (one `-X importtime` run, self times summed, ms):", ""]
        for mode in c.modes.values():
            spent = ", ".join(f"{k} {v:.0f}" for k, v in mode.import_by_package_ms.items())
            out.append(f"- {mode.mode}: {spent}")
        if c.layer_mb is not None:
            top = ", ".join(f"{k} {v:.1f}" for k, v in c.layer_top_mb.items())
            out += [
                "",
                f"Layer (`shared/requirements.txt` + `vap_shared`, `pip install --target --platform "
                f"manylinux2014_aarch64`, no `.pyc` as `sam build` unpacks wheels): **{c.layer_mb:.1f} MB**; "
                f"pip's `__pycache__` would add {c.layer_pyc_mb:.1f} MB; boto3 + botocore (provided by the "
                f"runtime) {c.boto3_mb:.1f} MB. Largest entries (MB): {top}. Function code: "
                + ", ".join(f"{k} {v:.1f} kB" for k, v in c.function_kb.items())
                + ".",
            ]
        out.append("")
    if r.jobs is not None:
        j = r.jobs
        out += [
            "## 2. Per-job overhead on the local stack",
            "",
            f"{j.jobs} jobs with the fake GPU engine, {j.concurrency} in flight at a time, "
            f"{j.wall_s:.0f} s wall ({j.jobs / j.wall_s:.1f} jobs/s). Upload = right before the sidecar's",
            "PutObject; dispatch = the GPU server's `executor.submit`; callback = the webhook invoked with",
            "the `succeeded` callback; published = `Notifier.publish` returned. All handlers, moto and the",
            "GPU server share one Python process and 2 cores here, so these are upper bounds.",
            "",
            "| invocation | per job | mean ms |",
            "|---|---|---|",
        ]
        for kind, per_job in j.invocations_per_job.items():
            out.append(f"| {kind} | {per_job:.2f} | {j.mean_ms.get(kind, 0):.0f} |")
        calls = ", ".join(f"{k} {v:.2f}" for k, v in j.api_calls_per_job.items())
        per_kind: dict[str, list[str]] = {}
        for key, n in j.api_calls_per_invocation.items():
            kind, call = key.split(" ", 1)
            per_kind.setdefault(kind, []).append(f"{call} {n:.2f}")
        out += [
            "",
            f"GB-s per job = sum of handler durations (rounded up to 1 ms) x MemorySize "
            f"({', '.join(f'{k} {v} MB' for k, v in j.memory_mb.items())}, template.yaml): "
            f"{j.gb_s_per_job_measured:.3f} as run here (2 local steps: 1 progress callback per job); "
            f"**{j.gb_s_per_job_production:.3f}** with production's 9 progress callbacks (50 steps, one "
            f"every 5). A design that keeps a 1 GB function waiting through a "
            f"{GENERATION_S_ESTIMATE:.0f} s generation: {j.gb_s_waiting_design:.0f} GB-s.",
            "",
            f"AWS calls made inside the handlers, per job: {calls}. Per invocation:",
            "",
        ]
        out += [f"- {kind}: {', '.join(calls_)}" for kind, calls_ in per_kind.items()]
        out.append("")
    if r.output:
        out += [
            "## 3. Storing a large output (fal path)",
            "",
            "A synthetic MP4 served by a loopback HTTP server, stored through a loopback S3 stand-in",
            "that discards the bytes (so the client process is what is measured). Each approach runs in",
            "its own subprocess, alternating; time is the median of the runs, peak the highest;",
            "baseline = RSS after imports and client construction.",
            "",
            "| approach | MiB | runs | seconds | MB/s | baseline RSS MB | peak RSS MB | peak - baseline MB |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for t in r.output:
            out.append(
                f"| {t.approach} | {t.size_bytes / 2**20:.0f} | {t.runs} | {t.seconds:.2f} | "
                f"{t.throughput_mb_s:.0f} | "
                f"{t.baseline_rss_mb:.0f} | {t.peak_rss_mb:.0f} | {t.peak_above_baseline_mb:.0f} |"
            )
        out += [
            "",
            "streaming = `vap_shared.s3io.stream_url_to_s3` (1 MiB reads, 8 MiB multipart parts); naive =",
            "`httpx.get(url).content` then one `put_object`.",
            "",
        ]
    if r.cost is not None:
        co = r.cost
        out += [
            "## 4. Cost per video (computed)",
            "",
            f"Modal H100 at ${MODAL_H100_PER_S}/s; the generation time is an **estimate** (no GPU here).",
            "",
            "| generation time (estimate) | GPU USD | + AWS USD | total | vs fal $1.00 |",
            "|---|---|---|---|---|",
        ]
        for (name, usd), seconds in zip(co.gpu_usd.items(), GENERATION_S.values(), strict=True):
            total = usd + co.aws_usd
            out.append(
                f"| {seconds:.0f} s, {name} | {usd:.3f} | {co.aws_usd:.4f} | {total:.3f} | "
                f"{total / co.fal_usd:.2f}x |"
            )
        out += [
            "",
            f"A cold container adds model load: +${co.cold_extra_usd[0]:.2f}-{co.cold_extra_usd[1]:.2f} "
            "(README).",
            "AWS per video (USD): " + ", ".join(f"{k} {v:.6f}" for k, v in co.aws_items.items()) + ".",
            "Assumptions: job items <= 2 KB (2 write units per write), 5 MB of inputs fetched by Modal",
            "over the internet, 3 SQS requests outside the handlers, user uploads (3 PUTs) and the GPU's",
            "presigned GET/PUT counted; storage ($0.023/GB-month) and the user's download not included.",
            "",
        ]
    return out
