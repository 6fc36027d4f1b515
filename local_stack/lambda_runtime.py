"""Lambda functions run as Lambda runs them: each invocation in an execution environment.

An execution environment is a worker process (`lambda_worker.serve`) that imports the handler under
the function's own environment variables (the template's, with the local endpoints, and the
credentials of the function's role), then serves one invocation at a time. Environments are reused
while warm; one that crashed is replaced; an invocation still running at the function's `Timeout`
is killed with its process and reported as Lambda reports it ("Task timed out after N seconds").
What a worker prints is its log: EMF lines go to the stack's metric log (as CloudWatch Logs turns
them into metrics), every other line becomes a record of the logger `local_stack.function.<id>`.

Workers are forked by a fork server (`lambda_zygote.py`, started once per process): the test
process has threads (moto, pollers, HTTP servers) and forking it is unsafe; spawning an interpreter
per environment would import boto3 & co. every time (multiprocessing's own forkserver would also
re-run the test runner's main script in every worker). The fork server is a fresh single-threaded
interpreter with a clean environment that imports those libraries once (none reads the environment
at import); each worker then imports the handler itself, so the function's own cold start (its
modules, its settings) happens under its own environment.

`isolation="thread"` runs the handler in this process instead (the old way: no kill at the timeout,
one process environment for every function); benchmarks that instrument the handlers in-process use
it, and tests use it to show what the process boundary changes.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import multiprocessing.connection
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from local_stack import lambda_worker
from local_stack.lambda_worker import LambdaContext, error_payload

log = logging.getLogger("local_stack.lambda")

Isolation = Literal["process", "thread"]
# Lambda's limit on an on-demand function's Init phase.
INIT_LIMIT_S = 10.0
# Warm environments kept per function beyond those in use (Lambda reclaims idle ones after a while).
IDLE_LIMIT = 8
# Harness settings passed through to every function's environment when set (log verbosity only).
PASS_THROUGH = ("POWERTOOLS_LOG_LEVEL", "POWERTOOLS_DEV")


class FunctionError(Exception):
    """The invocation failed: Lambda's response carries `X-Amz-Function-Error` and this payload."""

    def __init__(self, payload: Mapping[str, Any]) -> None:
        self.payload = dict(payload)
        super().__init__(str(self.payload.get("errorMessage", "")))

    @property
    def error_type(self) -> str:
        return str(self.payload.get("errorType", ""))


class InvocationTimeout(FunctionError):
    """Killed at the function's Timeout (its environment is gone)."""


class RuntimeExit(FunctionError):
    """The environment's process died during the invocation (a crash, `os._exit`, a signal)."""


class Throttled(Exception):
    """TooManyRequestsException: the function's reserved concurrency is in use."""


class Zygote:
    """This process's handle on the fork server (`lambda_zygote.py`): started once, shared by every
    function; restarted if it died."""

    _instance: Zygote | None = None
    _instance_lock = threading.Lock()

    def __init__(self) -> None:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        script = Path(__file__).resolve().parent / "lambda_zygote.py"
        # A clean environment: the fork server and its workers see nothing of the harness's.
        env = {key: os.environ[key] for key in ("PATH", "HOME", "LANG", "SYSTEMROOT") if key in os.environ}
        self._process = subprocess.Popen(  # noqa: S603 - this interpreter, a file of this package
            [sys.executable, "-s", str(script), str(child.fileno())],
            pass_fds=[child.fileno()],
            env=env,
            stdin=subprocess.DEVNULL,
        )
        child.close()
        self._sock = parent
        self._send_lock = threading.Lock()
        self._cond = threading.Condition()
        self._started: dict[str, int] = {}
        self._exits: dict[int, int] = {}
        self._closed = False
        self._reader = threading.Thread(target=self._read, name="lambda-zygote", daemon=True)
        self._reader.start()

    @classmethod
    def get(cls) -> Zygote:
        with cls._instance_lock:
            if cls._instance is None or cls._instance._closed or cls._instance._process.poll() is not None:
                cls._instance = Zygote()
            return cls._instance

    def _read(self) -> None:
        while True:
            try:
                data = self._sock.recv(65536)
            except OSError:
                data = b""
            if not data:
                with self._cond:
                    self._closed = True
                    self._cond.notify_all()
                return
            message = json.loads(data)
            with self._cond:
                if message["op"] == "started":
                    self._started[message["token"]] = int(message["pid"])
                elif message["op"] == "exit":
                    self._exits[int(message["pid"])] = int(message["code"])
                self._cond.notify_all()

    def spawn(self, spec: Mapping[str, Any], control_fd: int, log_fd: int) -> int:
        """Fork a worker running `lambda_worker.serve` with these two fds; its pid."""
        token = uuid.uuid4().hex
        payload = json.dumps({"op": "start", "token": token, "spec": spec}).encode()
        with self._send_lock:
            socket.send_fds(self._sock, [payload], [control_fd, log_fd])
        with self._cond:
            while token not in self._started:
                if self._closed or not self._cond.wait(30):
                    raise RuntimeError("the Lambda fork server is gone")
            return self._started.pop(token)

    def kill(self, pid: int) -> None:
        with self._send_lock, contextlib.suppress(OSError):
            self._sock.send(json.dumps({"op": "kill", "pid": pid}).encode())

    def exit_code(self, pid: int, timeout_s: float = 2.0) -> int | None:
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while pid not in self._exits:
                left = deadline - time.monotonic()
                if left <= 0 or self._closed:
                    return None
                self._cond.wait(left)
            return self._exits.pop(pid)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.close()
        self._process.wait(timeout=10)


def warm_up() -> None:
    """Start the fork server now (it imports the common libraries once): shorter first cold starts."""
    Zygote.get()


def is_emf(line: str) -> bool:
    """An embedded-metric-format document (CloudWatch Logs extracts metrics from these)."""
    if not line.startswith("{") or '"_aws"' not in line:
        return False
    try:
        document = json.loads(line)
    except ValueError:
        return False
    return isinstance(document, dict) and isinstance(document.get("_aws"), dict)


class FunctionLog:
    """A function's log (its log group, for the local stack): the last `limit` lines kept, EMF
    lines handed to `metrics`, every other line passed on as a record of the logger
    `local_stack.function.<logical id>` (at the line's own level when it is a Powertools JSON line,
    else INFO; the runtime's reports of a timeout or a crash at WARNING), so it shows wherever this
    process's logging goes (stderr for `make local`, the captured log of a test)."""

    def __init__(self, name: str, limit: int = 20_000) -> None:
        self.name = name
        self.metrics: Callable[[str], None] | None = None
        self.echo = True
        self.logger = logging.getLogger(f"local_stack.function.{name}")
        self._lines: deque[str] = deque(maxlen=limit)
        self._lock = threading.Lock()

    def write(self, line: str, level: int | None = None) -> None:
        line = line.rstrip("\n")
        with self._lock:
            self._lines.append(line)
        if is_emf(line):
            if self.metrics is not None:
                self.metrics(line)
            return
        if self.echo and not line.startswith(("START RequestId:", "END RequestId:")):
            self.logger.log(level or _level_of(line), "%s", line)

    def lines(self) -> list[str]:
        with self._lock:
            return list(self._lines)


def _level_of(line: str) -> int:
    if line.startswith('{"level":'):
        name = line[10:].split('"', 1)[0]
        return logging.getLevelName(name) if isinstance(logging.getLevelName(name), int) else logging.INFO
    return logging.INFO


class ProcessEnvironment:
    """One execution environment: a worker process, its runtime channel and its log pipe."""

    def __init__(self, function: LambdaFunction, env: Mapping[str, str], fingerprint: str) -> None:
        self.function = function
        self.fingerprint = fingerprint
        self.generation = function._generation
        self.healthy = True
        self.init_ms = 0
        self.log_stream = f"{time.strftime('%Y/%m/%d', time.gmtime())}/[$LATEST]{uuid.uuid4().hex}"
        self._env = dict(env)
        self._ended: set[str] = set()
        self._ended_cond = threading.Condition()
        self._zygote: Zygote | None = None
        self._pid = 0
        self._control: multiprocessing.connection.Connection | None = None
        self._reader: threading.Thread | None = None

    @property
    def pid(self) -> int:
        return self._pid

    def start(self) -> None:
        """Init: start the worker and import the handler, within Lambda's Init limit."""
        fn = self.function
        spec = {
            "handler": fn.handler,
            "env": self._env,
            "sys_path": fn.worker_sys_path(),
            "function_name": fn.name,
            "arn": fn.arn,
            "memory_mb": fn.memory_mb,
            "log_group": fn.log_group,
            "log_stream": self.log_stream,
        }
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        log_r, log_w = os.pipe()
        try:
            self._zygote = Zygote.get()
            self._pid = self._zygote.spawn(spec, theirs.fileno(), log_w)
        finally:
            theirs.close()
            os.close(log_w)
        self._control = multiprocessing.connection.Connection(ours.detach())
        self._reader = threading.Thread(
            target=self._read_log, args=(log_r,), name=f"log-{fn.logical_id}-{self._pid}", daemon=True
        )
        self._reader.start()
        control = self._control
        # Lambda gives Init 10 s, then retries it within the first invocation's timeout.
        limit = INIT_LIMIT_S + fn.timeout_s
        if not control.poll(limit):
            self.kill()
            raise FunctionError(
                {"errorType": "Sandbox.Timedout", "errorMessage": f"INIT timed out after {limit:.2f} seconds"}
            )
        try:
            kind, value = control.recv()
        except EOFError:
            self.healthy = False
            raise RuntimeExit(
                {
                    "errorType": "Runtime.ExitError",
                    "errorMessage": f"Runtime exited during init: {self._exit()}",
                }
            ) from None
        if kind != lambda_worker.READY:
            self.stop()
            raise FunctionError(value)
        self.init_ms = int(value)

    def _read_log(self, fd: int) -> None:
        with open(fd, "rb", buffering=0) as pipe:
            for raw in iter(pipe.readline, b""):
                line = raw.decode("utf-8", errors="replace")
                if line.startswith("END RequestId: "):
                    with self._ended_cond:
                        self._ended.add(line.split()[2])
                        self._ended_cond.notify_all()
                self.function.log.write(line)
        with self._ended_cond:
            self._ended_cond.notify_all()

    def _wait_for_end(self, request_id: str, timeout_s: float = 5.0) -> None:
        """Until the invocation's END line was read: every line it printed is in the log."""
        deadline = time.monotonic() + timeout_s
        with self._ended_cond:
            while request_id not in self._ended:
                left = deadline - time.monotonic()
                if left <= 0 or (self._reader is not None and not self._reader.is_alive()):
                    return
                self._ended_cond.wait(left)
            self._ended.discard(request_id)

    def _exit(self) -> str:
        """How the worker ended, as Lambda words it."""
        code = self._zygote.exit_code(self._pid) if self._zygote is not None and self._pid else None
        if code is None:
            return "unknown"
        if code < 0:
            return f"signal: {signal.Signals(-code).name.removeprefix('SIG').lower()}"
        return f"exit status {code}"

    def invoke(self, event: Any, timeout_s: float, crash_after_s: float | None = None) -> Any:
        assert self._control is not None
        request_id = str(uuid.uuid4())
        deadline = time.time() + timeout_s
        try:
            self._control.send((request_id, json.dumps(event), int(deadline * 1000)))
        except (BrokenPipeError, OSError):
            self.healthy = False
            raise RuntimeExit(
                {
                    "errorType": "Runtime.ExitError",
                    "errorMessage": f"RequestId: {request_id} Error: Runtime exited",
                }
            ) from None
        crashes = crash_after_s is not None and crash_after_s < deadline - time.time()
        if crashes and not self._control.poll(crash_after_s):
            # The environment dies mid-invocation (as a sandbox killed for memory does).
            self.kill()
            self.function.count_crash()
            message = f"RequestId: {request_id} Error: Runtime exited with error: signal: killed"
            self.function.log.write(message, logging.WARNING)
            raise RuntimeExit({"errorType": "Runtime.ExitError", "errorMessage": message})
        if not self._control.poll(max(0.0, deadline - time.time())):
            self.kill()
            message = f"Task timed out after {timeout_s:.2f} seconds"
            stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())
            self.function.log.write(f"{stamp}Z {request_id} {message}", logging.WARNING)
            raise InvocationTimeout({"errorMessage": f"{stamp}Z {request_id} {message}"})
        try:
            kind, value = self._control.recv()
        except EOFError:
            self.healthy = False
            how = self._exit()
            self.function.log.write(
                f"RequestId: {request_id} Error: Runtime exited with error: {how}", logging.WARNING
            )
            raise RuntimeExit(
                {
                    "errorType": "Runtime.ExitError",
                    "errorMessage": f"RequestId: {request_id} Error: Runtime exited with error: {how}",
                }
            ) from None
        self._wait_for_end(request_id)
        if kind == lambda_worker.OK:
            return json.loads(value)
        raise FunctionError({**value, "requestId": request_id})

    def kill(self) -> None:
        """What Lambda does at a timeout: the environment's processes are killed."""
        self.healthy = False
        if self._zygote is not None and self._pid:
            self._zygote.kill(self._pid)
        self.stop()

    def stop(self) -> None:
        """Shutdown: closing the runtime channel ends the worker."""
        self.healthy = False
        if self._control is not None:
            self._control.close()
            self._control = None
        if self._reader is not None:
            self._reader.join(timeout=5)


class ThreadEnvironment:
    """The handler in this process (isolation="thread"): imported under the function's
    environment, then called on the invoking thread. Nothing can be killed."""

    def __init__(self, function: LambdaFunction, fingerprint: str) -> None:
        self.function = function
        self.fingerprint = fingerprint
        self.generation = function._generation
        self.healthy = True
        self.init_ms = 0
        self.pid = os.getpid()
        # The template's variables only (no Lambda reserved ones such as TZ or PATH: this is the
        # harness's own process).
        self._env = {**function.environment, **function.overrides, **function.role_environment()}
        self._fn: Callable[[Any, Any], Any] | None = function.callable_handler

    def start(self) -> None:
        if self._fn is not None:
            return
        fn = self.function
        module_name, _, func_name = fn.handler.rpartition(".")
        for entry in reversed([str(fn.code_dir.resolve()), *(str(p) for p in fn.layers)]):
            if entry not in sys.path:
                sys.path.insert(0, entry)
        with scoped_environ({**self._env, "AWS_LAMBDA_FUNCTION_NAME": fn.name}):
            module = importlib.import_module(module_name)
            reset = getattr(module, "reset", None)  # the module may stay imported from an earlier stack
            if callable(reset):
                reset()
        self._fn = getattr(module, func_name)
        # The functions share this process: it keeps the union of their environments.
        os.environ.update(self._env)

    def invoke(self, event: Any, timeout_s: float, crash_after_s: float | None = None) -> Any:
        assert self._fn is not None  # a thread cannot be killed: `crash_after_s` is not applied
        request_id = str(uuid.uuid4())
        fn = self.function
        context = LambdaContext(
            function_name=fn.name,
            function_version="$LATEST",
            invoked_function_arn=fn.arn,
            memory_limit_in_mb=fn.memory_mb,
            aws_request_id=request_id,
            log_group_name=fn.log_group,
            log_stream_name="local",
            deadline_ms=int((time.time() + timeout_s) * 1000),
        )
        started = time.monotonic()
        try:
            return self._fn(event, context)
        except Exception as exc:
            log.exception("%s failed (request %s)", fn.logical_id, request_id)
            raise FunctionError({**error_payload(exc), "requestId": request_id}) from exc
        finally:
            elapsed = time.monotonic() - started
            if elapsed > timeout_s:
                log.warning(
                    "%s ran %.1fs, over its %ss timeout (not enforced in a thread)",
                    fn.logical_id,
                    elapsed,
                    timeout_s,
                )

    def kill(self) -> None:
        self.healthy = False

    def stop(self) -> None:
        self.healthy = False


Environment = ProcessEnvironment | ThreadEnvironment


@contextlib.contextmanager
def scoped_environ(values: Mapping[str, str]) -> Iterator[None]:
    """Temporarily set variables of this process's environment."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@dataclass
class LambdaFunction:
    """One function of the template: its code, handler, limits, environment and environments.

    `environment` is what the template gives it (local endpoints swapped in); `credentials`, when
    set, returns the AWS_* variables of its role's credentials, given to each new environment.
    `reserved_concurrency` caps simultaneous invocations (Throttled beyond it), as Lambda does.
    """

    logical_id: str
    name: str
    arn: str
    code_dir: Path
    handler: str
    timeout_s: float
    memory_mb: int
    log_group: str = ""
    reserved_concurrency: int | None = None
    environment: dict[str, str] = field(default_factory=dict)
    layers: list[Path] = field(default_factory=list)
    isolation: Isolation = "process"
    credentials: Callable[[], dict[str, str]] | None = field(default=None, repr=False)
    # isolation="thread" only: call this instead of importing `handler` (test doubles).
    callable_handler: Callable[[Any, Any], Any] | None = field(default=None, repr=False)
    # Chaos (bench.chaos; off by default): seconds after which this invocation's environment is
    # killed mid-run, or None to let it run (drawn per invocation); `crashes` counts the kills.
    crash_after: Callable[[], float | None] | None = field(default=None, repr=False)
    crashes: int = 0
    invocations: int = 0
    errors: int = 0
    timeouts: int = 0
    throttles: int = 0
    cold_starts: int = 0
    log: FunctionLog = field(init=False, repr=False)
    _overrides: dict[str, str] = field(default_factory=dict, repr=False)
    _idle: list[Environment] = field(default_factory=list, repr=False)
    _busy: set[int] = field(default_factory=set, repr=False)  # id() of environments in use
    _generation: int = field(default=0, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self) -> None:
        self.log = FunctionLog(self.logical_id)

    # ------------------------------------------------------------------ configuration
    def effective_environment(self) -> dict[str, str]:
        """What a new environment gets, without credentials: the template's variables, any
        overrides, Lambda's own reserved variables."""
        env = {key: os.environ[key] for key in ("PATH", "LANG", "HOME") if key in os.environ}
        env.update({key: os.environ[key] for key in PASS_THROUGH if key in os.environ})
        env.update(
            {
                "TZ": ":UTC",
                "AWS_LAMBDA_FUNCTION_NAME": self.name,
                "AWS_LAMBDA_FUNCTION_VERSION": "$LATEST",
                "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": str(self.memory_mb),
                "AWS_LAMBDA_LOG_GROUP_NAME": self.log_group,
                "AWS_EXECUTION_ENV": "AWS_Lambda_python3.13",
                "LAMBDA_TASK_ROOT": str(self.code_dir.resolve()),
                "_HANDLER": self.handler,
                "PYTHONDONTWRITEBYTECODE": "1",
            }
        )
        env.update(self.environment)
        env.update(self._overrides)
        return env

    def role_environment(self) -> dict[str, str]:
        """The credentials' variables a new environment gets (those of the function's role)."""
        return self.credentials() if self.credentials is not None else {}

    def worker_sys_path(self) -> list[str]:
        """The function's code, then its layers, then the interpreter's own libraries: a worker sees
        nothing else of this repository (as on Lambda: /var/task, /opt/python, the runtime)."""
        repo = Path(__file__).resolve().parent.parent
        # The interpreter's libraries may live inside the checkout (`make venv` puts .venv there).
        libraries = Path(sys.prefix).resolve()
        own = [str(self.code_dir.resolve()), *(str(p.resolve()) for p in self.layers)]
        runtime = []
        for entry in sys.path:
            path = Path(entry or ".").resolve()
            inside_repo = path == repo or repo in path.parents
            if inside_repo and not (path == libraries or libraries in path.parents):
                continue
            runtime.append(entry)
        return [*own, *runtime]

    def _fingerprint(self, env: Mapping[str, str]) -> str:
        return json.dumps(sorted(env.items()))

    def set_overrides(self, values: Mapping[str, str]) -> None:
        """Later environments get `values` on top of the template's (earlier ones are not changed:
        like a configuration update, new invocations land in new environments)."""
        with self._lock:
            self._overrides = dict(values)
        if self.isolation == "thread":
            self.reset()  # one module per process: environments cannot coexist

    @property
    def overrides(self) -> dict[str, str]:
        return dict(self._overrides)

    @contextlib.contextmanager
    def overridden(self, **values: str) -> Iterator[None]:
        saved = self.overrides
        self.set_overrides({**saved, **values})
        try:
            yield
        finally:
            self.set_overrides(saved)

    def load(self) -> None:
        """Start one environment now (a cold start before the first invocation)."""
        env = self._acquire()
        self._release(env)

    def reset(self) -> None:
        """Every later invocation starts in a new environment (idle ones are stopped now, busy ones
        when their invocation ends)."""
        with self._lock:
            self._generation += 1
            idle, self._idle = self._idle, []
        for env in idle:
            env.stop()

    def stop(self) -> None:
        self.reset()

    @property
    def environments(self) -> int:
        """Environments alive now (idle and busy)."""
        with self._lock:
            return len(self._idle) + len(self._busy)

    # ------------------------------------------------------------------ pool
    def _acquire(self) -> Environment:
        base = self.effective_environment()
        fingerprint = self._fingerprint(base)
        with self._lock:
            if self.reserved_concurrency is not None and len(self._busy) >= self.reserved_concurrency:
                self.throttles += 1
                raise Throttled(
                    f"Rate Exceeded: reserved concurrency {self.reserved_concurrency} of {self.name} in use"
                )
            for index in range(len(self._idle) - 1, -1, -1):  # the most recently used first
                env = self._idle[index]
                if env.fingerprint == fingerprint and env.generation == self._generation:
                    del self._idle[index]
                    self._busy.add(id(env))
                    return env
            self.cold_starts += 1
            placeholder = object()
            self._busy.add(id(placeholder))
        try:
            environment: Environment
            if self.isolation == "thread":
                environment = ThreadEnvironment(self, fingerprint)
            else:
                environment = ProcessEnvironment(self, {**base, **self.role_environment()}, fingerprint)
            environment.start()
        except BaseException:
            with self._lock:
                self._busy.discard(id(placeholder))
            raise
        with self._lock:
            self._busy.discard(id(placeholder))
            self._busy.add(id(environment))
        return environment

    def _release(self, env: Environment) -> None:
        retired: list[Environment] = []
        with self._lock:
            self._busy.discard(id(env))
            if env.healthy and env.generation == self._generation:
                self._idle.append(env)
                while len(self._idle) > IDLE_LIMIT:
                    retired.append(self._idle.pop(0))  # the least recently used
            else:
                retired.append(env)
        for old in retired:
            old.stop()

    # ------------------------------------------------------------------ invoking
    def count_crash(self) -> None:
        with self._lock:
            self.crashes += 1

    def invoke(self, event: Any) -> Any:
        """Invoke synchronously: the handler's result, or FunctionError (its error, a timeout, a
        crash), or Throttled at the reserved concurrency."""
        env: Environment | None = None
        with self._lock:
            self.invocations += 1
        try:
            env = self._acquire()
            crash_after_s = self.crash_after() if self.crash_after is not None else None
            return env.invoke(event, self.timeout_s, crash_after_s)
        except Throttled:
            with self._lock:
                self.invocations -= 1
            raise
        except FunctionError as exc:
            with self._lock:
                self.errors += 1
                if isinstance(exc, InvocationTimeout):
                    self.timeouts += 1
            log.warning("%s failed: %s %s", self.logical_id, exc.error_type or type(exc).__name__, exc)
            raise
        finally:
            if env is not None:
                self._release(env)

    def try_invoke(self, event: Any) -> tuple[bool, Any]:
        """(False, None) when throttled by reserved concurrency, else (True, result)."""
        try:
            return True, self.invoke(event)
        except Throttled:
            return False, None
