"""The run's network I/O: URL checks, downloads and uploads to the addresses that were checked.

Everything a job touches over the network comes from the request (presigned URLs, the callback
URL), so URLs are checked before use: https only, public addresses only (the GPU container must
not become a way to reach internal services or cloud metadata). Each request connects to the very
address that was checked (`pin_url`): the name is resolved once, and the HTTP client is handed the
vetted IP with the original name as Host header and TLS SNI (the certificate is still verified
for the name), so a rebinding DNS server cannot swap in a private address between the check and
the connection.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
from vap_shared.gpu_contract import ErrorCode

from gpu.service.runner.config import MiB, RunnerConfig, fail

# httpx logs every request's full URL at INFO; ours are presigned (the query is a credential for
# the object), so only warnings from it may reach the logs.
logging.getLogger("httpx").setLevel(logging.WARNING)
log = logging.getLogger(__name__)

LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})


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


def host_of(url: str) -> str:
    """For logs: presigned URLs carry credentials in the query, so only the host is logged."""
    return urlsplit(url).hostname or "?"


def timeout_of(config: RunnerConfig, read: float | None = None) -> httpx.Timeout:
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
        raise fail("internal" if service else "input", f"the {what} URL was refused: {exc}") from exc
    try:
        with http.stream(
            "GET",
            target.url,
            headers=target.headers,
            extensions=target.extensions,
            timeout=timeout_of(config),
            follow_redirects=False,
        ) as response:
            if response.status_code != 200:
                status = response.status_code
                if service and status < 500 and status != 429:
                    raise fail(
                        "internal",
                        f"the service's presigned URL for the {what} was refused (HTTP {status}: expired "
                        "or revoked); this is not a problem with the request",
                        True,
                    )
                retryable = status >= 500 or status == 429
                code: ErrorCode = "internal" if retryable else "input"
                raise fail(code, f"cannot download the {what}: HTTP {status}", retryable)
            declared = response.headers.get("content-length")
            if declared and declared.isdigit() and int(declared) > max_bytes:
                raise fail("input", f"the {what} is larger than {max_bytes} bytes")
            chunks: list[bytes] = []
            total = 0
            for chunk in response.iter_bytes(1 * MiB):
                total += len(chunk)
                if total > max_bytes:
                    raise fail("input", f"the {what} is larger than {max_bytes} bytes")
                chunks.append(chunk)
    except httpx.HTTPError as exc:
        raise fail("internal", f"cannot download the {what}: {type(exc).__name__}", True) from exc
    if total == 0:
        raise fail("input", f"the {what} is empty")
    return b"".join(chunks)


def fetch_optional(
    http: httpx.Client, url: str, what: str, max_bytes: int, config: RunnerConfig
) -> bytes | None:
    """GET an object that may not exist (the service's presigned URL, pinned like `download`):
    its bytes, or None when it is absent (404) or cannot be had (anything else, logged)."""
    try:
        target = pin_url(url, config)
        with http.stream(
            "GET",
            target.url,
            headers=target.headers,
            extensions=target.extensions,
            timeout=timeout_of(config),
            follow_redirects=False,
        ) as response:
            if response.status_code != 200:
                if response.status_code != 404:
                    log.warning("%s at %s: HTTP %s; going without", what, host_of(url), response.status_code)
                return None
            chunks: list[bytes] = []
            total = 0
            for chunk in response.iter_bytes(1 * MiB):
                total += len(chunk)
                if total > max_bytes:
                    log.warning("%s at %s: over %d bytes; going without", what, host_of(url), max_bytes)
                    return None
                chunks.append(chunk)
    except (UnsafeUrl, httpx.HTTPError) as exc:
        log.warning("%s at %s: %s; going without", what, host_of(url), type(exc).__name__)
        return None
    return b"".join(chunks)


def retrying(attempts: int, config: RunnerConfig, send: Callable[[], httpx.Response]) -> httpx.Response:
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


def pinned_send(
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
        timeout = timeout_of(config)
        return pinned_send(http, "PUT", url, config, content=data, headers=headers, timeout=timeout)

    try:
        response = retrying(config.upload_attempts, config, send)
    except UnsafeUrl as exc:
        raise fail("internal" if service else "input", f"the {what} upload URL was refused: {exc}") from exc
    except httpx.HTTPError as exc:
        raise fail("internal", f"cannot upload the {what}: {type(exc).__name__}", True) from exc
    if not 200 <= response.status_code < 300:
        retryable = service or response.status_code >= 500
        raise fail("internal", f"cannot upload the {what}: HTTP {response.status_code}", retryable)
