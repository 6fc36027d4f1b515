"""What the GPU API runs jobs on: an `Executor` (submit, status, cancel by call id).

`LocalExecutor`: a thread running `run_job` in-process (the local GPU server). `ModalExecutor`:
spawn the method of the GPU class `gpu.service.routing` names for the job, poll its FunctionCall.
Submit is idempotent on `job_id` on both: the same job id gets the same call id.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

import httpx
from vap_shared.gpu_contract import (
    GpuError,
    GpuJobRequest,
    GpuProgress,
    GpuResult,
    JobState,
    StatusResponse,
)

from gpu.service.engines.single import Engine
from gpu.service.routing import ChooseGpu, SubmitRejected, choose_class
from gpu.service.runner.config import JobFailed, RunnerConfig
from gpu.service.runner.run import run_job
from gpu.service.safety import SafetyClassifier

log = logging.getLogger(__name__)


class Executor(Protocol):
    def submit(self, request: GpuJobRequest) -> str:
        """Start the job in the background and return its call id at once; a job id already
        submitted returns that submit's call id (nothing new runs). May raise `SubmitRejected`."""
        ...

    def status(self, call_id: str) -> StatusResponse | None:
        """The job's state, or None when the call id is unknown."""
        ...

    def cancel(self, call_id: str) -> bool | None:
        """Ask the job to stop: True if it was still pending/running, None when unknown."""
        ...


# --- local: a thread pool in this process ----------------------------------------------------


class Preempted(BaseException):
    """The worker running an input went away mid-run (Modal preempted its container): nothing of
    that run reports anything more (a BaseException: the runner's error handling never sees it)."""


class Preemptions(Protocol):
    """When the local stand-in preempts a run: the step (1-based, of `total`) at which attempt
    `attempt` of `job_id` stops, or None to let it finish."""

    def at_step(self, job_id: str, attempt: int, total: int) -> int | None: ...


@dataclass
class _LocalCall:
    request: GpuJobRequest
    state: JobState = "queued"
    progress: GpuProgress | None = None
    result: GpuResult | None = None
    error: GpuError | None = None
    cancel: threading.Event = field(default_factory=threading.Event)
    future: Future[None] | None = None
    attempts: int = 0


class LocalExecutor:
    """Runs `run_job` on worker threads (one by default: one model, one device).

    With `preemptions`, a run stops at the step they name and the same input runs again, as Modal
    does with a preempted GPU input: same call id, the next attempt, on a fresh worker (a new engine
    from `engine_factory`, when given)."""

    def __init__(
        self,
        engine: Engine,
        *,
        safety: SafetyClassifier | None = None,
        config: RunnerConfig | None = None,
        http: httpx.Client | None = None,
        max_workers: int = 1,
        keep_calls: int = 1000,
        engine_factory: Callable[[], Engine] | None = None,
        preemptions: Preemptions | None = None,
    ) -> None:
        self.engine = engine
        self.engine_factory = engine_factory
        self.preemptions = preemptions
        self.safety = safety
        self.config = config or RunnerConfig()
        self.http = http or httpx.Client()
        self.keep_calls = keep_calls
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="vap-job")
        self._calls: OrderedDict[str, _LocalCall] = OrderedDict()
        self._jobs: dict[str, str] = {}  # job id -> call id: a repeated submit gets the same call
        self._lock = threading.Lock()

    def runs(self) -> dict[str, tuple[JobState, int]]:
        """Job id -> (state, attempts) of every call still remembered (what a benchmark counts)."""
        with self._lock:
            return {call.request.job_id: (call.state, call.attempts) for call in self._calls.values()}

    def submit(self, request: GpuJobRequest) -> str:
        with self._lock:
            known = self._jobs.get(request.job_id)
            if known is not None:
                return known
            call_id = f"fc-local-{uuid.uuid4().hex}"
            call = _LocalCall(request=request)
            self._calls[call_id] = call
            self._jobs[request.job_id] = call_id
            while len(self._calls) > self.keep_calls:  # forget the oldest finished calls
                oldest = next(iter(self._calls))
                if self._calls[oldest].state in ("queued", "running"):
                    break
                forgotten = self._calls.pop(oldest)
                self._jobs.pop(forgotten.request.job_id, None)
            # Queued under the lock, so a concurrent submit of the same job finds it complete.
            call.future = self._pool.submit(self._run, call_id, call)
        return call_id

    def _run(self, call_id: str, call: _LocalCall) -> None:
        with self._lock:
            if call.cancel.is_set():
                call.state = "cancelled"
                return
            call.state = "running"
        engine = self.engine
        while True:
            call.attempts += 1
            try:
                self._attempt(call_id, call, engine)
                return
            except Preempted:
                log.info("call %s preempted (attempt %d): running it again", call_id, call.attempts)
                engine = self.engine_factory() if self.engine_factory is not None else engine

    def _attempt(self, call_id: str, call: _LocalCall, engine: Engine) -> None:
        attempt = call.attempts
        preemptions = self.preemptions

        def on_progress(step: int, total: int) -> None:
            with self._lock:  # a re-run resumes at a saved step: what was reported stays reported
                if call.progress is None or step > call.progress.step:
                    call.progress = GpuProgress(step=step, total=total)
            if preemptions is not None and preemptions.at_step(call.request.job_id, attempt, total) == step:
                raise Preempted

        try:
            result = run_job(
                call.request,
                engine,
                self.http,
                call_id=call_id,
                config=self.config,
                safety=self.safety,
                cancel=call.cancel,
                on_progress=on_progress,
                attempt=attempt,
            )
        except Preempted:
            raise
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


Spawn = Callable[[dict[str, Any]], Any]  # e.g. VapGeneratorH100().generate.spawn -> FunctionCall


class CallRegistry(Protocol):
    """The part of `modal.Dict` the executor uses (shared by every API container)."""

    def put(self, key: Any, value: Any, *, skip_if_exists: bool = False) -> bool: ...

    def get(self, key: Any, default: Any = None) -> Any: ...

    def pop(self, key: Any, default: Any = None) -> Any: ...


def _job_key(job_id: str) -> str:
    return f"job:{job_id}"


def _cancel_key(call_id: str) -> str:
    return f"cancel:{call_id}"


def _takeover_key(job_id: str, reservation: dict[str, Any]) -> str:
    # One key per stale reservation: put-if-absent on it elects exactly one taker.
    token = reservation.get("token") or reservation.get("pending_since", "")
    return f"takeover:{job_id}:{token}"


def _reservation(clock: Callable[[], float]) -> dict[str, Any]:
    return {"pending_since": clock(), "token": uuid.uuid4().hex}


def claim_attempt(registry: CallRegistry, call_id: str, limit: int = 100) -> int:
    """Which execution of `call_id` this is: Modal runs a preempted input again with the same call
    id on a fresh container, so the n-th execution is the first to create `attempt:<call id>:<n>`
    (put-if-absent is atomic on the server; `modal.Dict` has no compare-and-set)."""
    for attempt in range(1, limit + 1):
        if registry.put(f"attempt:{call_id}:{attempt}", {"at": time.time()}, skip_if_exists=True):
            return attempt
    raise RuntimeError(f"call {call_id} has run {limit} times already")


def _walk(nodes: Iterable[Any]) -> Iterable[Any]:
    for node in nodes:
        yield node
        yield from _walk(getattr(node, "children", ()))


class ModalExecutor:
    """Submit spawns the method of the class `gpu.service.routing` names for the job, once
    per job id (a `modal.Dict` maps job id -> call id across API containers); status polls the
    FunctionCall without waiting (`get(timeout=0)`); cancel records the cancel, then cancels.

    Modal cannot tell queued from running here, so both read as "running"; progress reaches the
    webhook through the signed progress callbacks instead.
    """

    def __init__(
        self,
        spawners: Mapping[str, Spawn],
        registry: CallRegistry,
        *,
        choose: tuple[ChooseGpu, type[Exception]] | None = None,
        default_steps: int = 50,
        run_limit_s: float | None = None,
        wait_s: float = 20.0,
        poll_s: float = 0.25,
        stale_s: float = 120.0,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._spawners = dict(spawners)  # Modal gpu string ("H100!", "H100:8") -> that class's spawn
        self._registry = registry
        self._choose = choose
        # A job too slow for one run on the GPUs it asked for is routed to more (see `choose_class`).
        self._default_steps, self._run_limit_s = default_steps, run_limit_s
        self._wait_s, self._poll_s, self._stale_s = wait_s, poll_s, stale_s
        self._clock, self._sleep = clock, sleep

    # -- submit

    def route(self, request: GpuJobRequest) -> str:
        """The Modal GPU string of the class that runs `request` (raises `SubmitRejected`)."""
        return choose_class(
            request.settings,
            request.gpus,
            self._spawners,
            self._choose,
            steps=request.num_inference_steps or self._default_steps,
            run_limit_s=self._run_limit_s,
        )

    def submit(self, request: GpuJobRequest) -> str:
        modal_gpu = self.route(request)
        key = _job_key(request.job_id)
        deadline = self._clock() + self._wait_s
        while True:
            # Reserve the job id before spawning: of two concurrent submits only one spawns.
            if self._registry.put(key, _reservation(self._clock), skip_if_exists=True):
                return self._spawn(key, modal_gpu, request)
            record = self._registry.get(key)
            if record is None:  # the reserving submit failed to spawn and let go: try again
                continue
            if record.get("call_id"):
                return str(record["call_id"])
            stale = self._clock() - float(record.get("pending_since", 0)) > self._stale_s
            # The reserving submit died between reserving and recording (its container was lost);
            # after this long its spawn is taken to have failed. Of the submits that find it stale,
            # only the one that creates this reservation's takeover key replaces it and spawns.
            takeover = _takeover_key(request.job_id, record)
            if stale and self._registry.put(takeover, {"at": self._clock()}, skip_if_exists=True):
                log.warning("job %s: stale submit reservation taken over", request.job_id)
                self._registry.put(key, _reservation(self._clock))
                return self._spawn(key, modal_gpu, request)
            if self._clock() >= deadline:
                raise SubmitRejected(503, "a submit of this job is still in progress; retry")
            self._sleep(self._poll_s)

    def _spawn(self, key: str, modal_gpu: str, request: GpuJobRequest) -> str:
        try:
            call = self._spawners[modal_gpu](request.model_dump(mode="json"))
        except BaseException:
            self._registry.pop(key, None)  # let a retry spawn
            raise
        call_id = str(call.object_id)
        self._registry.put(key, {"call_id": call_id, "gpu": modal_gpu})
        return call_id

    # -- status

    def _lookup(self, call_id: str) -> Any | None:
        import modal

        try:
            return modal.FunctionCall.from_id(call_id)
        except (modal.exception.NotFoundError, modal.exception.InvalidError):
            return None

    def was_cancelled(self, call_id: str, call: Any) -> bool:
        """Whether the call ended by cancellation: our own cancel endpoint recorded it, or Modal
        reports the input TERMINATED (what a cancelled input's output carries; `get()` then raises
        a `RemoteError` with no message, so the message cannot tell)."""
        from modal.types import InputStatus

        try:
            if self._registry.get(_cancel_key(call_id)) is not None:
                return True
        except Exception as exc:  # the registry is an aid here; Modal's status still decides
            log.warning("cancel record of %s unreadable: %s", call_id, type(exc).__name__)
        try:
            graph = call.get_call_graph()
        except Exception as exc:
            log.warning("call graph of %s unavailable: %s", call_id, type(exc).__name__)
            return False
        mine = [node for node in _walk(graph) if node.function_call_id == call_id]
        return any(node.status == InputStatus.TERMINATED for node in mine)

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
            return _cancelled(call_id)
        except modal.exception.FunctionTimeoutError:
            error = GpuError(code="timeout", message="the GPU function timed out", retryable=True)
            return StatusResponse(call_id=call_id, state="failed", error=error)
        except modal.exception.OutputExpiredError:
            error = GpuError(code="internal", message="the call's result has expired")
            return StatusResponse(call_id=call_id, state="failed", error=error)
        except Exception as exc:  # a cancelled input (RemoteError, empty), a crash, an uncaught error
            if self.was_cancelled(call_id, call):
                return _cancelled(call_id)
            error = GpuError(
                code="internal", message=f"the GPU function failed: {type(exc).__name__}", retryable=True
            )
            return StatusResponse(call_id=call_id, state="failed", error=error)
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
        # Recorded first: however the call's end reads later, status knows it was cancelled.
        self._registry.put(_cancel_key(call_id), {"at": self._clock()})
        try:
            call.cancel()
        except BaseException:
            self._registry.pop(_cancel_key(call_id), None)  # not cancelled: a later crash is a crash
            raise
        return True


def _cancelled(call_id: str) -> StatusResponse:
    error = GpuError(code="cancelled", message="the job was cancelled")
    return StatusResponse(call_id=call_id, state="cancelled", error=error)
