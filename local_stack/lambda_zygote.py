"""The fork server of the local Lambda execution environments (run as a script by `lambda_runtime`).

A fresh, single-threaded interpreter that imports the libraries every handler needs once (none
reads the environment at import), then forks one worker per execution environment on request.
Forking the test process itself would be unsafe (it runs threads); spawning an interpreter per
environment would import boto3 & co. every time. Run as a script, not as a module of the
`local_stack` package, so nothing of the harness (moto, the servers) is ever loaded here.

Protocol (a SOCK_SEQPACKET socket inherited as fd argv[1], one JSON message per packet):
  parent -> {"op": "start", "token": t, "spec": {...}} with two fds (runtime channel, log pipe)
            {"op": "kill", "pid": n}
  zygote -> {"op": "started", "token": t, "pid": n} | {"op": "exit", "pid": n, "code": c}
The zygote ends when the parent closes its socket, killing the workers it still has.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import select
import signal
import socket
import sys
import traceback
from multiprocessing.connection import Connection

import lambda_worker  # this script's directory is sys.path[0]

PRELOAD = (
    "botocore.session",
    "botocore.client",
    "boto3",
    "boto3.dynamodb.types",
    "httpx",
    "pydantic",
    "aws_lambda_powertools",
    "aws_lambda_powertools.logging",
    "aws_lambda_powertools.utilities.batch",
    "aws_lambda_powertools.utilities.data_classes",
)
MAX_PACKET = 1 << 20


def _preload() -> None:
    for name in PRELOAD:
        with contextlib.suppress(ImportError):  # a handler without it pays for nothing it does not use
            importlib.import_module(name)


def _run_worker(
    sock: socket.socket, wakeup: tuple[int, int], spec: dict[str, object], fds: list[int]
) -> None:
    """In the forked child: become the execution environment."""
    code = 1
    try:
        sock.close()
        signal.set_wakeup_fd(-1)
        for fd in wakeup:
            os.close(fd)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        os.setsid()  # its own process group: a kill takes anything it started with it
        control_fd, log_fd = fds
        lambda_worker.serve(Connection(control_fd), log_fd, spec)
        code = 0
    except BaseException:
        traceback.print_exc()
    finally:
        os._exit(code)


def main(fd: int) -> None:
    _preload()
    sock = socket.socket(fileno=fd)
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda signum, frame: None)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    workers: set[int] = set()

    def send(message: dict[str, object]) -> None:
        sock.send(json.dumps(message).encode())

    def reap() -> None:
        while workers:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            workers.discard(pid)
            send({"op": "exit", "pid": pid, "code": os.waitstatus_to_exitcode(status)})

    try:
        while True:
            ready, _, _ = select.select([sock.fileno(), wake_r], [], [])
            if wake_r in ready:
                os.read(wake_r, 4096)
                reap()
            if sock.fileno() not in ready:
                continue
            data, fds, _, _ = socket.recv_fds(sock, MAX_PACKET, 2)
            if not data:
                return
            message = json.loads(data)
            if message["op"] == "kill":
                pid = int(message["pid"])
                if pid in workers:  # never a pid this server has already reaped
                    os.killpg(pid, signal.SIGKILL)
                continue
            pid = os.fork()
            if pid == 0:
                _run_worker(sock, (wake_r, wake_w), message["spec"], fds)
            for received in fds:
                os.close(received)
            workers.add(pid)
            send({"op": "started", "token": message["token"], "pid": pid})
    finally:
        for pid in workers:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)


if __name__ == "__main__":
    main(int(sys.argv[1]))
