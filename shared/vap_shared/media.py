"""Resolving a sidecar's `video_url` / `image_url` to something a backend can fetch."""

from __future__ import annotations

import base64
import binascii
import posixpath
import re
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import unquote_to_bytes, urlsplit

from .errors import FieldError, field_error
from .sidecar import MEDIA_ALLOWED
from .urls import host_matches

MediaKind = Literal["s3", "https", "data"]
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*):")
_DATA = re.compile(r"^data:([\w.+-]+/[\w.+-]+)?((?:;[\w.+-]+=[\w.+-]+)*)(;base64)?,(.*)$", re.DOTALL)
_EXT = {
    "video/mp4": ".mp4",
    "video/quicktime": ".mov",
    "video/webm": ".webm",
    "image/jpeg": ".jpg",
    "image/png": ".png",
    "image/webp": ".webp",
    "image/gif": ".gif",
}


@dataclass(frozen=True)
class MediaRef:
    """A resolved media reference. `data` media are stored to S3 (bucket/key) before dispatch."""

    field: str
    kind: MediaKind
    original: str
    bucket: str | None = None
    key: str | None = None
    url: str | None = None
    data: bytes | None = None
    content_type: str | None = None

    def with_location(self, bucket: str, key: str) -> MediaRef:
        return MediaRef(self.field, "s3", self.original, bucket, key, None, None, self.content_type)

    def to_record(self) -> dict[str, Any]:
        """What the job record keeps (never the data bytes)."""
        if self.kind == "https":
            return {"kind": "https", "url": self.url}
        return {"kind": "s3", "bucket": self.bucket, "key": self.key}

    @classmethod
    def from_record(cls, field: str, record: dict[str, Any]) -> MediaRef:
        if record.get("kind") == "https":
            return cls(field, "https", str(record["url"]), url=str(record["url"]))
        return cls(field, "s3", "", bucket=str(record["bucket"]), key=str(record["key"]))


def _bad(field: str, what: str) -> FieldError:
    return field_error(field, f"`{field}` {what}; it must be {MEDIA_ALLOWED}.")


def _check_key(field: str, key: str) -> FieldError | None:
    parts = key.split("/")
    if any(p == ".." for p in parts):
        return _bad(field, f"contains '..' ({key!r}), which is not allowed")
    if any(p == "" for p in parts):
        return _bad(field, f"is not a valid key ({key!r} has an empty path segment)")
    return None


def resolve_reference(
    field: str,
    value: str,
    *,
    sidecar_key: str,
    bucket: str,
    allowed_hosts: tuple[str, ...],
    max_data_bytes: int,
    inbox_prefix: str = "inbox/",
) -> MediaRef | FieldError:
    """Classify one reference without network calls; a `FieldError` when it is not acceptable."""
    match = _SCHEME.match(value)
    scheme = match.group(1).lower() if match else ""
    if scheme == "data":
        return _data_uri(field, value, max_data_bytes)
    if scheme == "s3":
        parts = urlsplit(value)
        key = parts.path.lstrip("/")
        if parts.netloc != bucket:
            return _bad(
                field, f"names the bucket {parts.netloc!r}; only this job's bucket {bucket!r} is allowed"
            )
        if not key or parts.query or parts.fragment:
            return _bad(field, f"is not a complete s3://{bucket}/<key> URI")
        problem = _check_key(field, key)
        if problem:
            return problem
        # Only the upload area: the functions may not read other prefixes (least privilege).
        if not key.startswith(inbox_prefix):
            return _bad(field, f"names the key {key!r} outside {inbox_prefix}")
        return MediaRef(field, "s3", value, bucket=bucket, key=key)
    if scheme == "https":
        try:
            parts = urlsplit(value)
            host = (parts.hostname or "").lower()
            port = parts.port
        except ValueError:
            return _bad(field, "is not a valid https URL")
        if parts.username is not None or parts.password is not None:
            return _bad(field, "contains credentials in the URL")
        if not host or port not in (None, 443):
            return _bad(field, "is not a valid https URL on the default port")
        if not host_matches(host, allowed_hosts):
            hosts = ", ".join(allowed_hosts) or "none configured"
            return field_error(
                field,
                f"`{field}` points at the host {host}, which is not allowed; allowed https hosts: {hosts}. "
                "Upload the file next to the sidecar and use its name instead.",
            )
        return MediaRef(field, "https", value, url=value)
    if scheme:
        return _bad(field, f"uses the {scheme}: scheme, which is not allowed")
    if value.startswith("/"):
        return _bad(field, f"is an absolute path ({value!r}); use a key relative to the sidecar's folder")
    if "\\" in value:
        return _bad(field, f"contains a backslash ({value!r}); use '/' between folders")
    problem = _check_key(field, value)
    if problem:
        return problem
    folder = posixpath.dirname(sidecar_key)
    key = posixpath.normpath(posixpath.join(folder, value)) if folder else posixpath.normpath(value)
    return MediaRef(field, "s3", value, bucket=bucket, key=key)


def _data_uri(field: str, value: str, max_bytes: int) -> MediaRef | FieldError:
    # A base64 body of n bytes decodes to ~3n/4; refusing early avoids decoding huge strings.
    if len(value) > max_bytes * 4 // 3 + 256:
        return field_error(
            field,
            f"`{field}` is a data: URI of more than {max_bytes:,} bytes; at most {max_bytes:,} bytes "
            "are allowed. Upload the file instead.",
        )
    match = _DATA.match(value)
    if not match:
        return _bad(field, "is a malformed data: URI")
    mime = (match.group(1) or "").lower()
    is_base64 = bool(match.group(3))
    payload = match.group(4)
    wanted = "video/" if field == "video_url" else "image/"
    if not mime.startswith(wanted):
        return field_error(
            field,
            f"`{field}` is a data: URI of type {mime or 'unspecified'!r}; it must be a {wanted}* type "
            f"(e.g. data:{wanted}{'mp4' if wanted == 'video/' else 'png'};base64,...).",
        )
    try:
        data = base64.b64decode(payload, validate=True) if is_base64 else unquote_to_bytes(payload)
    except (binascii.Error, ValueError):
        return field_error(field, f"`{field}` is a data: URI whose base64 content is not valid.")
    if not data:
        return field_error(field, f"`{field}` is a data: URI with no content.")
    if len(data) > max_bytes:
        return field_error(
            field,
            f"`{field}` is a data: URI of {len(data):,} bytes; at most {max_bytes:,} bytes are allowed. "
            "Upload the file instead.",
        )
    problem = sniff(field, data[:64])
    if problem:
        return field_error(field, problem.replace("the file", "the data: URI's content"))
    return MediaRef(field, "data", value[:64], data=data, content_type=mime)


def data_extension(content_type: str | None) -> str:
    return _EXT.get(content_type or "", ".bin")


_VIDEO_KINDS = "MP4/MOV, WebM/MKV, AVI, MPEG-TS/PS, FLV or GIF"
_IMAGE_KINDS = "PNG, JPEG, WebP, GIF, BMP, TIFF or AVIF/HEIF"


def sniff(field: str, head: bytes) -> str | None:
    """A coarse container check of the first bytes; the message when they are clearly not media
    of the right kind (an HTML error page, a text file, a video given as the image...)."""
    box = head[4:8]
    iso_bmff = box in (b"ftyp", b"moov", b"mdat", b"free", b"wide", b"skip", b"pnot")
    if field == "video_url":
        ok = (
            iso_bmff
            or head.startswith(b"\x1a\x45\xdf\xa3")  # EBML: WebM / Matroska
            or (head.startswith(b"RIFF") and head[8:12] == b"AVI ")
            or head.startswith(b"\x47")  # MPEG-TS sync byte
            or head.startswith(b"\x00\x00\x01\xba")  # MPEG-PS
            or head.startswith(b"FLV")
            or head.startswith((b"GIF87a", b"GIF89a"))
        )
        kinds = _VIDEO_KINDS
    else:
        ok = (
            head.startswith(b"\x89PNG\r\n\x1a\n")
            or head.startswith(b"\xff\xd8\xff")
            or (head.startswith(b"RIFF") and head[8:12] == b"WEBP")
            or head.startswith((b"GIF87a", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*"))
            or (box == b"ftyp" and head[8:12] in (b"avif", b"avis", b"heic", b"heix", b"mif1", b"msf1"))
        )
        kinds = _IMAGE_KINDS
    if ok:
        return None
    what = "a video" if field == "video_url" else "an image"
    return f"`{field}`: the file does not look like {what} (expected {kinds})."
