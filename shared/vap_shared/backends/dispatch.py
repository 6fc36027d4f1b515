"""Backend choice and fallback: `auto` tries Modal first and falls back to fal."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from ..contract import BackendName
from ..errors import FieldError, field_error
from ..gpu_contract import GpuError
from ..jobs import Job
from .base import Backend, BackendError, Dispatch, DispatchRequest

ORDER: dict[str, tuple[BackendName, ...]] = {
    "auto": ("modal", "fal"),
    "modal": ("modal",),
    "fal": ("fal",),
}


@dataclass(frozen=True)
class DispatchOutcome:
    dispatch: Dispatch
    fallback_from: BackendName | None = None
    fallback_reason: str | None = None


class DispatchFailed(Exception):
    """No backend accepted the job. `retryable` when a later attempt may succeed; `rejected` when a
    backend refused the request itself (a 422: the user's input, not the service's problem)."""

    def __init__(self, errors: list[FieldError], retryable: bool, rejected: bool = False) -> None:
        super().__init__("; ".join(e["message"] for e in errors))
        self.errors = errors
        self.retryable = retryable
        self.rejected = rejected


def _failure(failures: list[BackendError]) -> DispatchFailed:
    errors: list[FieldError] = []
    for failure in failures:
        if failure.errors:
            errors.extend(failure.errors)
        else:
            name = "Modal" if failure.backend == "modal" else "fal.ai"
            errors.append(field_error(None, f"The {name} backend could not take the job: {failure.reason}."))
    # Retry only when nothing was a definite "no": a permanent rejection will not change.
    retryable = all(f.retryable for f in failures) or (
        any(f.retryable for f in failures) and not any(f.kind == "permanent" for f in failures)
    )
    return DispatchFailed(errors, retryable, rejected=any(f.kind == "permanent" for f in failures))


def dispatch(request: DispatchRequest, choice: str, backends: Mapping[str, Backend]) -> DispatchOutcome:
    failures: list[BackendError] = []
    for name in ORDER[choice]:
        try:
            result = backends[name].submit(request)
        except BackendError as exc:
            failures.append(exc)
            if exc.may_fall_back:
                continue
            break
        if failures:
            first = failures[0]
            return DispatchOutcome(result, fallback_from=first.backend, fallback_reason=first.reason)  # type: ignore[arg-type]
        return DispatchOutcome(result)
    raise _failure(failures)


def fallback_target(job: Job) -> BackendName | None:
    """The other backend, once, for jobs whose sidecar said `auto`."""
    if job.requested_backend != "auto" or job.fallback_from is not None or job.backend is None:
        return None
    return "fal" if job.backend == "modal" else "modal"


def gpu_error_allows_fallback(error: GpuError | None) -> bool:
    """Bad input or a safety refusal would fail on the other backend too."""
    if error is None:
        return True
    return error.retryable or error.code in ("internal", "timeout")
