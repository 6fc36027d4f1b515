"""The GPU API on this machine, for the local stack and tests: same app, in-process executor.

    python -m gpu.service.local_server --port 8765 --modal-key K --modal-secret S --engine tiny

or from Python: `start_local_gpu_server(port, key, secret)` → handle with `.url` and `.stop()`.
The "tiny" engine runs the real VAP code path with random tiny weights (the video is noise);
"fake" skips the model entirely. Same app and runner as on Modal: idempotent submit, URL refresh,
deadlines, previews.

It also behaves as unkindly as Modal can (`ModalFaults`, seeded, off by default): transient 5xx
answers to `/submit` and `/status` (some after the submit took effect, as when a proxy loses the
answer), and GPU preemption: a running input stops at a chosen or random step and runs again on a
fresh worker (a new engine) with the same call id and the next attempt number.
"""

from __future__ import annotations

import argparse
import logging
import random
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

try:  # running as a module outside pytest: make the shared layer importable
    import vap_shared  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "shared"))

import httpx
import uvicorn
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from vap_shared.budget import Budget

from gpu.service.api.app import create_app
from gpu.service.api.executors import LocalExecutor
from gpu.service.engines.single import DownscaledEngine, Engine, FakeEngine, VideoEngine
from gpu.service.generation import default_steps
from gpu.service.runner.config import RunnerConfig
from gpu.service.safety import DiffusersSafetyClassifier, SafetyClassifier

EngineName = Literal["tiny", "fake"]
# Few steps locally: the tiny model's output is noise anyway, and the demo should be quick.
LOCAL_DEFAULT_STEPS = 2

log = logging.getLogger(__name__)


def build_engine(
    name: EngineName, work_max_side: int | None = None, fake_step_delay_s: float = 0.0
) -> tuple[Engine, SafetyClassifier]:
    """The engine and a (tiny, random) safety checker, so the safety code path runs locally too.

    `work_max_side` runs the model at a smaller size and resizes the frames back up (see
    `DownscaledEngine`); None runs it at the requested size. `fake_step_delay_s` makes the fake
    engine slow (load tests of the pool and the budget).
    """
    engine: Engine
    if name == "fake":
        engine = FakeEngine(step_delay_s=fake_step_delay_s)
    elif name == "tiny":
        from gpu.vap.tiny import build_tiny_pipeline

        engine = VideoEngine(build_tiny_pipeline(), device="cpu")
    else:
        raise ValueError(f"unknown engine {name!r}")
    if work_max_side:
        engine = DownscaledEngine(engine, work_max_side)
    return engine, DiffusersSafetyClassifier.tiny()


@dataclass
class ModalFaults:
    """What Modal does that a kind stand-in would not, each seeded and off at 0.

    `error_rate`: share of `/submit` and `/status/...` requests answered 5xx; `error_after_share` of
    those happen after the request took effect (the submit spawned, the answer was lost), the rest
    before. `preempt_rate`: share of jobs whose run is preempted (up to `max_preemptions` times);
    at `preempt_step` (1-based) or, when None, at a step drawn per job and attempt from the seed.
    The draws for a job depend only on the seed and the job id (not on the order jobs run in)."""

    error_rate: float = 0.0
    error_after_share: float = 0.5
    preempt_rate: float = 0.0
    preempt_step: int | None = None
    max_preemptions: int = 1
    seed: int = 0
    _rng: random.Random = field(init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def __post_init__(self) -> None:
        for name in ("error_rate", "error_after_share", "preempt_rate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be within 0..1, got {getattr(self, name)}")
        if self.preempt_step is not None and self.preempt_step < 1:
            raise ValueError(f"preempt_step must be >= 1, got {self.preempt_step}")
        self._rng = random.Random(self.seed)

    def transient_error(self) -> Literal["before", "after"] | None:
        """Whether this request fails with a 5xx, and whether before or after it is handled."""
        with self._lock:
            if self._rng.random() >= self.error_rate:
                return None
            return "after" if self._rng.random() < self.error_after_share else "before"

    def at_step(self, job_id: str, attempt: int, total: int) -> int | None:
        """`gpu.service.api.executors.Preemptions`: where attempt `attempt` of `job_id` stops."""
        if attempt > self.max_preemptions or total < 2:
            return None
        draw = random.Random(f"{self.seed}:{job_id}:{attempt}")
        if draw.random() >= self.preempt_rate:
            return None
        if self.preempt_step is not None:
            return self.preempt_step if self.preempt_step < total else None
        return draw.randint(1, total - 1)


def _with_transient_errors(app: FastAPI, faults: ModalFaults) -> None:
    """5xx on submit and status, the way Modal's web endpoints fail now and then."""

    @app.middleware("http")
    async def fail_now_and_then(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        path = request.url.path
        if not (path == "/submit" or path.startswith("/status/")):
            return await call_next(request)
        when = faults.transient_error()
        if when == "before":
            return JSONResponse({"detail": "service unavailable (local fault)"}, status_code=503)
        response = await call_next(request)
        if when == "after":  # it took effect; the caller never hears so
            return JSONResponse({"detail": "bad gateway (local fault)"}, status_code=502)
        return response


@dataclass
class LocalGpuServer:
    url: str
    executor: LocalExecutor
    _server: uvicorn.Server
    _thread: threading.Thread
    faults: ModalFaults = field(default_factory=ModalFaults)

    def stop(self, timeout: float = 10.0) -> None:
        self._server.should_exit = True
        self._thread.join(timeout)
        self.executor.shutdown()


def start_local_gpu_server(
    port: int,
    key: str,
    secret: str,
    engine_name: EngineName = "tiny",
    *,
    host: str = "127.0.0.1",
    steps: int | None = None,
    work_max_side: int | None = None,
    allow_http_loopback: bool = True,
    startup_timeout_s: float = 120.0,
    workers: int = 1,
    fake_step_delay_s: float = 0.0,
    budget: Budget | None = None,
    faults: ModalFaults | None = None,
    checkpoint_every_s: float | None = None,
) -> LocalGpuServer:
    """Serve the GPU API on `host:port` in a background thread; returns once it accepts requests.

    `port=0` picks a free port (read it from `.url`). Inputs and callbacks may be plain http on
    127.0.0.1/localhost (the local stack's moto and webhook) unless `allow_http_loopback=False`.
    `workers` jobs run at once (the pool's containers); `budget` limits each run as on Modal
    (without it only a request's `deadline_unix` does). `faults`: Modal's transient errors and
    preemptions (`ModalFaults`; its fields may be changed while the server runs, `.faults`);
    `checkpoint_every_s`: how often a run saves its denoising state (default: the runner's).
    """
    engine, safety = build_engine(engine_name, work_max_side, fake_step_delay_s)
    faults = faults or ModalFaults()
    config = RunnerConfig(
        default_steps=steps or default_steps(fallback=LOCAL_DEFAULT_STEPS),
        allow_http_loopback=allow_http_loopback,
        budget=budget,
        checkpoint_every_s=checkpoint_every_s,
    )
    executor = LocalExecutor(
        engine, safety=safety, config=config, http=httpx.Client(), max_workers=workers,
        # A preempted input runs again on a fresh worker: a new engine, as a new container loads one.
        engine_factory=lambda: build_engine(engine_name, work_max_side, fake_step_delay_s)[0],
        preemptions=faults,
    )  # fmt: skip
    app = create_app(executor, auth=(key, secret))
    _with_transient_errors(app, faults)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, name="vap-local-gpu", daemon=True)
    thread.start()
    deadline = time.monotonic() + startup_timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            executor.shutdown()
            raise RuntimeError(f"the local GPU server did not start on {host}:{port}")
        time.sleep(0.02)
    bound_port = server.servers[0].sockets[0].getsockname()[1]
    url_host = f"[{host}]" if ":" in host else host
    return LocalGpuServer(f"http://{url_host}:{bound_port}", executor, server, thread, faults)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--modal-key", required=True)
    parser.add_argument("--modal-secret", required=True)
    parser.add_argument("--engine", choices=["tiny", "fake"], default="tiny")
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help=f"default steps (else $VAP_DEFAULT_STEPS or {LOCAL_DEFAULT_STEPS})",
    )
    parser.add_argument("--workers", type=int, default=1, help="jobs at once (like Modal's containers)")
    parser.add_argument(
        "--fake-step-delay", type=float, default=0.0, help="seconds per step of the fake engine (load tests)"
    )
    parser.add_argument("--error-rate", type=float, default=0.0, help="share of submit/status answered 5xx")
    parser.add_argument(
        "--preempt-rate", type=float, default=0.0, help="share of jobs whose GPU run is preempted"
    )
    parser.add_argument(
        "--preempt-step", type=int, default=None, help="preempt at this step (default: random)"
    )
    parser.add_argument(
        "--fault-seed", type=int, default=0, help="seed of the transient errors and preemptions"
    )
    parser.add_argument(
        "--checkpoint-every", type=float, default=None, help="seconds between saves of the denoising state"
    )
    parser.add_argument(
        "--work-max-side",
        type=int,
        default=None,
        help="run the model at most this many pixels per side and resize up (fast local demo)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    handle = start_local_gpu_server(
        args.port,
        args.modal_key,
        args.modal_secret,
        args.engine,
        host=args.host,
        steps=args.steps,
        work_max_side=args.work_max_side,
        workers=args.workers,
        fake_step_delay_s=args.fake_step_delay,
        faults=ModalFaults(
            error_rate=args.error_rate,
            preempt_rate=args.preempt_rate,
            preempt_step=args.preempt_step,
            seed=args.fault_seed,
        ),
        checkpoint_every_s=args.checkpoint_every,
    )
    print(f"local GPU server ({args.engine}) listening on {handle.url}", flush=True)
    try:
        while handle._thread.is_alive():
            handle._thread.join(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        handle.stop()


if __name__ == "__main__":
    main()
