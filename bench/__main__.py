"""`python -m bench` (`make bench`): all orchestration benchmarks in one run, side by side.

Prints the table and writes docs/benchmarks.md (the machine it ran on included). Small runs for
development: `python -m bench --cold-runs 2 --jobs 5 --size-mb 8 --output /tmp/bench.md`.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import asdict
from pathlib import Path

from bench.common import ROOT
from bench.report import Results, markdown, rows, table

SECTIONS = ("cold", "jobs", "output", "cost")


def missed_notes(r: Results) -> dict[str, str]:
    """Cause and fix for each target a run can miss (metric prefix -> text)."""
    notes: dict[str, str] = {}
    if r.cold is not None:
        handler = r.cold.modes.get("ingest")
        floor = r.cold.modes.get("floor_clients")
        heavy = ", ".join(
            f"{k} {v:.0f} ms"
            for k, v in (handler.import_by_package_ms.items() if handler else [])
            if k not in ("botocore", "boto3", "urllib3", "s3transfer")
        )
        extra = (handler.median_ms - floor.median_ms) if handler and floor else 0.0
        note = (
            f"Cause: the handlers import boto3 (every route uses the jobs table), Powertools (Logger; "
            f"the batch processor in ingest, pulling in asyncio and its event classes; the webhook "
            f"routes its three paths itself), pydantic (models built at import) and httpx: "
            f"{extra:+.0f} ms against "
            f"boto3 + four clients (import self-time leaders besides botocore: {heavy}). Clients, the "
            f"backends and the fal verifier (PyNaCl) are already built on first use. Fix (handler/layer "
            f"owners): replace Powertools' batch processor with the few dozen lines ingest uses; or "
            f"take imports off the cold path with Lambda SnapStart (Python 3.12+) or provisioned "
            f"concurrency. On Lambda (1,024 MB ≈ 0.6 vCPU) expect slower imports than here."
        )
        notes["cold start "] = note
        top = ", ".join(f"{k} {v:.1f} MB" for k, v in r.cold.layer_top_mb.items())
        pkg = (
            f"Cause: all functions share one layer with every dependency; largest entries: {top}. "
            "cryptography is needed only for fal's Ed25519 webhook signatures (webhook only). Fix: verify "
            "Ed25519 with PyNaCl (~1.5 MB) or move cryptography into a webhook-only layer (the layer "
            f"without cryptography/cffi/pycparser: {r.cold.layer_without_cryptography_mb or 0:.1f} MB), "
            "and trim aws-lambda-powertools to what the handlers use."
        )
        notes["package "] = pkg
    if r.jobs is not None:
        j = r.jobs
        ms = j.mean_ms
        progress, batch = ms.get("webhook:progress", 0.0), ms.get("ingest:batch", 0.0)
        final = ms.get("webhook:succeeded", 0.0)
        per_progress = progress / 1000 * j.memory_mb["webhook"] / 1024
        fewer = j.gb_s_per_job_production - 5 * per_progress
        ingest_share = (
            j.invocations_per_job.get("ingest:batch", 0.0) * batch / 1000 * j.memory_mb["ingest"] / 1024
        )
        half = ingest_share + (j.gb_s_per_job_production - ingest_share) / 2
        notes["Lambda GB-s"] = (
            f"Cause: every progress callback is a full webhook invocation (~{progress:.0f} ms each here, "
            f"9 per production job) on top of ingest (~{batch:.0f} ms per batch) and the final callback "
            f"(~{final:.0f} ms), all at 1,024 MB; durations here include contention with moto and the "
            "GPU server on 2 shared cores. Fix (GPU/template owners): send progress every 10 steps or at "
            f"25/50/75 % (4 instead of 9: {fewer:.2f} GB-s), and/or give the I/O-bound webhook 512 MB "
            f"(its handler peaks under 100 MB: {half:.2f} GB-s)."
        )
    notes["store a"] = (
        "Cause: `vap_shared.s3io.stream_url_to_s3` alternates downloading and uploading (one 8 MiB part "
        "at a time, each part copied once more by `bytes(buffer)`), so the two never overlap; the "
        "naive path does one long read then one long PUT, with no per-part round trips (which also "
        "dominate at small sizes). Fix (vap_shared owner): upload parts from a small thread pool "
        "(2 in flight: at most 3 parts = 24 MiB held) while the next part downloads, and hand "
        "`memoryview`s to `upload_part`; memory stays bounded."
    )
    return notes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"comma list of {', '.join(SECTIONS)}")
    parser.add_argument("--cold-runs", type=int, default=10, help="fresh interpreters per handler (>= 10)")
    parser.add_argument(
        "--python313", default=None, help="interpreter for cold starts (default: pyenv 3.13.0)"
    )
    parser.add_argument(
        "--no-build", action="store_true", help="cold starts import from that interpreter's env"
    )
    parser.add_argument("--jobs", type=int, default=200, help="jobs on the local stack (>= 200)")
    parser.add_argument("--concurrency", type=int, default=4, help="jobs in flight at a time")
    parser.add_argument("--size-mb", type=float, default=500, help="large output size in MiB")
    parser.add_argument("--output-repeat", type=int, default=3, help="large-output runs per approach")
    parser.add_argument("--output", default=str(ROOT / "docs" / "benchmarks.md"), help="markdown file")
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument("--json", default=None, help="also write the raw results as JSON here")
    args = parser.parse_args(argv)
    only = {s.strip() for s in args.only.split(",") if s.strip()}
    unknown = only - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections: {', '.join(sorted(unknown))}")

    results = Results(
        args={
            "cold_runs": args.cold_runs if "cold" in only else None,
            "jobs": args.jobs if "jobs" in only else None,
            "concurrency": args.concurrency if "jobs" in only else None,
            "size_mb": args.size_mb if "output" in only else None,
        }
    )
    results.load.append(os.getloadavg()[0])
    if "cold" in only:
        from bench import cold_start

        started = time.perf_counter()
        print(f"cold start: building packages, {args.cold_runs} interpreters per mode ...", flush=True)
        results.cold = cold_start.run(args.cold_runs, args.python313, build=not args.no_build)
        results.seconds["cold start"] = time.perf_counter() - started
    if "output" in only:
        from bench import large_output

        started = time.perf_counter()
        print(f"large output: {args.size_mb:.0f} MiB, streaming vs naive ...", flush=True)
        results.output = large_output.run(args.size_mb, args.output_repeat)
        results.seconds["large output"] = time.perf_counter() - started
    if "jobs" in only:
        from bench import per_job

        started = time.perf_counter()
        print(f"per-job overhead: {args.jobs} jobs on the local stack ...", flush=True)
        results.jobs = per_job.run(args.jobs, args.concurrency)
        results.seconds["per job"] = time.perf_counter() - started
    if "cost" in only:
        from bench import cost

        j = results.jobs
        if j is not None:
            gap = max(0.0, cost_progress_gap(j.invocations_per_job))
            calls = dict(j.api_calls_per_job)
            for key, per_invocation in j.api_calls_per_invocation.items():
                kind, call = key.split(" ", 1)
                # Production sends more progress callbacks (secrets are read once per cold start).
                if kind == "webhook:progress" and not call.startswith("secretsmanager:"):
                    calls[call] = calls.get(call, 0.0) + per_invocation * gap
            invocations = sum(j.invocations_per_job.values()) + gap
            results.cost = cost.compute(calls, invocations, j.gb_s_per_job_production)
        else:  # no measured calls: requests from the handlers are left out
            results.cost = cost.compute({}, 11.0, 1.0)

    results.load.append(os.getloadavg()[0])
    print()
    print(table(rows(results)))
    if not args.no_write:
        out = Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(markdown(results, missed_notes(results)), encoding="utf-8")
        print(f"\nwrote {out}")
    if args.json:
        Path(args.json).write_text(json.dumps(asdict(results), indent=2, default=str), encoding="utf-8")
    return 0


def cost_progress_gap(invocations_per_job: dict[str, float]) -> float:
    """Progress callbacks production sends beyond what ran here (9 per job at 50 steps)."""
    from bench.per_job import PRODUCTION_PROGRESS_CALLBACKS

    return PRODUCTION_PROGRESS_CALLBACKS - invocations_per_job.get("webhook:progress", 0.0)


if __name__ == "__main__":
    raise SystemExit(main())
