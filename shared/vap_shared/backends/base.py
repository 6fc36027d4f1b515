"""The backend interface and its classified errors."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, Protocol

import httpx

from ..errors import FieldError
from ..gpu_contract import GenerationSettings
from ..media import MediaRef

ErrorKind = Literal["transient", "auth", "permanent"]


@dataclass(frozen=True)
class Dispatch:
    backend: Literal["modal", "fal"]
    call_id: str
    urls: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class DispatchRequest:
    job_id: str
    settings: GenerationSettings
    video: MediaRef
    image: MediaRef
    webhook_base_url: str
    # dispatch time + the job budget (vap_shared.budget); the GPU never runs past it.
    deadline_unix: int | None = None


class BackendError(Exception):
    """A failed submit. `transient`: may work later; `auth`: this backend refuses us (fall back,
    do not retry); `permanent`: the request itself is wrong (no fallback, no retry)."""

    def __init__(
        self, backend: str, kind: ErrorKind, reason: str, errors: list[FieldError] | None = None
    ) -> None:
        super().__init__(f"{backend}: {reason}")
        self.backend = backend
        self.kind = kind
        self.reason = reason
        self.errors = errors or []

    @property
    def may_fall_back(self) -> bool:
        return self.kind in ("transient", "auth")

    @property
    def retryable(self) -> bool:
        return self.kind == "transient"


class Backend(Protocol):
    name: Literal["modal", "fal"]

    def submit(self, request: DispatchRequest) -> Dispatch: ...


UrlSigner = Callable[[str, str], str]  # (bucket, key) -> presigned GET URL

SUBMIT_TIMEOUT = httpx.Timeout(10.0, connect=3.0, pool=3.0)


def media_url(ref: MediaRef, sign: UrlSigner) -> str:
    """https media pass through unchanged; S3 media become presigned GETs."""
    if ref.kind == "https" and ref.url:
        return ref.url
    if ref.bucket and ref.key:
        return sign(ref.bucket, ref.key)
    raise ValueError(f"{ref.field} has no location")


def classify_http_error(backend: str, exc: httpx.HTTPError) -> BackendError:
    if isinstance(exc, httpx.TimeoutException):
        return BackendError(backend, "transient", f"timed out ({type(exc).__name__})")
    return BackendError(backend, "transient", f"connection failed ({type(exc).__name__})")


def classify_status(backend: str, response: httpx.Response) -> BackendError:
    status = response.status_code
    if status in (401, 403):
        return BackendError(backend, "auth", f"authentication failed (HTTP {status})")
    if status >= 500 or status in (408, 429):
        return BackendError(backend, "transient", f"unavailable (HTTP {status})")
    return BackendError(backend, "permanent", f"rejected the request (HTTP {status})")
