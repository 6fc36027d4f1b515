"""fal.ai backend: the one client of fal's queue API (submit, status, result, cancel).

Ingest and the webhook's fallback submit through it (with a `fal_webhook` pointing at our webhook
function), the sweeper asks it for status and results and cancels, and `vap cancel` cancels. The
fal key is only ever sent to the configured queue host: a `status_url`/`response_url`/`cancel_url`
recorded on a job that points anywhere else is refused.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import quote

from ..contract import BackendName
from ..errors import FieldError, field_error
from ..fal_token import fal_webhook_url
from .base import (
    SUBMIT_TIMEOUT,
    BackendError,
    Dispatch,
    DispatchRequest,
    UrlSigner,
    classify_http_error,
    classify_status,
    json_object,
    media_url,
    on_service,
    service_url,
)

if TYPE_CHECKING:
    import httpx

UrlKind = Literal["status_url", "response_url", "cancel_url"]
# fal's answers to a cancel: removed from the queue (OK / CANCELLATION_REQUESTED), already running
# or finished (ALREADY_COMPLETED: it runs to the end and is billed), or unknown (NOT_FOUND).
CANCEL_ANSWERS = ("OK", "CANCELLATION_REQUESTED", "ALREADY_COMPLETED", "NOT_FOUND")


def fal_detail_errors(detail: Any) -> list[FieldError]:
    """fal's 422 `detail` list (`[{loc, msg, type}]`) → our field errors."""
    if isinstance(detail, str):
        return [field_error(None, f"fal.ai rejected the request: {detail}")]
    errors: list[FieldError] = []
    if isinstance(detail, list):
        for item in detail:
            if not isinstance(item, dict):
                continue
            loc = [str(p) for p in item.get("loc", []) if str(p) not in ("body", "input")]
            field = loc[-1] if loc else None
            message = str(item.get("msg") or "invalid value")
            label = f"`{field}`" if field else "the request"
            errors.append(field_error(field, f"fal.ai rejected {label}: {message}."))
    return errors or [field_error(None, "fal.ai rejected the request.")]


def fal_input(request: DispatchRequest, sign_get: UrlSigner) -> dict[str, Any]:
    body = request.settings.model_dump(exclude_none=True)
    body["video_url"] = media_url(request.video, sign_get)
    body["image_url"] = media_url(request.image, sign_get)
    return body


@dataclass(frozen=True)
class FalStatus:
    """fal's queue status of a request: `IN_QUEUE`, `IN_PROGRESS` or `COMPLETED` (its own words)."""

    status: str
    body: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class FalResult:
    """What `response_url` answered: the model output, or the model's error (e.g. a 422 `detail`)."""

    http_status: int
    body: dict[str, Any] = field(default_factory=dict)

    @property
    def video_url(self) -> str | None:
        video = self.body.get("video")
        url = video.get("url") if isinstance(video, dict) else None
        return url if self.http_status == 200 and isinstance(url, str) and url else None


class FalBackend:
    """`submit` raises `BackendError` classified for dispatch; `status`, `result` and `cancel` raise
    it when fal cannot be asked (network, auth, 5xx, a recorded URL off the queue host)."""

    name: BackendName = "fal"

    def __init__(
        self,
        http: httpx.Client,
        queue_url: str,
        endpoint_id: str,
        fal_key: Callable[[], str],
        *,
        sign_get: UrlSigner | None = None,
        webhook_token: Callable[[str], str] | None = None,
        allow_http_loopback: bool = False,
    ) -> None:
        self._http = http
        self._queue_url = queue_url.rstrip("/")
        self._endpoint_id = endpoint_id.strip("/")
        self._fal_key = fal_key
        self._sign_get = sign_get
        # job id -> the per-job token of its webhook URL (vap_shared.fal_token).
        self._webhook_token = webhook_token
        self._allow_loopback = allow_http_loopback

    # ------------------------------------------------------------------ plumbing
    def _send(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        """The only way the fal key leaves: to the configured queue host, over https."""
        import httpx  # loaded with the client already; not at init (vap_shared.http_limits)

        service_url("fal", self._queue_url, self._allow_loopback)
        if not on_service(url, self._queue_url):
            raise BackendError("fal", "permanent", "refused a URL off the configured fal queue host")
        try:
            key = self._fal_key()
        except Exception as exc:
            raise BackendError("fal", "auth", f"credentials unavailable ({type(exc).__name__})") from None
        headers = {**kwargs.pop("headers", {}), "Authorization": f"Key {key}"}
        try:
            return self._http.request(method, url, headers=headers, timeout=SUBMIT_TIMEOUT, **kwargs)
        except httpx.HTTPError as exc:
            raise classify_http_error("fal", exc) from None

    def request_url(self, kind: UrlKind, request_id: str, urls: Mapping[str, str] | None = None) -> str:
        """The URL fal returned at submit (recorded on the job), else the documented one built from
        the endpoint's owner/app. A recorded URL off the configured queue host is refused: the fal
        key is never sent there."""
        recorded = (urls or {}).get(kind)
        if recorded:
            if not on_service(recorded, self._queue_url):
                raise BackendError(
                    "fal", "permanent", f"the recorded {kind} is not on the configured fal queue host"
                )
            return recorded
        app = "/".join(self._endpoint_id.split("/")[:2])
        base = f"{self._queue_url}/{app}/requests/{quote(request_id, safe='')}"
        return {"status_url": f"{base}/status", "response_url": base, "cancel_url": f"{base}/cancel"}[kind]

    # ------------------------------------------------------------------ submit
    def submit(self, request: DispatchRequest) -> Dispatch:
        if self._sign_get is None or self._webhook_token is None:
            raise RuntimeError("this fal client was built without a URL signer or token: it cannot submit")
        webhook = fal_webhook_url(
            request.webhook_base_url, request.job_id, self._webhook_token(request.job_id)
        )
        response = self._send(
            "POST",
            f"{self._queue_url}/{self._endpoint_id}",
            params={"fal_webhook": webhook},
            json=fal_input(request, self._sign_get),
        )
        if response.status_code == 422:
            detail = (json_object(response) or {}).get("detail")
            raise BackendError("fal", "permanent", "rejected the input (HTTP 422)", fal_detail_errors(detail))
        if response.status_code not in (200, 201, 202):
            raise classify_status("fal", response)
        try:
            data = response.json()
            request_id = str(data["request_id"])
        except (ValueError, KeyError, TypeError):
            raise BackendError("fal", "transient", "answered without a request_id") from None
        urls = {k: str(data[k]) for k in ("status_url", "response_url", "cancel_url") if data.get(k)}
        return Dispatch(backend="fal", call_id=request_id, urls=urls)

    # ------------------------------------------------------------------ status / result / cancel
    def status(self, request_id: str, urls: Mapping[str, str] | None = None) -> FalStatus | None:
        """fal's status of a request; None when fal does not know it (404)."""
        response = self._send("GET", self.request_url("status_url", request_id, urls))
        if response.status_code == 404:
            return None
        body = json_object(response)
        if response.status_code not in (200, 202) or body is None:
            raise classify_status("fal", response, "status request")
        return FalStatus(str(body.get("status", "")), body)

    def result(self, request_id: str, urls: Mapping[str, str] | None = None) -> FalResult:
        """The finished request's output or the model's error, as fal answered it."""
        response = self._send("GET", self.request_url("response_url", request_id, urls))
        return FalResult(response.status_code, json_object(response) or {})

    def cancel(self, request_id: str, urls: Mapping[str, str] | None = None) -> str:
        """fal's answer, one of `CANCEL_ANSWERS`. Only a queued request is removed; one already
        running answers ALREADY_COMPLETED and runs to the end (billed)."""
        response = self._send("PUT", self.request_url("cancel_url", request_id, urls))
        answer = str((json_object(response) or {}).get("status", ""))
        if answer in CANCEL_ANSWERS:
            return answer
        if response.status_code == 404:
            return "NOT_FOUND"
        raise classify_status("fal", response, "cancel request")
