"""Helpers shared by the benchmarks: paths, percentiles, loopback servers, machine description."""

from __future__ import annotations

import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT / "shared"
LOOPBACK = "127.0.0.1"


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty sequence."""
    if not values:
        raise ValueError("no values")
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))  # ceil(n * q / 100), at least 1
    return float(ordered[int(rank) - 1])


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def dir_size(path: Path, bytecode: bool = True) -> int:
    """Bytes of all regular files under `path` (what the unzipped package occupies); without
    `bytecode`, `__pycache__` folders are left out (sam build unpacks wheels without compiling)."""
    total = 0
    for root, _dirs, files in os.walk(path):
        if not bytecode and "__pycache__" in Path(root).parts:
            continue
        for name in files:
            file = Path(root) / name
            if not file.is_symlink():
                total += file.stat().st_size
    return total


def mb(n_bytes: float) -> float:
    return n_bytes / 1e6


def python313() -> str | None:
    """The real python3.13 (not a pyenv shim): $VAP_BENCH_PYTHON313, pyenv's 3.13.0, or PATH."""
    explicit = os.environ.get("VAP_BENCH_PYTHON313")
    if explicit:
        return explicit
    pyenv = shutil.which("pyenv")
    if pyenv:
        try:
            prefix = subprocess.run(  # noqa: S603 - fixed arguments
                [pyenv, "prefix", "3.13.0"], capture_output=True, text=True, check=True, timeout=30
            ).stdout.strip()
        except (subprocess.SubprocessError, OSError):
            prefix = ""
        candidate = Path(prefix) / "bin" / "python3.13"
        if prefix and candidate.exists():
            return str(candidate)
    return shutil.which("python3.13")


def machine() -> dict[str, str]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = ""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                memory = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": str(os.cpu_count() or "?"),
        "memory": memory,
        "os": f"{platform.system()} {platform.release()} ({platform.machine()})",
        "python": sys.version.split()[0],
    }


class BackgroundServer:
    """A ThreadingHTTPServer on the loopback in a daemon thread (`with` starts and stops it)."""

    def __init__(self, handler: type[BaseHTTPRequestHandler], port: int = 0) -> None:
        self._server = ThreadingHTTPServer((LOOPBACK, port), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self._server.server_address[1]}"

    def start(self) -> BackgroundServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def jobs_by_sidecar_key(stack: Any, prefix: str, fields: Sequence[str]) -> dict[str, list[dict[str, Any]]]:
    """Job records of sidecars under `prefix` (job id, sidecar key, state and `fields`, as plain
    values), by sidecar key: one consistent scan of the local stack's jobs table."""
    ddb = stack.client("dynamodb")
    found: dict[str, list[dict[str, Any]]] = {}
    for page in ddb.get_paginator("scan").paginate(
        TableName=stack.jobs_table,
        FilterExpression="begins_with(sidecar_key, :p)",
        ExpressionAttributeValues={":p": {"S": prefix}},
        ProjectionExpression=", ".join(("job_id", "sidecar_key", "#s", *fields)),
        ExpressionAttributeNames={"#s": "state"},
        ConsistentRead=True,
    ):
        for item in page["Items"]:
            plain = {k: next(iter(v.values())) for k, v in item.items()}
            found.setdefault(plain["sidecar_key"], []).append(plain)
    return found
