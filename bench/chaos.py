"""Chaos run: N jobs through the hardened local stack while the cloud's faults happen at random.

    python -m bench.chaos --jobs 500 --seed 1 --write docs/reliability.md
    python -m bench.chaos --jobs 20 --seed 7          # a quick look (make test runs one like it)

Every fault is drawn from `--seed` (threads still interleave as they will):
- Lambda: an execution environment of ingest, webhook, store or sweeper killed mid-invocation
  (`--rate kill_rate=0.05`; every rate in `Faults` is set this way; Lambda reports
  `Runtime.ExitError`, an SQS batch comes back, a webhook caller gets a 502), on top of the
  stack's own kill at each function's timeout;
- at-least-once delivery: S3 notifications, SQS receives and SNS deliveries sometimes twice;
- Modal (the local GPU server): transient 5xx on submit and status, GPUs preempted mid-run;
- fal: submits answered 503, webhook answers too slow for fal (it gives up and delivers again),
  correctly signed deliveries from another fal account;
- bad input: a share of the sidecars is invalid (their jobs must fail, once).
The sweeper runs every few seconds (its EventBridge schedule does not fire locally). The job budget
is shrunk with the stack's time scale so the sweeper's deadlines are part of the run.

Prints jobs, terminal states, lost (no terminal state by the end), notified twice (two SNS
publishes for one job: a consumer reading SNS by MessageId sees each publish once), GPU runs paid
twice (jobs that finished generating on more than one run), and the slowest time from upload to
a terminal state; exits 1 when anything is lost or notified twice.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import random
import re
import threading
import time
import uuid
import warnings
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from bench.common import jobs_by_sidecar_key
from bench.load import DESCRIPTION, PROMPT

log = logging.getLogger("bench.chaos")

TERMINAL = ("succeeded", "failed", "cancelled")
FUNCTIONS = ("IngestFunction", "WebhookFunction", "StoreFunction", "SweeperFunction")


@dataclass(frozen=True)
class Faults:
    """How often each fault happens (shares of requests, invocations or jobs)."""

    kill_rate: float = 0.05  # invocations whose environment is killed mid-run
    duplicate_rate: float = 0.05  # S3 / SQS / SNS deliveries made twice
    gpu_error_rate: float = 0.05  # Modal submits and status requests answered 5xx
    gpu_preempt_rate: float = 0.2  # GPU runs preempted once
    fal_error_rate: float = 0.05  # fal submits answered 503
    slow_ack_rate: float = 0.1  # webhook answers held back past fal's patience
    impostor_rate: float = 0.2  # fal requests that also get another account's delivery
    bad_input_rate: float = 0.05  # sidecars that are invalid


@dataclass
class ChaosResult:
    jobs: int
    seed: int
    faults: Faults
    elapsed_s: float
    states: dict[str, int]
    lost: list[str]
    notified_twice: list[str]
    paid_twice: list[str]
    slowest_s: float
    injected: dict[str, int] = field(default_factory=dict)
    failures: dict[str, int] = field(default_factory=dict)  # a failed job's errors -> jobs

    @property
    def ok(self) -> bool:
        return not self.lost and not self.notified_twice

    def rows(self) -> list[tuple[str, str]]:
        states = ", ".join(f"{state} {n}" for state, n in sorted(self.states.items()))
        injected = ", ".join(f"{name} {n}" for name, n in self.injected.items())
        return [
            ("jobs", str(self.jobs)),
            ("terminal states", states or "none"),
            ("lost (no terminal state)", str(len(self.lost))),
            ("notified twice", str(len(self.notified_twice))),
            ("GPU runs paid twice", str(len(self.paid_twice))),
            ("slowest upload → terminal state", f"{self.slowest_s:.1f} s"),
            ("wall time", f"{self.elapsed_s:.0f} s"),
            ("faults injected", injected),
            *((f"failed: {reason}", str(n)) for reason, n in self.failures.items()),
        ]

    def summary(self) -> dict[str, Any]:
        return {
            "jobs": self.jobs,
            "seed": self.seed,
            "faults": vars(self.faults),
            "states": self.states,
            "lost": self.lost,
            "notified_twice": self.notified_twice,
            "paid_twice": self.paid_twice,
            "slowest_s": round(self.slowest_s, 1),
            "elapsed_s": round(self.elapsed_s, 1),
            "injected": self.injected,
            "failures": self.failures,
            "ok": self.ok,
        }

    def table(self) -> str:
        lines = ["| measure | value |", "|---|---|"]
        lines += [f"| {name} | {value} |" for name, value in self.rows()]
        return "\n".join(lines)


def _seeded(seed: int, name: str) -> Callable[[], float]:
    """A thread-safe uniform [0, 1) stream of its own for each fault source."""
    rng = random.Random(f"{seed}:{name}")
    lock = threading.Lock()

    def draw() -> float:
        with lock:
            return rng.random()

    return draw


def inject(stack: Any, faults: Faults, seed: int) -> None:
    """Switch on the faults the stack does not inject by itself (its config does the others)."""
    for name in FUNCTIONS:
        function = stack.functions.get(name)
        if function is None:
            continue
        draw = _seeded(seed, f"kill:{name}")

        def crash_after(draw: Callable[[], float] = draw) -> float | None:
            # Somewhere in the first second: most invocations here take well under one.
            return draw() if draw() < faults.kill_rate else None

        function.crash_after = crash_after
    slow = _seeded(seed, "slow-ack")
    stack.fal.behaviour.webhook_timeout_s = 1.0  # fal's patience (15 s by default), scaled down
    stack.webhook_server.answer_delay = lambda: 1.5 if slow() < faults.slow_ack_rate else None
    behaviour = stack.fal.behaviour
    behaviour.submit_error_rate = faults.fal_error_rate
    behaviour.impostor_rate = faults.impostor_rate
    behaviour.seed = seed


def _sweep_until(stack: Any, stop: threading.Event, every_s: float) -> None:
    while not stop.wait(every_s):
        try:
            stack.run_sweeper()
        except Exception as exc:  # a killed sweeper invocation: the next run starts over, as on AWS
            log.info("sweeper run failed: %s", exc)


def _timestamp(value: str | None) -> float | None:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp() if value else None


def _sidecars(prefix: str, bucket: str, jobs: int, faults: Faults, seed: int) -> dict[str, bytes]:
    """One sidecar per job: most `auto` (Modal, fal on failure), a third `fal`, some invalid."""
    rng = random.Random(f"{seed}:sidecars")
    out: dict[str, bytes] = {}
    for index in range(jobs):
        body: dict[str, Any] = {
            "prompt": PROMPT,
            "video_description": DESCRIPTION,
            "video_url": f"s3://{bucket}/{prefix}clip.mp4",
            "image_url": f"s3://{bucket}/{prefix}image.png",
            "num_frames": 9,
            "seed": index,
            "backend": "fal" if index % 3 == 0 else "auto",
        }
        if rng.random() < faults.bad_input_rate:
            body["num_frames"] = 500  # out of range: the job fails at once, with its reason
        out[f"{prefix}job-{index:05d}.json"] = json.dumps(body).encode()
    return out


def run_chaos(stack: Any, jobs: int, seed: int, faults: Faults, timeout_s: float = 1800.0) -> ChaosResult:
    """Drop `jobs` sidecars into `stack` (already started with the configured faults), inject the
    rest, and wait until every job has a terminal state or `timeout_s` passes."""
    from local_stack.media import synth_image, synth_mp4

    inject(stack, faults, seed)
    prefix = f"inbox/chaos-{uuid.uuid4().hex[:8]}/"
    s3 = stack.s3
    s3.put_object(
        Bucket=stack.bucket, Key=prefix + "clip.mp4", Body=synth_mp4(width=160, height=288, frames=9)
    )
    s3.put_object(Bucket=stack.bucket, Key=prefix + "image.png", Body=synth_image(width=160, height=288))
    sidecars = _sidecars(prefix, stack.bucket, jobs, faults, seed)
    uploaded: dict[str, float] = {}

    def upload(key: str) -> None:
        uploaded[key] = time.time()
        s3.put_object(Bucket=stack.bucket, Key=key, Body=sidecars[key], ContentType="application/json")

    stop = threading.Event()
    sweeper = threading.Thread(target=_sweep_until, args=(stack, stop, 3.0), daemon=True)
    started = time.time()
    sweeper.start()
    try:
        with ThreadPoolExecutor(max_workers=8) as pool:
            list(pool.map(upload, sidecars))
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            records = jobs_by_sidecar_key(stack, prefix, ("completed_at", "errors"))
            done = [k for k in sidecars if any(r.get("state") in TERMINAL for r in records.get(k, []))]
            if len(done) == len(sidecars):
                break
            time.sleep(2.0)
        elapsed = time.time() - started
        time.sleep(5.0)  # room for a late duplicate notification to show
    finally:
        stop.set()
        sweeper.join(timeout=60)

    records = jobs_by_sidecar_key(stack, prefix, ("completed_at", "errors"))
    publishes = Counter(
        n.body.get("sidecar_key")
        for n in stack.notifications.matching(lambda n: str(n.body.get("sidecar_key", "")).startswith(prefix))
    )
    states: Counter[str] = Counter()
    failures: Counter[str] = Counter()
    lost: list[str] = []
    slowest = 0.0
    job_ids: dict[str, str] = {}
    for key in sidecars:
        found = records.get(key, [])
        terminal = [r for r in found if r.get("state") in TERMINAL]
        if len(found) != 1 or not terminal:
            lost.append(key)
            states.update(r.get("state", "?") for r in found)
            continue
        record = terminal[0]
        states[record["state"]] += 1
        if record["state"] == "failed":
            failures[_reason(record.get("errors"))] += 1
        job_ids[record["job_id"]] = key
        completed = _timestamp(record.get("completed_at"))
        if completed is not None:
            slowest = max(slowest, completed - uploaded[key])
    return ChaosResult(
        jobs=jobs,
        seed=seed,
        faults=faults,
        elapsed_s=elapsed,
        states=dict(states),
        lost=lost,
        notified_twice=[k for k, n in publishes.items() if n > 1],
        paid_twice=_paid_twice(stack, job_ids),
        slowest_s=slowest,
        injected=_injected(stack),
        failures=dict(failures.most_common()),
    )


def _reason(errors: Any) -> str:
    """A failed job's errors in one line, numbers blanked so that equal reasons count together."""
    try:
        items = json.loads(errors) if isinstance(errors, str) else None
    except ValueError:
        items = None
    if not isinstance(items, list) or not items:
        return "(no reason recorded)"
    texts = [f"{e.get('field') or ''}: {e.get('message')}".strip(": ") for e in items if isinstance(e, dict)]
    return re.sub(r"\d+(\.\d+)?", "N", " / ".join(texts))[:240]


def _paid_twice(stack: Any, job_ids: dict[str, str]) -> list[str]:
    """Jobs that finished generating more than once: a Modal run and a fal request, or two fal
    requests (a preempted GPU attempt is not a finished run: it resumes)."""
    finished: Counter[str] = Counter()
    if stack.gpu is not None:
        for job_id, (state, _) in stack.gpu.executor.runs().items():
            if state == "succeeded" and job_id in job_ids:
                finished[job_id] += 1
    for request in list(stack.fal.requests.values()):
        job_id = (request.webhook_url or "").split("/callbacks/fal/", 1)[-1].split("?", 1)[0]
        if request.status == "COMPLETED" and job_id in job_ids:
            finished[job_id] += 1
    return sorted(job_ids[j] for j, n in finished.items() if n > 1)


def _injected(stack: Any) -> dict[str, int]:
    gpu_attempts = stack.gpu.executor.runs().values() if stack.gpu is not None else []
    return {
        "environments killed": sum(f.crashes for f in stack.functions.values()),
        "duplicate deliveries": sum(stack.duplicates.duplicated.values()),
        "GPU preemptions": sum(max(0, attempts - 1) for _, attempts in gpu_attempts),
        "slow webhook answers": stack.webhook_server.slow_answers,
        "fal deliveries from another account": sum(
            len(r.impostor_answers) for r in list(stack.fal.requests.values())
        ),
    }


def stack_config(seed: int, faults: Faults, time_scale: float = 0.01) -> Any:
    from local_stack import LocalStackConfig

    return LocalStackConfig(
        # Room for a burst: the dispatch cap and both backends' capacity.
        parameters={"MaxConcurrency": "10", "ModalContainers": "4", "FalMaxOutstanding": "20"},
        gpu_engine="fake",
        gpu_steps=8,
        gpu_workers=4,
        visibility_timeout_s=5,
        # 0.01 makes the 9000 s budget 90 s: the sweeper's ask and stop points fall inside the run.
        time_scale=time_scale,
        duplicate_rate=faults.duplicate_rate,
        duplicate_seed=seed,
        gpu_error_rate=faults.gpu_error_rate,
        gpu_preempt_rate=faults.gpu_preempt_rate,
        gpu_fault_seed=seed,
        function_logs=False,
    )


def write_report(result: ChaosResult, path: Path, command: str) -> None:
    """Replace the generated section of `path` (between its markers) with this run's table."""
    start, end = "<!-- chaos:start -->", "<!-- chaos:end -->"
    text = path.read_text(encoding="utf-8") if path.exists() else f"{start}\n{end}\n"
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"
    rates = ", ".join(f"{name} {value:g}" for name, value in vars(result.faults).items())
    body = (
        f"{start}\nWritten by `{command}` on {datetime.now().date()} ({machine}); fault rates: {rates}.\n\n"
        f"{result.table()}\n\n{'OK: nothing lost, nothing notified twice.' if result.ok else 'FAILED'}\n{end}"
    )
    path.write_text(head + body + tail, encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.chaos",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--jobs", type=int, default=100)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=3600.0)
    parser.add_argument("--write", type=Path, help="put the table into this markdown file")
    parser.add_argument("--json", type=Path, help="also write the result as JSON here")
    parser.add_argument(
        "--time-scale",
        type=float,
        default=0.01,
        help="the stack's time scale (0.01: the 9000 s job budget lasts 90 s)",
    )
    parser.add_argument(
        "--rate",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help=f"change a fault rate ({', '.join(Faults.__dataclass_fields__)})",
    )
    args = parser.parse_args(argv)
    try:
        rates = {name: float(value) for name, value in (item.split("=", 1) for item in args.rate)}
        faults = Faults(**rates)
    except (ValueError, TypeError) as exc:
        parser.error(f"--rate: {exc}")

    from local_stack import LocalStack

    os.environ.setdefault("POWERTOOLS_LOG_LEVEL", "ERROR")
    logging.basicConfig(level=logging.ERROR)
    # moto's CloudFormation names the resource types it skips (the stack applies those itself).
    warnings.filterwarnings("ignore", message="Tried to parse", category=UserWarning)
    with LocalStack(stack_config(args.seed, faults, args.time_scale)) as stack:
        result = run_chaos(stack, args.jobs, args.seed, faults, timeout_s=args.timeout)
    for name, value in result.rows():
        print(f"{name:34} {value}")
    for key in result.lost:
        print(f"lost: {key}")
    for key in result.notified_twice:
        print(f"notified twice: {key}")
    print("OK" if result.ok else "FAILED: jobs lost or notified twice")
    if args.json:
        args.json.write_text(json.dumps(result.summary(), indent=2) + "\n", encoding="utf-8")
    if args.write:
        command = f"python -m bench.chaos --jobs {args.jobs} --seed {args.seed}"
        if args.time_scale != parser.get_default("time_scale"):
            command += f" --time-scale {args.time_scale:g}"
        write_report(result, args.write, command + "".join(f" --rate {item}" for item in args.rate))
    return 0 if result.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
