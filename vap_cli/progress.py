"""`--wait`: follow a job's status.json (queued → dispatched → running step k/N → storing → done)."""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

from .config import StackInfo
from .jobs import TERMINAL, describe_progress, read_json

BAR = 24


def bar(step: int, total: int) -> str:
    filled = BAR * step // total if total else 0
    return "[" + "#" * filled + "-" * (BAR - filled) + f"] {step}/{total}"


def render(status: dict[str, Any]) -> str:
    phase = str(status.get("phase") or status.get("state"))
    progress = status.get("progress") or {}
    if phase == "running" and progress.get("total"):
        return f"running {bar(int(progress.get('step', 0)), int(progress['total']))}"
    if phase == "dispatched" and status.get("backend"):
        return f"dispatched to {status['backend']}"
    return phase


def follow(
    stack: StackInfo,
    key: str,
    timeout_s: float = 3600.0,
    interval_s: float = 1.0,
    out: TextIO | None = None,
) -> dict[str, Any]:
    """Poll the status object until the job is terminal; print each change (a bar in a terminal)."""
    out = out or sys.stdout
    tty = out.isatty()
    started = time.monotonic()
    last = ""
    status: dict[str, Any] = {}
    while True:
        status = read_json(stack, key) or status
        line = render(status) if status else "queued"
        if line != last:
            elapsed = time.monotonic() - started
            text = f"[{elapsed:6.1f}s] {line}"
            if tty:
                out.write("\r\033[K" + text + ("\n" if status.get("state") in TERMINAL else ""))
            else:
                out.write(text + "\n")
            out.flush()
            last = line
        if status.get("state") in TERMINAL:
            return status
        if time.monotonic() - started > timeout_s:
            if tty:
                out.write("\n")
            raise TimeoutError(f"still {describe_progress(status)} after {timeout_s:.0f} s")
        time.sleep(interval_s)
