"""One generation job end to end: download → check → generate → check → encode → upload → callback.

The Modal class and the local GPU server both call `run_job`. Everything the job touches over the
network comes from the request (presigned URLs, the callback URL and its per-job key), so URLs are
checked before use: https only, public addresses only (the GPU container must not become a way to
reach internal services or cloud metadata). Each request connects to the very address that was
checked (`pin_url`): the name is resolved once, and the HTTP client is handed the vetted IP with
the original name as Host header and TLS SNI (the certificate is still verified for the name), so
a rebinding DNS server cannot swap in a private address between the check and the connection.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

import httpx
import numpy as np
from pydantic import ValidationError
from vap_shared.budget import UPLOAD_MARGIN_S, Budget
from vap_shared.gpu_contract import (
    ErrorCode,
    GenerationSettings,
    GpuCallback,
    GpuError,
    GpuJobRequest,
    GpuProgress,
    GpuResult,
    UrlRefreshRequest,
    UrlRefreshResponse,
)
from vap_shared.signing import signed_headers

from gpu.service.engines.single import Engine
from gpu.service.generation import DEFAULT_STEPS, GenerationSpec, build_spec
from gpu.service.media import (
    MediaError,
    decode_sampled_frames,
    encode_mp4,
    fit_image,
    load_image,
    poster_jpeg,
    preview_webp,
)
from gpu.service.safety import SafetyClassifier, SafetyViolation, check_image, check_output

log = logging.getLogger(__name__)
# httpx logs every request's full URL at INFO; ours are presigned (the query is a credential for
# the object), so only warnings from it may reach the logs.
logging.getLogger("httpx").setLevel(logging.WARNING)

ALLOW_LOOPBACK_ENV = "VAP_ALLOW_HTTP_LOOPBACK"
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
MiB = 1024 * 1024

Resolver = Callable[[str, int], list[str]]
ProgressHook = Callable[[int, int], None]


def resolve_host(host: str, port: int) -> list[str]:
    """All addresses `host` resolves to, in the resolver's order of preference, without duplicates
    (every one must be public, not just the first; the first is the one connected to)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def _loopback_allowed_from_env() -> bool:
    return os.environ.get(ALLOW_LOOPBACK_ENV, "") == "1"


@dataclass
class RunnerConfig:
    max_video_bytes: int = 256 * MiB
    max_image_bytes: int = 32 * MiB
    connect_timeout_s: float = 10.0
    read_timeout_s: float = 60.0
    default_steps: int = DEFAULT_STEPS
    # Progress callbacks: every N steps, and never closer together than the interval.
    progress_every_steps: int = 5
    progress_min_interval_s: float = 2.0
    progress_timeout_s: float = 5.0
    callback_attempts: int = 5
    upload_attempts: int = 3
    backoff_s: float = 0.5  # doubled after each failed attempt
    # Fail with code "timeout" once the job has run this long (set below the platform's hard
    # timeout so the failure callback still goes out).
    job_timeout_s: float | None = None
    # The job budget (Modal): a run's limit is `budget.runner_limit_s(now, request.deadline_unix)`.
    # Without one, a request's `deadline_unix` still bounds the run (minus the upload margin).
    budget: Budget | None = None
    refresh_attempts: int = 2
    refresh_timeout_s: float = 10.0
    allow_http_loopback: bool = field(default_factory=_loopback_allowed_from_env)
    resolver: Resolver = resolve_host
    sleep: Callable[[float], None] = time.sleep

    def run_limit_s(self, now_unix: float, deadline_unix: int | None) -> float | None:
        """How long a job starting at `now_unix` may run (None: no limit)."""
        limits: list[float] = []
        if self.job_timeout_s is not None:
            limits.append(self.job_timeout_s)
        if self.budget is not None:
            limits.append(self.budget.runner_limit_s(now_unix, deadline_unix))
        elif deadline_unix is not None:
            limits.append(deadline_unix - now_unix - UPLOAD_MARGIN_S)
        return min(limits) if limits else None


class JobFailed(Exception):
    """The job failed; `error` is what the failure callback and the status endpoint report.
    `notify=False`: the service no longer wants this run, so no failure callback is sent."""

    def __init__(self, error: GpuError, notify: bool = True) -> None:
        super().__init__(f"{error.code}: {error.message}")
        self.error = error
        self.notify = notify


def _fail(code: ErrorCode, message: str, retryable: bool = False) -> JobFailed:
    return JobFailed(GpuError(code=code, message=message, retryable=retryable))


class JobCancelled(Exception):
    """Raised from the step hook when the job's cancel event is set."""


class UnsafeUrl(ValueError):
    """A URL the GPU side must not fetch from or send to."""


@dataclass(frozen=True)
class PinnedUrl:
    """Where a request really goes. For a checked DNS name: `url` names the vetted IP, `headers`
    carry the original `Host` and `extensions` the TLS SNI name (httpcore verifies the
    certificate for it). For IP literals and the local-stack loopback allowance: the URL as is."""

    url: str
    headers: dict[str, str] = field(default_factory=dict)
    extensions: dict[str, Any] = field(default_factory=dict)


def pin_url(url: str, config: RunnerConfig) -> PinnedUrl:
    """Raise `UnsafeUrl` unless `url` is https to public addresses (or allowed local http); return
    the request target pinned to the address that was checked (the name is resolved only here)."""
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    if not host:
        raise UnsafeUrl("URL has no host")
    if parts.username or parts.password:
        raise UnsafeUrl("URL must not carry credentials")
    if config.allow_http_loopback and host in LOOPBACK_HOSTS and parts.scheme in ("http", "https"):
        return PinnedUrl(url)  # the local stack: moto and the local webhook on 127.0.0.1
    if parts.scheme != "https":
        raise UnsafeUrl(f"only https URLs are allowed, got {parts.scheme or 'none'}://")
    try:
        port = parts.port or 443
    except ValueError as exc:
        raise UnsafeUrl("invalid port") from exc
    literal = _is_ip(host)
    try:
        addresses = [host] if literal else config.resolver(host, port)
    except OSError as exc:
        raise UnsafeUrl(f"cannot resolve {host}") from exc
    if not addresses:
        raise UnsafeUrl(f"{host} has no addresses")
    for address in addresses:
        if not _is_public(address):
            raise UnsafeUrl(f"{host} resolves to a non-public address")
    if literal:
        return PinnedUrl(url)
    address = addresses[0]
    netloc = f"[{address}]" if ":" in address else address
    if parts.port is not None:
        netloc += f":{parts.port}"
    return PinnedUrl(
        urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment)),
        # The Host a presigned URL was signed for (and virtual hosting needs), exactly as written.
        headers={"Host": parts.netloc},
        extensions={"sni_hostname": host},
    )


def check_url(url: str, config: RunnerConfig) -> None:
    """Raise `UnsafeUrl` unless `url` is https to public addresses (or allowed local http).
    (Fail-fast check at job start; each request pins its own checked address with `pin_url`.)"""
    pin_url(url, config)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _is_public(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])  # drop an IPv6 zone id
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    # is_global excludes private, loopback, link-local (cloud metadata), CGNAT, reserved, ...
    return ip.is_global and not ip.is_multicast


def _host(url: str) -> str:
    """For logs: presigned URLs carry credentials in the query, so only the host is logged."""
    return urlsplit(url).hostname or "?"


def _timeout(config: RunnerConfig, read: float | None = None) -> httpx.Timeout:
    return httpx.Timeout(
        connect=config.connect_timeout_s,
        read=read or config.read_timeout_s,
        write=config.read_timeout_s,
        pool=config.connect_timeout_s,
    )


def download(
    http: httpx.Client, url: str, what: str, max_bytes: int, config: RunnerConfig, *, service: bool = False
) -> bytes:
    """GET `url` streaming, refusing bodies over `max_bytes`; no redirects (they'd skip the URL
    check); connected to the address that was checked (`pin_url`), never to a fresh lookup.

    `service`: the URL is the service's own presigned URL (`GpuJobRequest.service_urls`), so a
    refusal (403 when it expired, 404, 400) is the service's problem — `internal`, retryable —
    never the user's `input` error."""
    try:
        target = pin_url(url, config)
    except UnsafeUrl as exc:
        raise _fail("internal" if service else "input", f"the {what} URL was refused: {exc}") from exc
    try:
        with http.stream(
            "GET",
            target.url,
            headers=target.headers,
            extensions=target.extensions,
            timeout=_timeout(config),
            follow_redirects=False,
        ) as response:
            if response.status_code != 200:
                status = response.status_code
                if service and status < 500 and status != 429:
                    raise _fail(
                        "internal",
                        f"the service's presigned URL for the {what} was refused (HTTP {status}: expired "
                        "or revoked); this is not a problem with the request",
                        True,
                    )
                retryable = status >= 500 or status == 429
                code: ErrorCode = "internal" if retryable else "input"
                raise _fail(code, f"cannot download the {what}: HTTP {status}", retryable)
            declared = response.headers.get("content-length")
            if declared and declared.isdigit() and int(declared) > max_bytes:
                raise _fail("input", f"the {what} is larger than {max_bytes} bytes")
            chunks: list[bytes] = []
            total = 0
            for chunk in response.iter_bytes(1 * MiB):
                total += len(chunk)
                if total > max_bytes:
                    raise _fail("input", f"the {what} is larger than {max_bytes} bytes")
                chunks.append(chunk)
    except httpx.HTTPError as exc:
        raise _fail("internal", f"cannot download the {what}: {type(exc).__name__}", True) from exc
    if total == 0:
        raise _fail("input", f"the {what} is empty")
    return b"".join(chunks)


def _retrying(attempts: int, config: RunnerConfig, send: Callable[[], httpx.Response]) -> httpx.Response:
    """Call `send` until it answers below 500 (and not 429), backing off on errors and 5xx."""
    delay = config.backoff_s
    for attempt in range(1, attempts + 1):
        try:
            response = send()
            if response.status_code < 500 and response.status_code != 429:
                return response
            if attempt == attempts:
                return response
        except httpx.TransportError:
            if attempt == attempts:
                raise
        config.sleep(delay)
        delay *= 2
    raise AssertionError("unreachable")


def _pinned_send(
    http: httpx.Client,
    method: str,
    url: str,
    config: RunnerConfig,
    *,
    content: bytes,
    headers: dict[str, str],
    timeout: httpx.Timeout,
) -> httpx.Response:
    """One request to the address `pin_url` checked (resolved again per attempt, checked again)."""
    target = pin_url(url, config)
    return http.request(
        method,
        target.url,
        content=content,
        headers={**headers, **target.headers},
        extensions=target.extensions,
        timeout=timeout,
        follow_redirects=False,
    )


def upload(
    http: httpx.Client,
    url: str,
    data: bytes,
    config: RunnerConfig,
    *,
    content_type: str = "video/mp4",
    what: str = "video",
    service: bool = True,
) -> None:
    """PUT `data` (3 attempts on network errors/5xx). Every upload URL is the service's presigned
    PUT, so a 4xx (an expired URL) is retryable too: a new attempt gets fresh URLs."""

    def send() -> httpx.Response:
        headers = {"Content-Type": content_type}
        return _pinned_send(http, "PUT", url, config, content=data, headers=headers, timeout=_timeout(config))

    try:
        response = _retrying(config.upload_attempts, config, send)
    except UnsafeUrl as exc:
        raise _fail("internal" if service else "input", f"the {what} upload URL was refused: {exc}") from exc
    except httpx.HTTPError as exc:
        raise _fail("internal", f"cannot upload the {what}: {type(exc).__name__}", True) from exc
    if not 200 <= response.status_code < 300:
        retryable = service or response.status_code >= 500
        raise _fail("internal", f"cannot upload the {what}: HTTP {response.status_code}", retryable)


# URL fields a refresh may replace (`UrlRefreshResponse`: None keeps the request's URL).
REFRESHABLE = ("video_url", "image_url", "output_put_url", "poster_put_url", "preview_put_url")


def refresh_urls(
    http: httpx.Client,
    request: GpuJobRequest,
    call_id: str,
    purpose: Literal["start", "upload"],
    config: RunnerConfig,
) -> GpuJobRequest:
    """Ask `request.refresh_url` for fresh presigned URLs (signed like callbacks) and return the
    request with them. Unreachable or unusable answers keep the URLs we have; 409 means the
    service no longer wants this run: raise `JobFailed` (cancelled, "superseded", no callback)."""
    if not request.refresh_url:
        return request
    body = (
        UrlRefreshRequest(job_id=request.job_id, call_id=call_id, purpose=purpose, sent_at=int(time.time()))
        .model_dump_json()
        .encode("utf-8")
    )
    key = bytes.fromhex(request.callback_key)
    timeout = _timeout(config, config.refresh_timeout_s)

    def send() -> httpx.Response:
        return _pinned_send(
            http, "POST", request.refresh_url or "", config, content=body, headers=signed_headers(key, body),
            timeout=timeout,
        )  # fmt: skip

    host = _host(request.refresh_url)
    try:
        response = _retrying(config.refresh_attempts, config, send)
    except (UnsafeUrl, httpx.HTTPError) as exc:
        why = str(exc) if isinstance(exc, UnsafeUrl) else type(exc).__name__
        log.warning("URL refresh (%s) at %s failed: %s; keeping the URLs we have", purpose, host, why)
        return request
    if response.status_code == 409:
        raise JobFailed(GpuError(code="cancelled", message="superseded"), notify=False)
    if response.status_code != 200:
        status = response.status_code
        log.warning("URL refresh (%s) at %s: HTTP %s; keeping the URLs we have", purpose, host, status)
        return request
    try:
        fresh = UrlRefreshResponse.model_validate_json(response.content)
    except ValidationError:
        log.warning("URL refresh (%s) at %s: unreadable answer; keeping the URLs we have", purpose, host)
        return request
    update = {name: value for name in REFRESHABLE if (value := getattr(fresh, name)) is not None}
    return request.model_copy(update=update)


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
) -> bool:
    """POST one signed callback; terminal events retry with backoff, progress is best-effort."""
    callback = GpuCallback(
        job_id=request.job_id,
        call_id=call_id,
        event=event,
        sent_at=int(time.time()),
        progress=progress,
        result=result,
        error=error,
    )
    body = callback.model_dump_json().encode("utf-8")
    key = bytes.fromhex(request.callback_key)
    terminal = event != "progress"
    timeout = _timeout(config, None if terminal else config.progress_timeout_s)

    def send() -> httpx.Response:
        # Signed per attempt so a late retry still carries a fresh timestamp.
        return _pinned_send(
            http,
            "POST",
            request.callback_url,
            config,
            content=body,
            headers=signed_headers(key, body),
            timeout=timeout,
        )

    try:
        response = _retrying(config.callback_attempts if terminal else 1, config, send)
    except UnsafeUrl as exc:
        log.warning("callback %s to %s refused: %s", event, _host(request.callback_url), exc)
        return False
    except httpx.HTTPError as exc:
        log.warning("callback %s to %s failed: %s", event, _host(request.callback_url), type(exc).__name__)
        return False
    if not 200 <= response.status_code < 300:
        log.warning("callback %s to %s: HTTP %s", event, _host(request.callback_url), response.status_code)
        return False
    return True


class _Progress:
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
    ) -> None:
        self.http, self.request, self.call_id, self.config = http, request, call_id, config
        self.cancel, self.on_progress, self.started, self.limit_s = cancel, on_progress, started, limit_s
        self.last_sent = float("-inf")

    def check(self) -> None:
        if self.cancel is not None and self.cancel.is_set():
            raise JobCancelled
        limit = self.limit_s
        if limit is not None and time.monotonic() - self.started > limit:
            raise _fail("timeout", f"the job ran longer than its limit of {limit:.0f} s", True)

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
            send_callback(http, request, self.call_id, "progress", self.config, progress=progress)
        self.check()


@dataclass
class Outputs:
    """What one generation produced, ready to upload (or to hand back, `gpu.service.modal_app`'s trial)."""

    video: bytes
    poster: bytes | None
    preview: bytes | None
    timings: dict[str, float]


def _previews(frames: np.ndarray, fps: int, poster: bool, preview: bool) -> tuple[bytes | None, bytes | None]:
    return (poster_jpeg(frames) if poster else None, preview_webp(frames, fps) if preview else None)


def produce(
    spec: GenerationSpec,
    image_bytes: bytes,
    video_bytes: bytes,
    engine: Engine,
    safety: SafetyClassifier | None,
    hook: _Progress,
    *,
    poster: bool = False,
    preview: bool = False,
) -> Outputs:
    """Decode → safety-check the image → generate → safety-check the frames → encode the MP4, and
    (asked for) the poster and animated preview from the same frames while ffmpeg encodes."""
    mark = time.monotonic()
    try:
        image = fit_image(load_image(image_bytes), spec.width, spec.height)
        ref_frames = decode_sampled_frames(video_bytes, spec.num_frames, spec.width, spec.height)
    except MediaError as exc:
        raise _fail("input", str(exc)) from exc
    timings = {"decode_s": time.monotonic() - mark}

    mark = time.monotonic()
    if spec.safety and safety is not None:
        check_image(safety, image)
    safety_s = time.monotonic() - mark
    hook.check()

    mark = time.monotonic()
    frames = engine.generate(spec, image, ref_frames, hook)
    timings["generate_s"] = time.monotonic() - mark
    _check_frames(frames, spec)

    mark = time.monotonic()
    if spec.safety and safety is not None:
        check_output(safety, frames)
    timings["safety_s"] = safety_s + time.monotonic() - mark
    hook.check()

    mark = time.monotonic()
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="vap-preview") as pool:
        # ffmpeg encodes in its own process; PIL's encoders release the GIL: both run at once.
        pending = None
        if poster or preview:
            pending = pool.submit(_timed, _previews, frames, spec.fps, poster, preview)
        video = encode_mp4(frames, spec.fps)
        timings["encode_s"] = time.monotonic() - mark
        poster_data, preview_data = None, None
        if pending is not None:
            (poster_data, preview_data), timings["preview_s"] = pending.result()
    return Outputs(video, poster_data, preview_data, timings)


def _timed(fn: Callable[..., Any], *args: Any) -> tuple[Any, float]:
    mark = time.monotonic()
    return fn(*args), time.monotonic() - mark


def run_job(
    request: GpuJobRequest,
    engine: Engine,
    http: httpx.Client,
    *,
    call_id: str = "local",
    config: RunnerConfig | None = None,
    safety: SafetyClassifier | None = None,
    cancel: threading.Event | None = None,
    on_progress: ProgressHook | None = None,
) -> GpuResult:
    """Run one job and POST its signed callbacks. Returns the result or raises `JobFailed`.

    The failure callback is sent before `JobFailed` propagates (not when the service answered a
    URL refresh with 409: it no longer wants this run); on a safety failure nothing is uploaded.
    """
    config = config or RunnerConfig()
    started = time.monotonic()
    try:
        check_url(request.callback_url, config)
    except UnsafeUrl as exc:
        # Nowhere safe to report to: fail without a callback.
        raise _fail("input", f"callback_url refused: {exc}") from exc
    try:
        result = _run(request, engine, http, call_id, config, safety, cancel, on_progress, started)
    except JobFailed as exc:
        failure = exc
    except JobCancelled:
        failure = _fail("cancelled", "the job was cancelled")
    except SafetyViolation as exc:
        failure = _fail("safety", str(exc))
    except Exception as exc:  # anything else is our bug or the GPU's: report it, don't hang the job
        log.exception("job %s failed", request.job_id)
        failure = _fail("internal", f"internal error: {type(exc).__name__}: {str(exc)[:300]}", True)
    else:
        send_callback(http, request, call_id, "succeeded", config, result=result)
        return result
    if failure.notify:
        send_callback(http, request, call_id, "failed", config, error=failure.error)
    raise failure


def _run(
    request: GpuJobRequest,
    engine: Engine,
    http: httpx.Client,
    call_id: str,
    config: RunnerConfig,
    safety: SafetyClassifier | None,
    cancel: threading.Event | None,
    on_progress: ProgressHook | None,
    started: float,
) -> GpuResult:
    # The limit counts from now (after Modal's queue and cold start): what is left of the run's
    # allowance and of the job's deadline. A job that starts too late never downloads anything.
    limit_s = config.run_limit_s(time.time(), request.deadline_unix)
    if limit_s is not None and limit_s <= 0:
        raise _fail("timeout", "the job started too late to finish before its deadline", True)
    request = refresh_urls(http, request, call_id, "start", config)
    service = set(request.service_urls)
    for name in ("video_url", "image_url", "output_put_url"):
        try:
            check_url(getattr(request, name), config)
        except UnsafeUrl as exc:
            raise _fail("internal" if name in service else "input", f"{name} refused: {exc}") from exc
    try:
        spec = build_spec(request.settings, request.num_inference_steps, config.default_steps)
    except ValueError as exc:
        raise _fail("input", str(exc)) from exc
    if spec.safety and safety is None:
        raise _fail("internal", "the safety checker is enabled but not loaded on this server")
    hook = _Progress(http, request, call_id, config, cancel, on_progress, started, limit_s)
    hook.check()

    mark = time.monotonic()
    image_bytes = download(
        http, request.image_url, "image", config.max_image_bytes, config, service="image_url" in service
    )
    video_bytes = download(
        http, request.video_url, "reference video", config.max_video_bytes, config,
        service="video_url" in service,
    )  # fmt: skip
    download_s = time.monotonic() - mark

    outputs = produce(
        spec, image_bytes, video_bytes, engine, safety, hook,
        poster=request.poster_put_url is not None, preview=request.preview_put_url is not None,
    )  # fmt: skip
    timings = {"download_s": download_s, **outputs.timings}

    # Presigned PUTs may have expired while the job queued and ran: fresh ones first.
    request = refresh_urls(http, request, call_id, "upload", config)
    mark = time.monotonic()
    upload(http, request.output_put_url, outputs.video, config)
    timings["upload_s"] = time.monotonic() - mark
    sizes = _upload_previews(http, request, outputs, config, timings)
    timings["total_s"] = time.monotonic() - started
    return _result(spec, engine, len(outputs.video), timings, sizes.get("poster"), sizes.get("preview"))


def _result(
    spec: GenerationSpec,
    engine: Engine,
    video_bytes: int,
    timings: dict[str, float],
    poster_bytes: int | None,
    preview_bytes: int | None,
) -> GpuResult:
    return GpuResult(
        seed=spec.seed,
        width=spec.width,
        height=spec.height,
        num_frames=spec.num_frames,
        fps=spec.fps,
        bytes=video_bytes,
        steps=spec.steps,
        gpu=engine.device_name,
        timings={k: round(v, 3) for k, v in timings.items()},
        poster_bytes=poster_bytes,
        preview_bytes=preview_bytes,
    )


def run_bytes(
    settings: GenerationSettings,
    image_bytes: bytes,
    video_bytes: bytes,
    engine: Engine,
    *,
    steps: int | None = None,
    config: RunnerConfig | None = None,
    safety: SafetyClassifier | None = None,
) -> tuple[GpuResult, Outputs]:
    """One generation from media bytes, nothing sent anywhere (`modal run gpu/service/modal_app.py`'s
    trial): the MP4, poster and preview come back to the caller. Raises `JobFailed`."""
    config = config or RunnerConfig()
    started = time.monotonic()
    try:
        spec = build_spec(settings, steps, config.default_steps)
    except ValueError as exc:
        raise _fail("input", str(exc)) from exc
    if spec.safety and safety is None:
        raise _fail("internal", "the safety checker is enabled but not loaded on this server")
    hook = _Progress(None, None, "trial", config, None, None, started, config.run_limit_s(time.time(), None))
    try:
        outputs = produce(spec, image_bytes, video_bytes, engine, safety, hook, poster=True, preview=True)
    except SafetyViolation as exc:
        raise _fail("safety", str(exc)) from exc
    outputs.timings["total_s"] = time.monotonic() - started
    result = _result(
        spec,
        engine,
        len(outputs.video),
        outputs.timings,
        len(outputs.poster) if outputs.poster is not None else None,
        len(outputs.preview) if outputs.preview is not None else None,
    )
    return result, outputs


def _upload_previews(
    http: httpx.Client,
    request: GpuJobRequest,
    outputs: Outputs,
    config: RunnerConfig,
    timings: dict[str, float],
) -> dict[str, int]:
    """Upload the poster and the preview; they are extras: a failed upload is logged, reported
    as missing (no size), and never fails the job whose video is already stored."""
    sizes: dict[str, int] = {}
    mark = time.monotonic()
    for name, url, data, content_type in (
        ("poster", request.poster_put_url, outputs.poster, "image/jpeg"),
        ("preview", request.preview_put_url, outputs.preview, "image/webp"),
    ):
        if url is None or data is None:
            continue
        try:
            upload(http, url, data, config, content_type=content_type, what=name)
        except JobFailed as exc:
            log.warning("job %s: %s not stored: %s", request.job_id, name, exc.error.message)
            continue
        sizes[name] = len(data)
    if sizes:
        timings["preview_upload_s"] = time.monotonic() - mark
    return sizes


def _check_frames(frames: np.ndarray, spec: GenerationSpec) -> None:
    expected = (spec.num_frames, spec.height, spec.width, 3)
    if frames.dtype != np.uint8 or frames.shape != expected:
        raise RuntimeError(f"engine returned {frames.dtype} {frames.shape}, expected uint8 {expected}")
