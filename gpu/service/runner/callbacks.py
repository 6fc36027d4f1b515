"""The run talking back to the service: signed callbacks, URL refreshes, the per-step hook."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Literal

import httpx
from pydantic import ValidationError
from vap_shared.gpu_contract import (
    GpuCallback,
    GpuError,
    GpuJobRequest,
    GpuProgress,
    GpuResult,
    UrlRefreshRequest,
    UrlRefreshResponse,
)
from vap_shared.signing import signed_headers

from gpu.service.runner.config import JobFailed, RunnerConfig, fail
from gpu.service.runner.transport import UnsafeUrl, host_of, pinned_send, retrying, timeout_of

log = logging.getLogger(__name__)

ProgressHook = Callable[[int, int], None]


# URL fields a refresh may replace (`UrlRefreshResponse`: None keeps the request's URL).
REFRESHABLE = ("video_url", "image_url", "output_put_url", "poster_put_url", "preview_put_url")


def refresh_urls(
    http: httpx.Client,
    request: GpuJobRequest,
    call_id: str,
    purpose: Literal["start", "upload"],
    config: RunnerConfig,
    *,
    attempt: int = 1,
) -> tuple[GpuJobRequest, UrlRefreshResponse | None]:
    """Ask `request.refresh_url` for fresh presigned URLs (signed like callbacks) and return the
    request with them, and the answer (None without one: it also holds the URLs of the saved
    denoising state). Unreachable or unusable answers keep the URLs we have; 409 means the
    service no longer wants this run: raise `JobFailed` (cancelled, "superseded", no callback)."""
    if not request.refresh_url:
        return request, None
    refresh = UrlRefreshRequest(
        job_id=request.job_id, call_id=call_id, purpose=purpose, sent_at=int(time.time()), attempt=attempt
    )
    body = refresh.model_dump_json().encode("utf-8")
    key = bytes.fromhex(request.callback_key)
    timeout = timeout_of(config, config.refresh_timeout_s)

    def send() -> httpx.Response:
        return pinned_send(
            http, "POST", request.refresh_url or "", config, content=body, headers=signed_headers(key, body),
            timeout=timeout,
        )  # fmt: skip

    host = host_of(request.refresh_url)
    try:
        response = retrying(config.refresh_attempts, config, send)
    except (UnsafeUrl, httpx.HTTPError) as exc:
        why = str(exc) if isinstance(exc, UnsafeUrl) else type(exc).__name__
        log.warning("URL refresh (%s) at %s failed: %s; keeping the URLs we have", purpose, host, why)
        return request, None
    if response.status_code == 409:
        raise JobFailed(GpuError(code="cancelled", message="superseded"), notify=False)
    if response.status_code != 200:
        status = response.status_code
        log.warning("URL refresh (%s) at %s: HTTP %s; keeping the URLs we have", purpose, host, status)
        return request, None
    try:
        fresh = UrlRefreshResponse.model_validate_json(response.content)
    except ValidationError:
        log.warning("URL refresh (%s) at %s: unreadable answer; keeping the URLs we have", purpose, host)
        return request, None
    update = {name: value for name in REFRESHABLE if (value := getattr(fresh, name)) is not None}
    return request.model_copy(update=update), fresh


def send_callback(
    http: httpx.Client,
    request: GpuJobRequest,
    call_id: str,
    event: Literal["progress", "succeeded", "failed"],
    config: RunnerConfig,
    *,
    progress: GpuProgress | None = None,
    result: GpuResult | None = None,
    error: GpuError | None = None,
    attempt: int = 1,
) -> bool:
    """POST one signed callback; terminal events retry with backoff, progress is best-effort.
    `attempt`: which execution of the call sends it (a preempted input runs again: 2, 3, ...)."""
    callback = GpuCallback(
        job_id=request.job_id,
        call_id=call_id,
        event=event,
        sent_at=int(time.time()),
        attempt=attempt,
        progress=progress,
        result=result,
        error=error,
    )
    body = callback.model_dump_json().encode("utf-8")
    key = bytes.fromhex(request.callback_key)
    terminal = event != "progress"
    timeout = timeout_of(config, None if terminal else config.progress_timeout_s)

    def send() -> httpx.Response:
        # Signed per attempt so a late retry still carries a fresh timestamp.
        return pinned_send(
            http,
            "POST",
            request.callback_url,
            config,
            content=body,
            headers=signed_headers(key, body),
            timeout=timeout,
        )

    try:
        response = retrying(config.callback_attempts if terminal else 1, config, send)
    except UnsafeUrl as exc:
        log.warning("callback %s to %s refused: %s", event, host_of(request.callback_url), exc)
        return False
    except httpx.HTTPError as exc:
        log.warning("callback %s to %s failed: %s", event, host_of(request.callback_url), type(exc).__name__)
        return False
    if not 200 <= response.status_code < 300:
        log.warning("callback %s to %s: HTTP %s", event, host_of(request.callback_url), response.status_code)
        return False
    return True


class JobCancelled(Exception):
    """Raised from the step hook when the job's cancel event is set."""


class Progress:
    """The per-step hook: cancellation, the run's time limit, local progress and throttled
    progress callbacks (none when `http` is None: a run without a webhook)."""

    def __init__(
        self,
        http: httpx.Client | None,
        request: GpuJobRequest | None,
        call_id: str,
        config: RunnerConfig,
        cancel: threading.Event | None,
        on_progress: ProgressHook | None,
        started: float,
        limit_s: float | None,
        attempt: int = 1,
    ) -> None:
        self.http, self.request, self.call_id, self.config = http, request, call_id, config
        self.cancel, self.on_progress, self.started, self.limit_s = cancel, on_progress, started, limit_s
        self.attempt = attempt
        self.last_sent = float("-inf")

    def check(self) -> None:
        if self.cancel is not None and self.cancel.is_set():
            raise JobCancelled
        limit = self.limit_s
        if limit is not None and time.monotonic() - self.started > limit:
            raise fail("timeout", f"the job ran longer than its limit of {limit:.0f} s", True)

    def __call__(self, step: int, total: int) -> None:
        if self.on_progress is not None:
            self.on_progress(step, total)
        now = time.monotonic()
        # Every N steps, but at least a few times in short runs (2 local steps → "step 1/2").
        every = max(1, min(self.config.progress_every_steps, total // 4))
        due = step % every == 0 and step < total
        http, request = self.http, self.request
        due = due and now - self.last_sent >= self.config.progress_min_interval_s
        if due and http is not None and request is not None:
            self.last_sent = now
            progress = GpuProgress(step=step, total=total)
            send_callback(
                http, request, self.call_id, "progress", self.config, progress=progress, attempt=self.attempt
            )
        self.check()
