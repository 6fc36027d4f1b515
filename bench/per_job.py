"""Per-job orchestration overhead on the local stack (fake GPU engine), and Lambda GB-seconds.

Jobs are kept `concurrency` at a time in flight (a new sidecar is uploaded when one finishes). Times
are taken in this process with one clock (`time.perf_counter`), by wrapping, never editing:

- upload: right before the sidecar's PutObject (S3 emits the event during that request)
- dispatch received: the local GPU server's executor gets the `/submit` request (`executor.submit`)
- callback received: the webhook's Function URL invokes the handler with the `succeeded` callback
- notification published: `vap_shared.notifier.Notifier.publish` returned (SNS accepted it)

Handler durations come from wrapping each function's `invoke`; AWS API calls made inside a handler
are counted by operation (for the cost model). Handlers share one Python process and two CPU cores
with moto, the GPU server and this driver here, so durations are upper bounds of Lambda's.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

from bench.common import SHARED, percentile
from bench.cost import GENERATION_S_ESTIMATE

PRODUCTION_PROGRESS_CALLBACKS = 9  # gpu.service.runner: every 5 of 50 steps, not the last, >= 2 s apart


@dataclass
class Invocation:
    function: str
    kind: str  # ingest: "batch"; webhook: "progress" | "succeeded" | "failed" | "other"
    seconds: float
    records: int = 1


@dataclass
class Recorder:
    lock: threading.Lock = field(default_factory=threading.Lock)
    uploaded: dict[str, float] = field(default_factory=dict)  # sidecar key -> t
    dispatched: dict[str, float] = field(default_factory=dict)  # job id -> t
    callback: dict[str, float] = field(default_factory=dict)  # job id -> t (succeeded callback)
    published: dict[str, tuple[str, float, str]] = field(default_factory=dict)  # key -> (job, t, state)
    invocations: list[Invocation] = field(default_factory=list)
    api_calls: Counter[str] = field(default_factory=Counter)  # "service:Operation"
    api_calls_by_kind: Counter[str] = field(default_factory=Counter)  # "function:kind service:Operation"
    done: threading.Condition = field(init=False)
    local: threading.local = field(default_factory=threading.local)

    def __post_init__(self) -> None:
        self.done = threading.Condition(self.lock)


@dataclass
class PerJobResult:
    jobs: int
    concurrency: int
    wall_s: float
    succeeded: int
    dispatch_p50_ms: float
    dispatch_p99_ms: float
    notify_p50_ms: float
    notify_p99_ms: float
    memory_mb: dict[str, int]
    invocations_per_job: dict[str, float]
    mean_ms: dict[str, float]  # per invocation kind
    gb_s_per_job_measured: float  # what ran here (1 progress callback per job: 2 local steps)
    gb_s_per_job_production: float  # with production's 9 progress callbacks per job
    gb_s_waiting_design: float
    api_calls_per_job: dict[str, float]
    # "function:kind service:Operation" -> calls per invocation of that kind
    api_calls_per_invocation: dict[str, float] = field(default_factory=dict)


def _sidecar(bucket: str, seed: int) -> dict[str, Any]:
    return {
        "prompt": "A red balloon drifts upward over a calm lake while the camera holds still.",
        "video_description": "A sneaker inflates into a smooth sphere and floats out of the frame.",
        "video_url": f"s3://{bucket}/inbox/bench-media/clip.mp4",
        "image_url": f"s3://{bucket}/inbox/bench-media/image.png",
        "num_frames": 9,
        "seed": seed,
        "enable_safety_checker": False,
        "backend": "modal",
    }


def _webhook_kind(event: dict[str, Any]) -> tuple[str, str | None]:
    from vap_shared.routes import match_route

    route = match_route(str(event.get("rawPath", "")))
    if route is None or route[0] != "gpu":
        return "other", None
    try:
        body = json.loads(event.get("body") or "{}")
    except ValueError:
        return "other", None
    return str(body.get("event", "other")), body.get("job_id")


@contextmanager
def instrumented(stack: Any, rec: Recorder) -> Iterator[None]:
    """Wrap the GPU executor, the functions' invoke, Notifier.publish and boto3 API calls."""
    import botocore.client
    from vap_shared.notifier import Notifier

    from local_stack.stack import INGEST, STORE, WEBHOOK

    executor = stack.gpu.executor
    original_submit = executor.submit

    def submit(request: Any) -> str:
        with rec.lock:
            rec.dispatched.setdefault(request.job_id, time.perf_counter())
        return str(original_submit(request))

    executor.submit = submit

    def wrap_invoke(function: Any, name: str) -> Callable[[Any], Any]:
        original = function.invoke

        def invoke(event: Any) -> Any:
            started = time.perf_counter()
            if name == "webhook":
                kind, job_id = _webhook_kind(event)
                if kind == "succeeded" and job_id:
                    with rec.lock:
                        rec.callback.setdefault(job_id, started)
                records = 1
            else:
                kind, records = "batch", len(event.get("Records", []))
            rec.local.function, rec.local.kind = name, kind
            try:
                return original(event)
            finally:
                rec.local.function = rec.local.kind = None
                elapsed = time.perf_counter() - started
                with rec.lock:
                    rec.invocations.append(Invocation(name, kind, elapsed, records))

        return invoke

    functions = {
        "ingest": stack.functions[INGEST],
        "webhook": stack.functions[WEBHOOK],
        "store": stack.functions[STORE],
    }
    for name, function in functions.items():
        function.invoke = wrap_invoke(function, name)

    original_publish = Notifier.publish

    def publish(self: Any, job: Any) -> dict[str, Any]:
        body = original_publish(self, job)
        now = time.perf_counter()
        with rec.done:
            rec.published[job.sidecar_key] = (job.job_id, now, str(job.state))
            rec.done.notify_all()
        return body

    Notifier.publish = publish  # type: ignore[method-assign]

    original_call = getattr(botocore.client.BaseClient, "_make_api_call")  # noqa: B009

    def make_api_call(self: Any, operation_name: str, api_params: Any) -> Any:
        function = getattr(rec.local, "function", None)
        if function:
            with rec.lock:
                call = f"{self.meta.service_model.service_name}:{operation_name}"
                rec.api_calls[call] += 1
                rec.api_calls_by_kind[f"{function}:{rec.local.kind} {call}"] += 1
        return original_call(self, operation_name, api_params)

    setattr(botocore.client.BaseClient, "_make_api_call", make_api_call)  # noqa: B010
    try:
        yield
    finally:
        setattr(botocore.client.BaseClient, "_make_api_call", original_call)  # noqa: B010
        Notifier.publish = original_publish  # type: ignore[method-assign]
        for function in functions.values():
            del function.invoke
        del executor.submit


def _quiet() -> None:
    logging.basicConfig(level=logging.WARNING)
    for noisy in ("botocore", "urllib3", "werkzeug", "moto", "httpx", "local_stack", "gpu", "uvicorn"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


def run(jobs: int = 200, concurrency: int = 4, timeout_s: float = 600.0) -> PerJobResult:
    if str(SHARED) not in sys.path:
        sys.path.insert(0, str(SHARED))
    import io
    from contextlib import redirect_stdout

    from local_stack import LocalStack, LocalStackConfig
    from local_stack.media import synth_image, synth_mp4
    from local_stack.stack import INGEST, STORE, WEBHOOK

    _quiet()
    rec = Recorder()
    # The handlers are instrumented in this process (thread isolation), and each job runs once: the
    # overhead of one job, not of a duplicate delivery.
    config = LocalStackConfig(
        gpu_engine="fake",
        parameters={"DefaultBackend": "modal"},
        lambda_isolation="thread",
        duplicate_rate=0.0,
    )
    with redirect_stdout(io.StringIO()), LocalStack(config) as stack:  # Powertools logs JSON to stdout
        memory = {
            name: stack.functions[logical_id].memory_mb
            for name, logical_id in (("ingest", INGEST), ("webhook", WEBHOOK), ("store", STORE))
        }
        s3 = stack.s3
        media = {
            "inbox/bench-media/clip.mp4": synth_mp4(width=160, height=288, frames=17),
            "inbox/bench-media/image.png": synth_image(width=160, height=288),
        }
        stack.put_job("inbox/bench-media/unused.txt", b"", media)  # media only (no .json: no event)
        keys = [f"inbox/bench/job-{i:04d}.json" for i in range(jobs)]
        deadline = time.monotonic() + timeout_s
        with instrumented(stack, rec):
            started = time.perf_counter()
            pending = list(keys)
            submitted = 0
            while True:
                with rec.done:
                    finished = sum(1 for k in keys[:submitted] if k in rec.published)
                    if finished == jobs:
                        break
                    if submitted - finished >= concurrency or not pending:
                        if time.monotonic() > deadline:
                            raise TimeoutError(f"{finished} of {jobs} jobs done after {timeout_s:.0f} s")
                        rec.done.wait(timeout=1.0)
                        continue
                key = pending.pop(0)
                body = json.dumps(_sidecar(stack.bucket, submitted)).encode()
                with rec.lock:
                    rec.uploaded[key] = time.perf_counter()
                s3.put_object(Bucket=stack.bucket, Key=key, Body=body, ContentType="application/json")
                submitted += 1
            wall = time.perf_counter() - started
            time.sleep(0.5)  # let the last invocations' wrappers record their durations
    return summarize(rec, keys, memory, concurrency, wall)


def summarize(
    rec: Recorder, keys: list[str], memory: dict[str, int], concurrency: int, wall: float
) -> PerJobResult:
    dispatch_ms, notify_ms = [], []
    succeeded = 0
    for key in keys:
        job_id, published, state = rec.published[key]
        succeeded += state == "succeeded"
        if job_id in rec.dispatched:
            dispatch_ms.append((rec.dispatched[job_id] - rec.uploaded[key]) * 1000)
        if job_id in rec.callback:
            notify_ms.append((published - rec.callback[job_id]) * 1000)
    jobs = len(keys)
    by_kind: dict[str, list[Invocation]] = {}
    for inv in rec.invocations:
        by_kind.setdefault(f"{inv.function}:{inv.kind}", []).append(inv)
    mean_ms = {k: 1000 * sum(i.seconds for i in v) / len(v) for k, v in by_kind.items()}

    def gb_s(inv: Invocation) -> float:  # Lambda bills each invocation rounded up to 1 ms
        return math.ceil(inv.seconds * 1000) / 1000 * memory[inv.function] / 1024

    measured = sum(gb_s(i) for i in rec.invocations) / jobs
    progress = by_kind.get("webhook:progress", [])
    progress_gb_s = (sum(gb_s(i) for i in progress) / len(progress)) if progress else 0.0
    production = measured + progress_gb_s * (PRODUCTION_PROGRESS_CALLBACKS - len(progress) / jobs)
    return PerJobResult(
        jobs=jobs,
        concurrency=concurrency,
        wall_s=wall,
        succeeded=succeeded,
        dispatch_p50_ms=percentile(dispatch_ms, 50),
        dispatch_p99_ms=percentile(dispatch_ms, 99),
        notify_p50_ms=percentile(notify_ms, 50),
        notify_p99_ms=percentile(notify_ms, 99),
        memory_mb=memory,
        invocations_per_job={k: len(v) / jobs for k, v in sorted(by_kind.items())},
        mean_ms=dict(sorted(mean_ms.items())),
        gb_s_per_job_measured=measured,
        gb_s_per_job_production=production,
        gb_s_waiting_design=GENERATION_S_ESTIMATE * max(memory.values()) / 1024,
        api_calls_per_job={k: v / jobs for k, v in sorted(rec.api_calls.items())},
        api_calls_per_invocation={
            k: v / len(by_kind[k.split(" ")[0]]) for k, v in sorted(rec.api_calls_by_kind.items())
        },
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=4)
    args = parser.parse_args(argv)
    print(json.dumps(asdict(run(args.jobs, args.concurrency)), indent=2))


if __name__ == "__main__":
    main()
