"""Modal backend: POST the GPU app's own `/submit` endpoint with proxy-auth headers."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import httpx
from pydantic import ValidationError

from ..gpu_contract import GpuJobRequest, SubmitResponse
from ..gpu_urls import refresh_url, service_url_fields
from ..signing import derive_callback_key
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


class ModalBackend:
    name: Literal["modal", "fal"] = "modal"

    def __init__(
        self,
        http: httpx.Client,
        endpoint_url: str,
        credentials: Callable[[], tuple[str, str]],
        stack_secret: Callable[[], bytes],
        sign_get: UrlSigner,
        output_put_url: Callable[[str], str],
        allow_http_loopback: bool = False,
        num_inference_steps: int | None = None,
    ) -> None:
        self._http = http
        self._endpoint = endpoint_url.rstrip("/")
        self._credentials = credentials
        self._stack_secret = stack_secret
        self._sign_get = sign_get
        self._output_put_url = output_put_url
        self._allow_loopback = allow_http_loopback
        self._steps = num_inference_steps

    def build_request(self, request: DispatchRequest) -> GpuJobRequest:
        key = derive_callback_key(self._stack_secret(), request.job_id)
        return GpuJobRequest(
            job_id=request.job_id,
            video_url=media_url(request.video, self._sign_get),
            image_url=media_url(request.image, self._sign_get),
            output_put_url=self._output_put_url(request.job_id),
            callback_url=f"{request.webhook_base_url.rstrip('/')}/callbacks/gpu/{request.job_id}",
            callback_key=key.hex(),
            settings=request.settings,
            num_inference_steps=self._steps,
            deadline_unix=request.deadline_unix,
            refresh_url=refresh_url(request.webhook_base_url, request.job_id),
            service_urls=service_url_fields(request.video, request.image),
        )

    def submit(self, request: DispatchRequest) -> Dispatch:
        if not self._endpoint:
            raise BackendError("modal", "auth", "no MODAL_ENDPOINT_URL is configured")
        try:
            check_service_url(self._endpoint, self._allow_loopback)
        except UrlNotAllowed as exc:
            raise BackendError("modal", "auth", str(exc)) from None
        try:
            key, secret = self._credentials()
        except Exception as exc:  # a missing/garbled secret: this backend is unusable, fal may work
            raise BackendError("modal", "auth", f"credentials unavailable ({type(exc).__name__})") from None
        body = self.build_request(request).model_dump_json().encode("utf-8")
        try:
            response = self._http.post(
                f"{self._endpoint}/submit",
                content=body,
                headers={"Content-Type": "application/json", "Modal-Key": key, "Modal-Secret": secret},
                timeout=SUBMIT_TIMEOUT,
            )
        except httpx.HTTPError as exc:
            raise classify_http_error("modal", exc) from None
        if response.status_code not in (200, 202):
            raise classify_status("modal", response)
        try:
            call_id = SubmitResponse.model_validate_json(response.content).call_id
        except ValidationError:
            raise BackendError("modal", "transient", "answered without a call_id") from None
        return Dispatch(backend="modal", call_id=call_id)
