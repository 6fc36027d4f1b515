"""Load benchmark: drop N sidecars at once into the local stack.

Checks that every job reaches a terminal state (none lost), none is notified twice, and ingest's
dispatch concurrency never exceeds the configured cap (`MaxConcurrency`, the SQS event source's
`MaximumConcurrency`); prints throughput (jobs/s, first upload → last notification) and the p50/p99
time from a sidecar's upload to its dispatch.

    python -m bench.load                     # 1,000 jobs, fal backend (no model), cap 5
    python -m bench.load --jobs 200 --backend modal --max-concurrency 10

`--backend modal` runs the local GPU server with the fake engine (one job at a time, like one GPU
container). A 100-job version runs in `make test` (tests/integration/test_load.py) on the shared
test stack. Numbers come from the emulator on this machine: they show the pipeline's own overhead
and its limits (the cap), not AWS's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from bench.common import jobs_by_sidecar_key

PROMPT = "A red balloon drifts upward over a calm lake while the camera holds still."
DESCRIPTION = "A sneaker inflates into a smooth sphere and floats out of the top of the frame."


@dataclass
class LoadResult:
    jobs: int
    backend: str
    cap: int
    elapsed_s: float
    states: dict[str, int]
    notifications: dict[str, int]  # sidecar key -> notifications received
    max_dispatch_concurrency: int
    max_ingest_in_flight: int
    upload_to_dispatch_s: list[float] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)  # sidecar keys without a terminal job
    notified_twice: list[str] = field(default_factory=list)
    not_notified: list[str] = field(default_factory=list)

    @property
    def jobs_per_s(self) -> float:
        return self.jobs / self.elapsed_s if self.elapsed_s else 0.0

    def percentile(self, p: float) -> float:
        values = sorted(self.upload_to_dispatch_s)
        if not values:
            return float("nan")
        index = min(len(values) - 1, max(0, round(p / 100 * len(values) + 0.5) - 1))
        return values[index]

    @property
    def ok(self) -> bool:
        return (
            not self.lost
            and not self.notified_twice
            and not self.not_notified
            and self.max_dispatch_concurrency <= self.cap
            and self.max_ingest_in_flight <= self.cap
        )

    def summary(self) -> dict[str, Any]:
        return {
            "jobs": self.jobs,
            "backend": self.backend,
            "concurrency_cap": self.cap,
            "elapsed_s": round(self.elapsed_s, 2),
            "jobs_per_s": round(self.jobs_per_s, 2),
            "upload_to_dispatch_p50_s": round(self.percentile(50), 3),
            "upload_to_dispatch_p99_s": round(self.percentile(99), 3),
            "upload_to_dispatch_mean_s": round(statistics.fmean(self.upload_to_dispatch_s), 3)
            if self.upload_to_dispatch_s
            else None,
            "states": self.states,
            "max_dispatch_concurrency": self.max_dispatch_concurrency,
            "max_ingest_in_flight": self.max_ingest_in_flight,
            "lost": len(self.lost),
            "notified_twice": len(self.notified_twice),
            "not_notified": len(self.not_notified),
            "ok": self.ok,
        }


class _Gauge:
    """Counts calls in flight and remembers the maximum."""

    def __init__(self) -> None:
        self.current = 0
        self.maximum = 0
        self._lock = threading.Lock()

    def wrap(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        def counted(*args: Any, **kwargs: Any) -> Any:
            with self._lock:
                self.current += 1
                self.maximum = max(self.maximum, self.current)
            try:
                return fn(*args, **kwargs)
            finally:
                with self._lock:
                    self.current -= 1

        return counted


@contextmanager
def _count_dispatches(stack: Any) -> Iterator[_Gauge]:
    """Count concurrent dispatches where they arrive: submits at the local fal server and at the
    local GPU server (the functions run in their own processes, so ingest cannot be wrapped here)."""
    gauge = _Gauge()
    targets = [stack.fal] + ([stack.gpu.executor] if stack.gpu is not None else [])
    for target in targets:
        target.submit = gauge.wrap(target.submit)
    try:
        yield gauge
    finally:
        for target in targets:
            del target.submit


def _parse(value: str | None) -> float | None:
    if not value:
        return None
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def run_load(
    stack: Any,
    jobs: int,
    *,
    backend: str = "fal",
    timeout_s: float = 900.0,
    settle_s: float = 2.0,
    uploaders: int = 10,  # botocore keeps 10 connections per client
) -> LoadResult:
    """Upload `jobs` sidecars (sharing one uploaded clip/image) as fast as possible and wait until
    every one has a notification; then check the invariants."""
    assert stack.notifications is not None
    cap = min(source.max_concurrency for source in stack.deployment.event_sources)
    prefix = f"inbox/load-{uuid.uuid4().hex[:8]}/"
    s3 = stack.s3
    from local_stack.media import synth_image, synth_mp4

    s3.put_object(
        Bucket=stack.bucket, Key=prefix + "clip.mp4", Body=synth_mp4(width=160, height=288, frames=9)
    )
    s3.put_object(Bucket=stack.bucket, Key=prefix + "image.png", Body=synth_image(width=160, height=288))
    body = {
        "prompt": PROMPT,
        "video_description": DESCRIPTION,
        "video_url": f"s3://{stack.bucket}/{prefix}clip.mp4",
        "image_url": f"s3://{stack.bucket}/{prefix}image.png",
        "num_frames": 9,
        "seed": 1,
        "backend": backend,
        # Identical jobs on purpose: each must run (result reuse would answer all but the first).
        "reuse": False,
    }
    raw = json.dumps(body).encode()
    keys = [f"{prefix}job-{i:05d}.json" for i in range(jobs)]
    uploaded_at: dict[str, float] = {}
    in_flight_before = stack.ingest_poller.stats.max_in_flight
    stack.ingest_poller.stats.max_in_flight = 0

    def upload(key: str) -> None:
        sent = time.time()  # "upload" = the start of the PUT (its event may be handled before it returns)
        s3.put_object(Bucket=stack.bucket, Key=key, Body=raw, ContentType="application/json")
        uploaded_at[key] = sent

    with _count_dispatches(stack) as gauge:
        started = time.time()
        with ThreadPoolExecutor(max_workers=uploaders) as pool:
            list(pool.map(upload, keys))
        wanted = set(keys)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            notified = {n.body.get("sidecar_key") for n in stack.notifications.matching(lambda n: True)}
            if wanted <= notified:
                break
            time.sleep(0.5)
        elapsed = time.time() - started
        time.sleep(settle_s)  # give a duplicate notification the chance to show up
    max_in_flight = stack.ingest_poller.stats.max_in_flight
    stack.ingest_poller.stats.max_in_flight = max(in_flight_before, max_in_flight)

    counts: dict[str, int] = dict.fromkeys(keys, 0)
    for note in stack.notifications.matching(lambda n: str(n.body.get("sidecar_key", "")).startswith(prefix)):
        counts[note.body["sidecar_key"]] += 1
    records = jobs_by_sidecar_key(stack, prefix, ("dispatched_at", "notified_at"))
    states: dict[str, int] = {}
    delays: list[float] = []
    lost: list[str] = []
    for key in keys:
        found = records.get(key, [])
        terminal = [r for r in found if r.get("state") in ("succeeded", "failed")]
        for record in found:
            states[record["state"]] = states.get(record["state"], 0) + 1
        if len(found) != 1 or not terminal:
            lost.append(key)
            continue
        dispatched = _parse(found[0].get("dispatched_at"))
        if dispatched is not None:
            delays.append(dispatched - uploaded_at[key])
    return LoadResult(
        jobs=jobs,
        backend=backend,
        cap=cap,
        elapsed_s=elapsed,
        states=states,
        notifications=counts,
        max_dispatch_concurrency=gauge.maximum,
        max_ingest_in_flight=max_in_flight,
        upload_to_dispatch_s=delays,
        lost=lost,
        notified_twice=[k for k, n in counts.items() if n > 1],
        not_notified=[k for k, n in counts.items() if n == 0],
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--backend", choices=["fal", "modal"], default="fal")
    parser.add_argument("--max-concurrency", type=int, default=5, help="the stack's MaxConcurrency")
    parser.add_argument("--timeout", type=float, default=1800.0)
    parser.add_argument("--json", action="store_true", help="print the summary as JSON only")
    args = parser.parse_args(argv)

    import logging
    import os

    from local_stack import LocalStack, LocalStackConfig

    # The handlers log every job at INFO (Powertools, JSON to stdout): keep the output readable.
    os.environ.setdefault("POWERTOOLS_LOG_LEVEL", "WARNING")

    logging.basicConfig(level=logging.WARNING)
    for noisy in ("botocore", "urllib3", "werkzeug", "moto", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    config = LocalStackConfig(
        parameters={"MaxConcurrency": str(args.max_concurrency)},
        gpu_engine="fake" if args.backend == "modal" else "none",
        visibility_timeout_s=30,
    )
    with LocalStack(config) as stack:
        result = run_load(stack, args.jobs, backend=args.backend, timeout_s=args.timeout)
    summary = result.summary()
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"jobs             {result.jobs} ({result.backend}), dispatch cap {result.cap}")
        print(f"throughput       {result.jobs_per_s:.1f} jobs/s ({result.elapsed_s:.1f} s for all)")
        print(
            f"upload→dispatch  p50 {result.percentile(50):.2f} s, p99 {result.percentile(99):.2f} s "
            f"(n={len(result.upload_to_dispatch_s)})"
        )
        print(f"terminal states  {result.states}")
        print(
            f"lost {len(result.lost)}, notified twice {len(result.notified_twice)}, "
            f"not notified {len(result.not_notified)}"
        )
        print(
            f"max concurrency  dispatch {result.max_dispatch_concurrency}, "
            f"ingest invocations {result.max_ingest_in_flight} (cap {result.cap})"
        )
        print("OK" if result.ok else "FAILED")
    return 0 if result.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
