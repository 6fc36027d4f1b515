"""Modal backend: the one client of the GPU app's HTTP API (`/submit`, `/status`, `/cancel`).

Ingest and the webhook's fallback submit through it, the sweeper asks it for status and cancels,
and `vap cancel` cancels. The Modal proxy-auth token is only ever sent to the configured endpoint.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast
from urllib.parse import quote

from pydantic import ValidationError

from .. import routes
from ..contract import BackendName, GpuCount
from ..gpu_contract import CancelResponse, GpuJobRequest, StatusResponse, SubmitResponse
from ..gpu_urls import refresh_url, service_url_fields
from ..signing import derive_callback_key
from .base import (
    SUBMIT_TIMEOUT,
    BackendError,
    Dispatch,
    DispatchRequest,
    UrlSigner,
    classify_http_error,
    classify_status,
    json_object,
    may_have_arrived,
    media_url,
    service_url,
)

if TYPE_CHECKING:
    import httpx

# After an error that may have reached the GPU API (base.may_have_arrived: Modal may have queued the
# job) or a transient 5xx answer (Modal's web endpoints answer one now and then, sometimes after the
# submit took effect), the submit is retried with the same job id, which the GPU API answers with the
# same call id: a blip costs neither a fal run nor a second GPU run.
SUBMIT_ATTEMPTS = 2
TRANSIENT_STATUSES = frozenset({500, 502, 503, 504})


@dataclass(frozen=True)
class ModalJobBuilder:
    """What a submit sends besides the endpoint: presigned URLs, the callback URL and its key.

    `upload_put_url(job_id, field)` presigns the GPU's optional uploads (`poster_put_url`,
    `preview_put_url`: work/<job_id>/poster.jpg, preview.webp); without it no previews are asked for.
    """

    stack_secret: Callable[[], bytes]
    sign_get: UrlSigner
    output_put_url: Callable[[str], str]
    num_inference_steps: int | None = None
    upload_put_url: Callable[[str, str], str] | None = None

    def build(self, request: DispatchRequest) -> GpuJobRequest:
        key = derive_callback_key(self.stack_secret(), request.job_id)
        previews = self.upload_put_url is not None
        poster = preview = None
        if self.upload_put_url is not None:
            poster = self.upload_put_url(request.job_id, "poster_put_url")
            preview = self.upload_put_url(request.job_id, "preview_put_url")
        return GpuJobRequest(
            job_id=request.job_id,
            video_url=media_url(request.video, self.sign_get),
            image_url=media_url(request.image, self.sign_get),
            output_put_url=self.output_put_url(request.job_id),
            callback_url=routes.url(request.webhook_base_url, "gpu", request.job_id),
            callback_key=key.hex(),
            settings=request.settings,
            num_inference_steps=self.num_inference_steps,
            deadline_unix=request.deadline_unix,
            refresh_url=refresh_url(request.webhook_base_url, request.job_id),
            service_urls=service_url_fields(request.video, request.image, previews=previews),
            gpus=cast(GpuCount, request.gpus),
            poster_put_url=poster,
            preview_put_url=preview,
        )


class ModalBackend:
    """Every method raises `BackendError` when Modal cannot be asked or answers unexpectedly."""

    name: BackendName = "modal"

    def __init__(
        self,
        http: httpx.Client,
        endpoint_url: str,
        credentials: Callable[[], tuple[str, str]],
        *,
        jobs: ModalJobBuilder | None = None,
        allow_http_loopback: bool = False,
        submit_attempts: int = SUBMIT_ATTEMPTS,
    ) -> None:
        self._http = http
        self._endpoint = endpoint_url.rstrip("/")
        self._credentials = credentials
        self._jobs = jobs
        self._allow_loopback = allow_http_loopback
        self._submit_attempts = submit_attempts

    # ------------------------------------------------------------------ plumbing
    def _headers(self) -> dict[str, str]:
        if not self._endpoint:
            raise BackendError("modal", "auth", "no MODAL_ENDPOINT_URL is configured")
        service_url("modal", self._endpoint, self._allow_loopback)
        try:
            key, secret = self._credentials()
        except Exception as exc:  # a missing/garbled secret: this backend is unusable, fal may work
            raise BackendError("modal", "auth", f"credentials unavailable ({type(exc).__name__})") from None
        return {"Modal-Key": key, "Modal-Secret": secret}

    def _call(
        self, method: str, path: str, headers: dict[str, str], body: bytes | None = None
    ) -> httpx.Response:
        # Paths are built here from call ids, never taken from a record: the token goes to
        # the configured endpoint only.
        return self._http.request(
            method, f"{self._endpoint}{path}", content=body, headers=headers, timeout=SUBMIT_TIMEOUT
        )

    # ------------------------------------------------------------------ submit
    def build_request(self, request: DispatchRequest) -> GpuJobRequest:
        if self._jobs is None:
            raise RuntimeError("this Modal client was built without a job builder: it cannot submit")
        return self._jobs.build(request)

    def submit(self, request: DispatchRequest) -> Dispatch:
        import httpx  # loaded with the client already; not at init (vap_shared.http_limits)

        headers = self._headers()
        body = self.build_request(request).model_dump_json().encode("utf-8")
        headers["Content-Type"] = "application/json"
        response: httpx.Response | None = None
        for attempt in range(1, self._submit_attempts + 1):
            try:
                response = self._call("POST", "/submit", headers, body)
                if response.status_code in TRANSIENT_STATUSES and attempt < self._submit_attempts:
                    continue
                break
            except httpx.HTTPError as exc:
                if not may_have_arrived(exc):  # never reached Modal (connect error): fall back at once
                    raise classify_http_error("modal", exc) from None
                # Modal may have queued it: ask again for the same job id before falling back, so
                # one job never runs on both backends because an answer was slow.
                if attempt == self._submit_attempts:
                    error = classify_http_error("modal", exc)
                    if attempt > 1:
                        error.reason += f"; tried {attempt} times with the same job id"
                    raise error from None
        assert response is not None
        if response.status_code not in (200, 202):
            raise classify_status("modal", response)
        try:
            call_id = SubmitResponse.model_validate_json(response.content).call_id
        except ValidationError:
            raise BackendError("modal", "transient", "answered without a call_id") from None
        return Dispatch(backend="modal", call_id=call_id)

    # ------------------------------------------------------------------ status / cancel
    def status(self, call_id: str) -> StatusResponse | None:
        """The GPU API's status of a call; None when the API answers that it does not know it."""
        import httpx

        headers = self._headers()
        for _ in range(self._submit_attempts):
            try:
                response = self._call("GET", f"/status/{quote(call_id, safe='')}", headers)
            except httpx.HTTPError as exc:
                raise classify_http_error("modal", exc) from None
            # A status request is safe to repeat: a 5xx blip is asked again at once (the sweeper at
            # its stop point would otherwise end a job that finished fine).
            if response.status_code not in TRANSIENT_STATUSES:
                break
        if response.status_code == 404 and json_object(response) is not None:
            return None  # our API's own 404 (JSON); a stopped app answers Modal's HTML/text 404
        if response.status_code != 200:
            raise classify_status("modal", response, "status request")
        try:
            return StatusResponse.model_validate_json(response.content)
        except ValidationError:
            raise BackendError("modal", "transient", "status answer is not a GPU status") from None

    def cancel(self, call_id: str) -> bool:
        """Ask the GPU API to stop a call: True if it was stopped, False if it had already finished."""
        import httpx

        headers = self._headers()
        try:
            response = self._call("POST", f"/cancel/{quote(call_id, safe='')}", headers)
        except httpx.HTTPError as exc:
            raise classify_http_error("modal", exc) from None
        if response.status_code == 404 and json_object(response) is not None:
            raise BackendError("modal", "permanent", f"Modal does not know the call {call_id} (HTTP 404)")
        if response.status_code != 200:
            raise classify_status("modal", response, "cancel request")
        try:
            return CancelResponse.model_validate_json(response.content).cancelled
        except ValidationError:
            raise BackendError("modal", "transient", "cancel answer is not a GPU cancel answer") from None
