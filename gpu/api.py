"""The GPU HTTP API (docs/contracts.md): submit, status, cancel, over an `Executor`.

The same FastAPI app serves on Modal (`ModalExecutor`: spawn a GPU class method, poll its
FunctionCall) and locally (`LocalExecutor`: a thread running `run_job` in-process).
"""

from __future__ import annotations

import hmac
import threading
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

import httpx
from fastapi import FastAPI, HTTPException, Request, Response
from fastapi.responses import JSONResponse
from vap_shared.gpu_contract import (
    CancelResponse,
    GpuError,
    GpuJobRequest,
    GpuProgress,
    GpuResult,
    JobState,
    StatusResponse,
    SubmitResponse,
)

from gpu.engine import Engine
from gpu.runner import JobFailed, RunnerConfig, run_job
from gpu.safety import SafetyClassifier

KEY_HEADER = "Modal-Key"
SECRET_HEADER = "Modal-Secret"  # noqa: S105 (a header name, not a secret)


class Executor(Protocol):
    def submit(self, request: GpuJobRequest) -> str:
        """Start the job in the background and return its call id at once."""
        ...

    def status(self, call_id: str) -> StatusResponse | None:
        """The job's state, or None when the call id is unknown."""
        ...

    def cancel(self, call_id: str) -> bool | None:
        """Ask the job to stop: True if it was still pending/running, None when unknown."""
        ...


# --- local: a thread pool in this process ----------------------------------------------------


@dataclass
class _LocalCall:
    request: GpuJobRequest
    state: JobState = "queued"
    progress: GpuProgress | None = None
    result: GpuResult | None = None
    error: GpuError | None = None
    cancel: threading.Event = field(default_factory=threading.Event)
    future: Future[None] | None = None


class LocalExecutor:
    """Runs `run_job` on worker threads (one by default: one model, one device)."""

    def __init__(
        self,
        engine: Engine,
        *,
        safety: SafetyClassifier | None = None,
        config: RunnerConfig | None = None,
        http: httpx.Client | None = None,
        max_workers: int = 1,
        keep_calls: int = 1000,
    ) -> None:
        self.engine = engine
        self.safety = safety
        self.config = config or RunnerConfig()
        self.http = http or httpx.Client()
        self.keep_calls = keep_calls
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="vap-job")
        self._calls: OrderedDict[str, _LocalCall] = OrderedDict()
        self._lock = threading.Lock()

    def submit(self, request: GpuJobRequest) -> str:
        call_id = f"fc-local-{uuid.uuid4().hex}"
        call = _LocalCall(request=request)
        with self._lock:
            self._calls[call_id] = call
            while len(self._calls) > self.keep_calls:  # forget the oldest finished calls
                oldest = next(iter(self._calls))
                if self._calls[oldest].state in ("queued", "running"):
                    break
                self._calls.pop(oldest)
        call.future = self._pool.submit(self._run, call_id, call)
        return call_id

    def _run(self, call_id: str, call: _LocalCall) -> None:
        with self._lock:
            if call.cancel.is_set():
                call.state = "cancelled"
                return
            call.state = "running"

        def on_progress(step: int, total: int) -> None:
            call.progress = GpuProgress(step=step, total=total)

        try:
            result = run_job(
                call.request,
                self.engine,
                self.http,
                call_id=call_id,
                config=self.config,
                safety=self.safety,
                cancel=call.cancel,
                on_progress=on_progress,
            )
        except JobFailed as exc:
            with self._lock:
                call.error = exc.error
                call.state = "cancelled" if exc.error.code == "cancelled" else "failed"
        except BaseException as exc:  # run_job reports its own errors; this is a last resort
            with self._lock:
                call.error = GpuError(code="internal", message=f"{type(exc).__name__}", retryable=True)
                call.state = "failed"
        else:
            with self._lock:
                call.result = result
                call.state = "succeeded"

    def status(self, call_id: str) -> StatusResponse | None:
        with self._lock:
            call = self._calls.get(call_id)
            if call is None:
                return None
            return StatusResponse(
                call_id=call_id,
                state=call.state,
                progress=call.progress,
                result=call.result,
                error=call.error,
            )

    def cancel(self, call_id: str) -> bool | None:
        with self._lock:
            call = self._calls.get(call_id)
            if call is None:
                return None
            if call.state not in ("queued", "running"):
                return False
            call.cancel.set()
            if call.state == "queued" and call.future is not None and call.future.cancel():
                call.state = "cancelled"
                call.error = GpuError(code="cancelled", message="the job was cancelled before it started")
            return True

    def shutdown(self) -> None:
        with self._lock:
            for call in self._calls.values():
                call.cancel.set()
        self._pool.shutdown(wait=True, cancel_futures=True)
        self.http.close()


# --- Modal: spawn a class method, poll its FunctionCall ---------------------------------------


def outcome_to_status(call_id: str, outcome: Any) -> StatusResponse:
    """Map the Modal method's return value ({"result": ...} or {"error": ...}) to a status."""
    if isinstance(outcome, dict) and outcome.get("result") is not None:
        return StatusResponse(
            call_id=call_id, state="succeeded", result=GpuResult.model_validate(outcome["result"])
        )
    if isinstance(outcome, dict) and outcome.get("error") is not None:
        error = GpuError.model_validate(outcome["error"])
        state: JobState = "cancelled" if error.code == "cancelled" else "failed"
        return StatusResponse(call_id=call_id, state=state, error=error)
    error = GpuError(code="internal", message="the GPU function returned no result", retryable=True)
    return StatusResponse(call_id=call_id, state="failed", error=error)


class ModalExecutor:
    """`spawn` returns a FunctionCall id; status polls it without waiting (`get(timeout=0)`).

    Modal cannot tell queued from running here, so both read as "running"; progress reaches the
    webhook through the signed progress callbacks instead.
    """

    def __init__(self, spawn: Callable[[dict[str, Any]], Any]) -> None:
        self._spawn = spawn  # e.g. VapGenerator().generate.spawn

    def submit(self, request: GpuJobRequest) -> str:
        call = self._spawn(request.model_dump(mode="json"))
        return str(call.object_id)

    def _lookup(self, call_id: str) -> Any | None:
        import modal

        try:
            return modal.FunctionCall.from_id(call_id)
        except (modal.exception.NotFoundError, modal.exception.InvalidError):
            return None

    def status(self, call_id: str) -> StatusResponse | None:
        import modal

        call = self._lookup(call_id)
        if call is None:
            return None
        try:
            outcome = call.get(timeout=0)
        except TimeoutError:
            return StatusResponse(call_id=call_id, state="running")
        except (modal.exception.NotFoundError, modal.exception.InvalidError):
            return None
        except modal.exception.InputCancellation:
            error = GpuError(code="cancelled", message="the job was cancelled")
            return StatusResponse(call_id=call_id, state="cancelled", error=error)
        except modal.exception.FunctionTimeoutError:
            error = GpuError(code="timeout", message="the GPU function timed out", retryable=True)
            return StatusResponse(call_id=call_id, state="failed", error=error)
        except modal.exception.OutputExpiredError:
            error = GpuError(code="internal", message="the call's result has expired")
            return StatusResponse(call_id=call_id, state="failed", error=error)
        except Exception as exc:  # a crash of the container, or an exception we did not catch
            cancelled = "cancel" in str(exc).lower()
            error = GpuError(
                code="cancelled" if cancelled else "internal",
                message="the job was cancelled"
                if cancelled
                else f"the GPU function failed: {type(exc).__name__}",
                retryable=not cancelled,
            )
            return StatusResponse(call_id=call_id, state="cancelled" if cancelled else "failed", error=error)
        return outcome_to_status(call_id, outcome)

    def cancel(self, call_id: str) -> bool | None:
        call = self._lookup(call_id)
        if call is None:
            return None
        current = self.status(call_id)
        if current is None:
            return None
        if current.state != "running":
            return False
        call.cancel()
        return True


# --- the app ---------------------------------------------------------------------------------


def _authorized(request: Request, key: str, secret: str) -> bool:
    given_key = request.headers.get(KEY_HEADER, "").encode()
    given_secret = request.headers.get(SECRET_HEADER, "").encode()
    # Evaluate both comparisons (no short-circuit) and compare in constant time.
    key_ok = hmac.compare_digest(given_key, key.encode())
    secret_ok = hmac.compare_digest(given_secret, secret.encode())
    return key_ok & secret_ok


def create_app(executor: Executor, auth: tuple[str, str] | None = None) -> FastAPI:
    """The GPU API. `auth=(key, secret)` checks Modal-Key/Modal-Secret here (the local server);
    on Modal, `requires_proxy_auth=True` makes the proxy check them before the request arrives.
    """
    app = FastAPI(title="VAP GPU", docs_url=None, redoc_url=None, openapi_url=None)

    if auth is not None:
        key, secret = auth

        # A middleware (not a dependency) so auth runs before body parsing: an unauthenticated
        # caller gets 401, never a 422 that reveals the schema.
        @app.middleware("http")
        async def check_auth(
            request: Request, call_next: Callable[[Request], Awaitable[Response]]
        ) -> Response:
            if not _authorized(request, key, secret):
                return JSONResponse({"detail": "unauthorized"}, status_code=401)
            return await call_next(request)

    @app.post("/submit", status_code=202, response_model=SubmitResponse)
    def submit(body: GpuJobRequest) -> SubmitResponse:
        return SubmitResponse(call_id=executor.submit(body))

    @app.get("/status/{call_id}", response_model=StatusResponse)
    def status(call_id: str) -> StatusResponse:
        found = executor.status(call_id)
        if found is None:
            raise HTTPException(status_code=404, detail="unknown call_id")
        return found

    @app.post("/cancel/{call_id}", response_model=CancelResponse)
    def cancel(call_id: str) -> CancelResponse:
        cancelled = executor.cancel(call_id)
        if cancelled is None:
            raise HTTPException(status_code=404, detail="unknown call_id")
        return CancelResponse(call_id=call_id, cancelled=cancelled)

    return app
