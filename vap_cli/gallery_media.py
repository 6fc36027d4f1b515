"""`vap gallery`, media: presigned GET links (valid `--expires`, within what the credentials allow),
or with `--download` files saved beside the page.

Outputs (`outputs/…`) are readable with the permissions `vap get` needs. Inputs live where the job
read them: `inbox/…` (the user's uploads) and `work/<job_id>/input-*` (decoded `data:` media,
expired after the stack's `WorkRetentionDays`); reading them needs `s3:GetObject` there too. Each
input is checked (HEAD) before it is linked, so a card says why an input is missing instead of
showing a broken player.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

import httpx
from botocore.exceptions import ClientError
from vap_shared.s3io import presign_get

from .config import StackInfo
from .gallery_jobs import MediaSource

# SigV4 presigned URLs live at most 7 days, whatever the credentials.
SIGV4_MAX_S = 7 * 24 * 3600
# https inputs saved with --download: the service's own cap on input media (MAX_INPUT_BYTES).
MAX_URL_BYTES = 1024**3
URL_TIMEOUT = httpx.Timeout(60.0, connect=10.0)
LINKERS = 8
MEDIA_DIR = "media"


@dataclass(frozen=True)
class Lifetime:
    seconds: int
    expires_at: datetime
    limited_by: str | None = None  # why it is shorter than asked, if it is


def credentials_expiry(session: Any) -> datetime | None:
    """When the session's current credentials stop working: temporary ones (SSO, an assumed role,
    an instance profile) expire, long-lived access keys do not (None). A URL presigned with them
    is refused once they expire, whatever its X-Amz-Expires."""
    credentials = session.get_credentials()
    if credentials is None:
        return None
    credentials.get_frozen_credentials()  # refreshable credentials load (and learn their expiry) here
    expiry = getattr(credentials, "_expiry_time", None)  # botocore's RefreshableCredentials
    if not isinstance(expiry, datetime):
        return None
    return expiry if expiry.tzinfo else expiry.replace(tzinfo=UTC)


def link_lifetime(requested_s: int, session: Any, now: datetime | None = None) -> Lifetime:
    """`requested_s`, capped by SigV4's 7 days and by the credentials' own expiry."""
    now = now or datetime.now(UTC)
    seconds, limited_by = requested_s, None
    if seconds > SIGV4_MAX_S:
        seconds, limited_by = SIGV4_MAX_S, "SigV4's 7-day maximum for presigned URLs"
    expiry = credentials_expiry(session)
    if expiry is not None and (expiry - now).total_seconds() < seconds:
        seconds = max(int((expiry - now).total_seconds()), 0)
        limited_by = f"your AWS credentials, which expire at {expiry:%Y-%m-%d %H:%M} UTC"
    return Lifetime(seconds, now + timedelta(seconds=seconds), limited_by)


@dataclass(frozen=True)
class Link:
    """What a page element points at (a URL or a path relative to the page), or why nothing."""

    href: str | None
    problem: str | None = None


class Linker(Protocol):
    def link(self, source: MediaSource) -> Link: ...


def _code(exc: ClientError) -> str:
    error = str(exc.response.get("Error", {}).get("Code", ""))
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    if error in ("404", "NoSuchKey", "NotFound") or status == 404:
        return "missing"
    if error in ("403", "AccessDenied", "Forbidden") or status == 403:
        return "denied"
    return error or str(status)


def _problem(stack: StackInfo, source: MediaSource, code: str) -> str:
    folder = source.key.split("/", 1)[0] + "/"
    if code == "denied":
        return (
            f"{source.ref} is not readable with your AWS credentials "
            f"(the gallery shows inputs only with s3:GetObject on {folder}*)"
        )
    if code == "missing":
        if source.key.startswith("work/"):
            return f"{source.ref} is no longer stored (work/ expires after the stack's WorkRetentionDays)"
        return f"{source.ref} is no longer in the bucket"
    return f"{source.ref} could not be read ({code})"


def _foreign(stack: StackInfo, source: MediaSource) -> Link | None:
    if source.kind == "s3" and source.bucket != stack.bucket:
        return Link(None, f"{source.ref} is not in the stack's bucket {stack.bucket}")
    return None


class PresignedLinks:
    """Presigned GETs of the stack's objects; users' https URLs as they are."""

    def __init__(self, stack: StackInfo, lifetime: Lifetime) -> None:
        self.stack, self.lifetime = stack, lifetime

    def link(self, source: MediaSource) -> Link:
        if source.kind == "https":
            return Link(source.url)
        foreign = _foreign(self.stack, source)
        if foreign is not None:
            return foreign
        s3 = self.stack.client("s3")
        if not source.key.startswith(self.stack.outputs_prefix):
            try:
                s3.head_object(Bucket=source.bucket, Key=source.key)
            except ClientError as exc:
                return Link(None, _problem(self.stack, source, _code(exc)))
        return Link(presign_get(s3, source.bucket, source.key, self.lifetime.seconds))


def file_name(source: MediaSource) -> str:
    """A flat, unique, readable name: `<8 hex of the reference>-<its last path segment>`."""
    leaf = source.key if source.kind == "s3" else httpx.URL(source.url).path
    leaf = re.sub(r"[^A-Za-z0-9._-]+", "_", leaf.rsplit("/", 1)[-1])[-80:] or "media"
    return f"{hashlib.sha256(source.ref.encode()).hexdigest()[:8]}-{leaf}"


class DownloadedLinks:
    """Files saved under `<page folder>/media/`, linked relative to the page (the folder can be
    zipped and opened anywhere)."""

    def __init__(self, stack: StackInfo, page_folder: Path, client: httpx.Client | None = None) -> None:
        self.stack, self.folder = stack, page_folder / MEDIA_DIR
        self.http = client or httpx.Client(timeout=URL_TIMEOUT, follow_redirects=True, max_redirects=3)

    def link(self, source: MediaSource) -> Link:
        foreign = _foreign(self.stack, source)
        if foreign is not None:
            return foreign
        self.folder.mkdir(parents=True, exist_ok=True)
        name = file_name(source)
        target = self.folder / name
        href = f"{MEDIA_DIR}/{name}"
        if source.kind == "https":
            try:
                self._fetch(source.url, target)
            except (httpx.HTTPError, ValueError) as exc:
                return Link(source.url, f"{source.url} could not be saved ({exc}); the page links it instead")
            return Link(href)
        try:
            self.stack.client("s3").download_file(source.bucket, source.key, str(target))
        except ClientError as exc:
            return Link(None, _problem(self.stack, source, _code(exc)))
        return Link(href)

    def _fetch(self, url: str, target: Path) -> None:
        if not url.startswith("https://"):
            raise ValueError("only https URLs are fetched")
        partial = target.with_name(target.name + ".part")
        size = 0
        try:
            with self.http.stream("GET", url) as response, partial.open("wb") as out:
                response.raise_for_status()
                for chunk in response.iter_bytes(1 << 20):
                    size += len(chunk)
                    if size > MAX_URL_BYTES:
                        raise ValueError(f"larger than {MAX_URL_BYTES // 1024**2} MiB")
                    out.write(chunk)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        partial.replace(target)


def link_all(
    linker: Linker, sources: Iterable[MediaSource], on_done: Callable[[int, int], None] | None = None
) -> dict[MediaSource, Link]:
    """Each distinct source linked once (re-runs share their inputs), in parallel."""
    unique = list(dict.fromkeys(sources))
    links: dict[MediaSource, Link] = {}
    with ThreadPoolExecutor(LINKERS) as pool:
        for source, link in zip(unique, pool.map(linker.link, unique), strict=True):
            links[source] = link
            if on_done:
                on_done(len(links), len(unique))
    return links
