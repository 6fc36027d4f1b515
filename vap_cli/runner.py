"""Running the external deploy tools (`modal`, `sam`): one thin seam, so `make deploy`'s orchestration is
tested with recorders in place of the real commands."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TextIO

REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Completed:
    argv: tuple[str, ...]
    returncode: int
    output: str  # stdout and stderr, interleaved as printed


class Runner(Protocol):
    def __call__(self, argv: Sequence[str], env: Mapping[str, str] | None = None) -> Completed: ...


class SubprocessRunner:
    """Runs a command in the repository root, echoing its output as it comes and keeping it.

    `env` is added to this process's environment (the tools need PATH, HOME, credentials)."""

    def __init__(self, echo: TextIO | None = None, cwd: Path = REPO_ROOT) -> None:
        self.echo = echo if echo is not None else sys.stdout
        self.cwd = cwd

    def __call__(self, argv: Sequence[str], env: Mapping[str, str] | None = None) -> Completed:
        shown = " ".join(f"{k}={shlex.quote(v)}" for k, v in (env or {}).items())
        self.echo.write(f"$ {shown + ' ' if shown else ''}{shlex.join(argv)}\n")
        self.echo.flush()
        lines: list[str] = []
        try:
            process = subprocess.Popen(  # noqa: S603 - argv built by the deploy code, no shell
                list(argv),
                cwd=self.cwd,
                env={**os.environ, **(env or {})},
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                bufsize=1,
            )
        except FileNotFoundError:
            return Completed(tuple(argv), 127, f"{argv[0]}: command not found\n")
        assert process.stdout is not None
        for line in process.stdout:
            lines.append(line)
            self.echo.write(line)
            self.echo.flush()
        return Completed(tuple(argv), process.wait(), "".join(lines))
