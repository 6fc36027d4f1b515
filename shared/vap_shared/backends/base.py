"""The backend interface, its classified errors and what the two backend clients share."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol
from urllib.parse import urlsplit

from ..contract import BackendName
from ..errors import FieldError
from ..http_limits import SUBMIT_TIMEOUT
from ..urls import UrlNotAllowed, check_service_url

if TYPE_CHECKING:
    # Types only: the error classification here is imported where no request is built (a result's
    # store), so it does not load the request's models.
    import httpx

    from ..gpu_contract import GenerationSettings
    from ..media import MediaRef

ErrorKind = Literal["transient", "auth", "permanent"]


@dataclass(frozen=True)
class Dispatch:
    backend: BackendName
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
    # GPUs of one Modal container (sidecar `gpus`, capped by the stack); fal has no such choice.
    gpus: int = 1


class BackendError(Exception):
    """A failed backend call. `transient`: may work later (retry, or fall back); `auth`: this
    backend refuses us (fall back, do not retry); `permanent`: the request itself is wrong (no
    fallback, no retry)."""

    def __init__(
        self,
        backend: str,
        kind: ErrorKind,
        reason: str,
        errors: list[FieldError] | None = None,
        *,
        may_have_arrived: bool = False,
    ) -> None:
        super().__init__(f"{backend}: {reason}")
        self.backend = backend
        self.kind = kind
        self.reason = reason
        self.errors = errors or []
        # The request was sent but its answer was lost (a read timeout, a dropped connection): the
        # backend may have queued the job.
        self.may_have_arrived = may_have_arrived

    @property
    def may_fall_back(self) -> bool:
        return self.kind in ("transient", "auth")

    @property
    def retryable(self) -> bool:
        return self.kind == "transient"


class Backend(Protocol):
    name: BackendName

    def submit(self, request: DispatchRequest) -> Dispatch: ...


UrlSigner = Callable[[str, str], str]  # (bucket, key) -> presigned GET URL

# The longest one submit request can take before it fails: connecting, then waiting for the answer.
REQUEST_WORST_S = SUBMIT_TIMEOUT.connect + SUBMIT_TIMEOUT.read


def may_have_arrived(exc: Exception) -> bool:
    """After this error the request may have reached the backend (so it may have queued the job)."""
    import httpx  # loaded with the client already; not at init (vap_shared.http_limits)

    arrived = (httpx.ReadTimeout, httpx.WriteTimeout, httpx.ReadError, httpx.RemoteProtocolError)
    return isinstance(exc, arrived)


def media_url(ref: MediaRef, sign: UrlSigner) -> str:
    """https media pass through unchanged; S3 media become presigned GETs."""
    if ref.kind == "https" and ref.url:
        return ref.url
    if ref.bucket and ref.key:
        return sign(ref.bucket, ref.key)
    raise ValueError(f"{ref.field} has no location")


def classify_http_error(backend: str, exc: httpx.HTTPError) -> BackendError:
    import httpx

    arrived = may_have_arrived(exc)
    if isinstance(exc, httpx.TimeoutException):
        reason = f"timed out ({type(exc).__name__})"
        return BackendError(backend, "transient", reason, may_have_arrived=arrived)
    return BackendError(
        backend, "transient", f"connection failed ({type(exc).__name__})", may_have_arrived=arrived
    )


def classify_status(backend: str, response: httpx.Response, action: str | None = None) -> BackendError:
    """An unexpected answer to a submit (or to `action`, e.g. "status request"). Only a validation
    rejection of the request itself (422) is permanent: a 404/405/410 or an HTML page is a stopped
    app or a wrong endpoint URL, which another backend (or a later attempt, once the app is
    redeployed) can get past."""
    status = response.status_code
    kind: ErrorKind
    if status in (401, 403):
        kind, reason = "auth", f"authentication failed (HTTP {status})"
    elif status == 422:
        kind, reason = "permanent", "rejected the request (HTTP 422)"
    elif status >= 500 or status in (408, 429):
        kind, reason = "transient", f"unavailable (HTTP {status})"
    else:
        kind, reason = "transient", f"answered HTTP {status}{_kind_of(response)}"
    if action:
        reason = f"{action} answered HTTP {status}{_kind_of(response)}"
    if status in (404, 405, 410):
        reason += "; is the app deployed and running, and is the endpoint URL right?"
    return BackendError(backend, kind, reason)


def _kind_of(response: httpx.Response) -> str:
    content_type = response.headers.get("content-type", "").split(";")[0].strip()
    return "" if content_type in ("", "application/json") else f", {content_type}"


def json_object(response: httpx.Response) -> dict[str, Any] | None:
    """The answer's JSON object, or None when it is not one (an HTML error page, a proxy's text)."""
    try:
        data = response.json()
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def on_service(url: str, base_url: str) -> bool:
    """True when `url` is on `base_url`'s scheme, host and port and below its path: the only URLs a
    backend's credentials may be sent to."""
    try:
        target, base = urlsplit(url), urlsplit(base_url)
        same_origin = (target.scheme, target.hostname, target.port) == (base.scheme, base.hostname, base.port)
    except ValueError:
        return False
    if not same_origin or target.username is not None or target.password is not None:
        return False
    base_path = base.path.rstrip("/") + "/"
    return target.path.startswith(base_path)


def service_url(backend: str, url: str, allow_http_loopback: bool) -> str:
    """`url` if a backend endpoint may be called there (https; http to loopback locally)."""
    if not url:
        raise BackendError(backend, "auth", "no endpoint URL is configured")
    try:
        check_service_url(url, allow_http_loopback)
    except UrlNotAllowed as exc:
        raise BackendError(backend, "auth", str(exc)) from None
    return url
