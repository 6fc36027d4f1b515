"""The GPU API on this machine, for the local stack and tests: same app, in-process executor.

    python -m gpu.service.local_server --port 8765 --modal-key K --modal-secret S --engine tiny

or from Python: `start_local_gpu_server(port, key, secret)` → handle with `.url` and `.stop()`.
The "tiny" engine runs the real VAP code path with random tiny weights (the video is noise);
"fake" skips the model entirely. Same app and runner as on Modal: idempotent submit, URL refresh,
deadlines, previews.
"""

from __future__ import annotations

import argparse
import logging
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

try:  # running as a module outside pytest: make the shared layer importable
    import vap_shared  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "shared"))

import httpx
import uvicorn
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
class LocalGpuServer:
    url: str
    executor: LocalExecutor
    _server: uvicorn.Server
    _thread: threading.Thread

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
) -> LocalGpuServer:
    """Serve the GPU API on `host:port` in a background thread; returns once it accepts requests.

    `port=0` picks a free port (read it from `.url`). Inputs and callbacks may be plain http on
    127.0.0.1/localhost (the local stack's moto and webhook) unless `allow_http_loopback=False`.
    `workers` jobs run at once (the pool's containers); `budget` limits each run as on Modal
    (without it only a request's `deadline_unix` does).
    """
    engine, safety = build_engine(engine_name, work_max_side, fake_step_delay_s)
    config = RunnerConfig(
        default_steps=steps or default_steps(fallback=LOCAL_DEFAULT_STEPS),
        allow_http_loopback=allow_http_loopback,
        budget=budget,
    )
    executor = LocalExecutor(engine, safety=safety, config=config, http=httpx.Client(), max_workers=workers)
    app = create_app(executor, auth=(key, secret))
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
    return LocalGpuServer(f"http://{url_host}:{bound_port}", executor, server, thread)


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
