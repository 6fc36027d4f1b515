"""One Lambda execution environment: the process side (what Lambda's runtime does inside it).

`serve` runs in a worker process forked by `lambda_zygote` for `lambda_runtime`. It points stdout
and stderr at the log pipe (what Lambda sends to CloudWatch Logs), replaces the whole process environment with
the function's own, puts only the function's code and its layers in front of the interpreter's
libraries, imports the handler (the Init phase) and then runs one invocation at a time, as the
runtime API hands them out: event in, result or error out. A crash or a kill ends the process; the
parent reports it and starts another environment.

Keep this module's imports small: it is loaded in every worker before the handler.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import time
import traceback
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

# The runtime API of this worker: the parent sends (request_id, event JSON, deadline epoch ms); the
# worker answers ("ok", result JSON) or ("error", error payload). At start: ("ready", init ms) or
# ("init_error", error payload).
READY = "ready"
INIT_ERROR = "init_error"
OK = "ok"
ERROR = "error"


@dataclass
class LambdaContext:
    """The attributes of Lambda's context object that handlers and Powertools read."""

    function_name: str
    function_version: str
    invoked_function_arn: str
    memory_limit_in_mb: int
    aws_request_id: str
    log_group_name: str
    log_stream_name: str
    deadline_ms: int

    def get_remaining_time_in_millis(self) -> int:
        """Time left until the invocation's deadline, from the wall clock, as Lambda computes it."""
        return max(0, self.deadline_ms - int(time.time() * 1000))


def error_payload(exc: BaseException, error_type: str | None = None) -> dict[str, Any]:
    """An error as Lambda's Python runtime reports it (errorMessage, errorType, stackTrace)."""
    return {
        "errorMessage": str(exc),
        "errorType": error_type or type(exc).__name__,
        "stackTrace": traceback.format_list(traceback.extract_tb(exc.__traceback__)),
    }


def _log_error(exc: BaseException) -> None:
    # The runtime's own log line for an unhandled error, then the traceback.
    print(f"[ERROR] {type(exc).__name__}: {exc}", file=sys.stderr)
    traceback.print_exception(exc, file=sys.stderr)


def serve(control: Connection, log_fd: int, spec: dict[str, Any]) -> None:
    """The worker's main: init, then invocations until the parent closes the channel."""
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    os.close(log_fd)
    for stream in (sys.stdout, sys.stderr):
        stream.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    os.environ.clear()
    os.environ.update(spec["env"])
    time.tzset()
    sys.path[:] = [*spec["sys_path"]]

    started = time.monotonic()
    module_name, _, func_name = str(spec["handler"]).rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        _log_error(exc)
        payload = error_payload(exc, "Runtime.ImportModuleError")
        payload["errorMessage"] = f"Unable to import module '{module_name}': {exc}"
        control.send((INIT_ERROR, payload))
        return
    handler = getattr(module, func_name, None)
    if not callable(handler):
        message = f"Handler '{func_name}' missing on module '{module_name}'"
        print(f"[ERROR] Runtime.HandlerNotFound: {message}", file=sys.stderr)
        control.send((INIT_ERROR, {"errorMessage": message, "errorType": "Runtime.HandlerNotFound"}))
        return
    control.send((READY, int((time.monotonic() - started) * 1000)))

    while True:
        try:
            request_id, event_json, deadline_ms = control.recv()
        except EOFError:
            return
        context = LambdaContext(
            function_name=spec["function_name"],
            function_version="$LATEST",
            invoked_function_arn=spec["arn"],
            memory_limit_in_mb=int(spec["memory_mb"]),
            aws_request_id=request_id,
            log_group_name=spec["log_group"],
            log_stream_name=spec["log_stream"],
            deadline_ms=int(deadline_ms),
        )
        print(f"START RequestId: {request_id} Version: $LATEST", flush=True)
        reply: tuple[str, Any]
        try:
            result = handler(json.loads(event_json), context)
        except Exception as exc:
            _log_error(exc)
            reply = (ERROR, error_payload(exc))
        else:
            try:
                reply = (OK, json.dumps(result))
            except (TypeError, ValueError) as exc:
                reply = (
                    ERROR,
                    {
                        "errorMessage": f"Unable to marshal response: {exc}",
                        "errorType": "Runtime.MarshalError",
                    },
                )
        sys.stderr.flush()
        # The END line tells the parent that every line of this invocation is in the log pipe.
        print(f"END RequestId: {request_id}", flush=True)
        control.send(reply)
