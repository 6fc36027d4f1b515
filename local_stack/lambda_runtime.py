"""Running a Lambda handler in-process, the way the Lambda runtime calls it."""

from __future__ import annotations

import importlib
import logging
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("local_stack.lambda")


@dataclass
class LambdaContext:
    """The attributes of Lambda's context object that handlers and Powertools read."""

    function_name: str
    invoked_function_arn: str
    memory_limit_in_mb: int
    timeout_s: int
    aws_request_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    function_version: str = "$LATEST"
    log_group_name: str = ""
    log_stream_name: str = "local"
    _deadline: float = field(default=0.0, repr=False)

    def __post_init__(self) -> None:
        self._deadline = time.monotonic() + self.timeout_s

    def get_remaining_time_in_millis(self) -> int:
        return max(0, int((self._deadline - time.monotonic()) * 1000))


@dataclass
class LambdaFunction:
    """One function of the template: where its code is, its handler, its limits.

    `reserved_concurrency` caps simultaneous invocations like Lambda's reserved concurrency:
    `try_invoke` answers None (throttled) when the cap is reached.
    """

    logical_id: str
    name: str
    arn: str
    code_dir: Path
    handler: str
    timeout_s: int
    memory_mb: int
    log_group: str = ""
    reserved_concurrency: int | None = None
    invocations: int = 0
    errors: int = 0
    _fn: Callable[[Any, Any], Any] | None = field(default=None, repr=False)
    _module: Any = field(default=None, repr=False)
    _slots: threading.BoundedSemaphore | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def load(self) -> None:
        """Import the handler module (the layer's directory must already be on sys.path)."""
        module_name, func_name = self.handler.rsplit(".", 1)
        code = str(self.code_dir.resolve())
        if code not in sys.path:
            sys.path.insert(0, code)
        module = importlib.import_module(module_name)
        self._module = module
        self._fn = getattr(module, func_name)
        if self.reserved_concurrency:
            self._slots = threading.BoundedSemaphore(self.reserved_concurrency)

    def reset(self) -> None:
        """A fresh execution environment: drop what the handler cached at its cold start."""
        reset = getattr(self._module, "reset", None)
        if callable(reset):
            reset()

    def invoke(self, event: Any) -> Any:
        """Call the handler; exceptions propagate, as they mark the invocation failed."""
        if self._fn is None:
            self.load()
        assert self._fn is not None
        context = LambdaContext(
            function_name=self.name,
            invoked_function_arn=self.arn,
            memory_limit_in_mb=self.memory_mb,
            timeout_s=self.timeout_s,
            log_group_name=self.log_group,
        )
        with self._lock:
            self.invocations += 1
        started = time.monotonic()
        try:
            return self._fn(event, context)
        except Exception:
            with self._lock:
                self.errors += 1
            log.exception("%s failed (request %s)", self.logical_id, context.aws_request_id)
            raise
        finally:
            elapsed = time.monotonic() - started
            if elapsed > self.timeout_s:
                # Threads cannot be killed; report what Lambda would have timed out.
                log.warning("%s ran %.1fs, over its %ss timeout", self.logical_id, elapsed, self.timeout_s)

    def try_invoke(self, event: Any) -> tuple[bool, Any]:
        """(False, None) when throttled by reserved concurrency, else (True, result)."""
        if self._slots is None:
            return True, self.invoke(event)
        if not self._slots.acquire(blocking=False):
            return False, None
        try:
            return True, self.invoke(event)
        finally:
            self._slots.release()
