"""fal.ai backend: the queue API with a `fal_webhook` pointing at our webhook function."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import httpx

from ..errors import FieldError, field_error
from ..urls import UrlNotAllowed, check_service_url
from .base import (
    SUBMIT_TIMEOUT,
    BackendError,
    Dispatch,
    DispatchRequest,
    UrlSigner,
    classify_http_error,
    classify_status,
    media_url,
)


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


class FalBackend:
    name: Literal["modal", "fal"] = "fal"

    def __init__(
        self,
        http: httpx.Client,
        queue_url: str,
        endpoint_id: str,
        fal_key: Callable[[], str],
        sign_get: UrlSigner,
        allow_http_loopback: bool = False,
    ) -> None:
        self._http = http
        self._queue_url = queue_url.rstrip("/")
        self._endpoint_id = endpoint_id.strip("/")
        self._fal_key = fal_key
        self._sign_get = sign_get
        self._allow_loopback = allow_http_loopback

    def submit(self, request: DispatchRequest) -> Dispatch:
        try:
            check_service_url(self._queue_url, self._allow_loopback)
        except UrlNotAllowed as exc:
            raise BackendError("fal", "auth", str(exc)) from None
        try:
            key = self._fal_key()
        except Exception as exc:
            raise BackendError("fal", "auth", f"credentials unavailable ({type(exc).__name__})") from None
        webhook = f"{request.webhook_base_url.rstrip('/')}/callbacks/fal/{request.job_id}"
        try:
            response = self._http.post(
                f"{self._queue_url}/{self._endpoint_id}",
                params={"fal_webhook": webhook},
                json=fal_input(request, self._sign_get),
                headers={"Authorization": f"Key {key}"},
                timeout=SUBMIT_TIMEOUT,
            )
        except httpx.HTTPError as exc:
            raise classify_http_error("fal", exc) from None
        if response.status_code == 422:
            try:
                detail = response.json().get("detail")
            except ValueError:
                detail = None
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
