"""Host allow-lists for URLs the service fetches or passes on (`*.` wildcards)."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from urllib.parse import urlsplit

LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})


class UrlNotAllowed(ValueError):
    """A URL names a scheme or host the service must not use."""


def host_matches(host: str, patterns: Iterable[str]) -> bool:
    """`*.example.com` matches any subdomain (not the apex); other patterns match exactly."""
    host = host.lower().rstrip(".")
    for pattern in patterns:
        pattern = pattern.lower().rstrip(".")
        if pattern.startswith("*."):
            suffix = pattern[1:]
            if host.endswith(suffix) and len(host) > len(suffix):
                return True
        elif host == pattern:
            return True
    return False


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def check_fetch_url(url: str, allowed_hosts: Iterable[str], allow_http_loopback: bool = False) -> str:
    """Return the host if `url` may be fetched server-side, else raise `UrlNotAllowed`.

    https only and an allow-listed DNS name; the local stack may use http to loopback.
    """
    try:
        parts = urlsplit(url)
        host = (parts.hostname or "").lower()
        port = parts.port
    except ValueError:
        raise UrlNotAllowed("the URL is malformed") from None
    if parts.username is not None or parts.password is not None:
        raise UrlNotAllowed("URLs with credentials are not allowed")
    if not host:
        raise UrlNotAllowed("the URL has no host")
    if allow_http_loopback and host in LOOPBACK_HOSTS and parts.scheme in ("http", "https"):
        return host
    if parts.scheme != "https":
        raise UrlNotAllowed(f"only https:// URLs are allowed, not {parts.scheme or 'no scheme'}")
    if port not in (None, 443):
        raise UrlNotAllowed("only the default https port is allowed")
    # IP literals are never on a DNS allow-list; refusing them also blocks metadata endpoints.
    if _is_ip(host.strip("[]")) or not host_matches(host, allowed_hosts):
        raise UrlNotAllowed(f"the host {host} is not on the allow-list")
    return host


def check_service_url(url: str, allow_http_loopback: bool = False) -> None:
    """Backend endpoints (Modal, fal queue): https, or http to loopback for the local stack."""
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    if parts.scheme == "https" and host:
        return
    if allow_http_loopback and parts.scheme == "http" and host in LOOPBACK_HOSTS:
        return
    raise UrlNotAllowed(f"backend URL must be https: {parts.scheme}://{host}")
