"""S3 helpers: presigned URLs, JSON objects, MP4 checks, copies and streamed URL downloads."""

from __future__ import annotations

import contextlib
import json
import time
from typing import TYPE_CHECKING, Any
from urllib.parse import urljoin

from botocore.exceptions import ClientError

from .urls import UrlNotAllowed, check_fetch_url

if TYPE_CHECKING:
    import httpx

PART_SIZE = 8 * 1024 * 1024  # S3 parts must be >= 5 MiB except the last
MAX_REDIRECTS = 3
MP4_MIN_BYTES = 16


class StoreError(Exception):
    """A media object is missing, malformed or too large; `retryable` if trying again may help."""

    def __init__(self, message: str, retryable: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.retryable = retryable


def presign_get(s3: Any, bucket: str, key: str, ttl: int) -> str:
    return str(s3.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=ttl))


def presign_put(s3: Any, bucket: str, key: str, ttl: int, content_type: str = "video/mp4") -> str:
    return str(
        s3.generate_presigned_url(
            "put_object", Params={"Bucket": bucket, "Key": key, "ContentType": content_type}, ExpiresIn=ttl
        )
    )


def put_json(s3: Any, bucket: str, key: str, body: Any) -> None:
    s3.put_object(
        Bucket=bucket,
        Key=key,
        Body=json.dumps(body, indent=2, sort_keys=True, default=str).encode("utf-8"),
        ContentType="application/json",
    )


def _missing(exc: ClientError) -> bool:
    code = str(exc.response.get("Error", {}).get("Code", ""))
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return code in ("404", "NoSuchKey", "NotFound") or status == 404


def head(s3: Any, bucket: str, key: str) -> dict[str, Any] | None:
    """HEAD an object; None when it does not exist."""
    try:
        return dict(s3.head_object(Bucket=bucket, Key=key))
    except ClientError as exc:
        if _missing(exc):
            return None
        raise


def read_limited(s3: Any, bucket: str, key: str, max_bytes: int, etag: str | None = None) -> bytes | None:
    """Read at most `max_bytes + 1` bytes (so the caller can tell "too large"); None if missing.

    With `etag`, a re-uploaded (different) object reads as missing: its own event handles it.
    """
    kwargs: dict[str, Any] = {"Bucket": bucket, "Key": key, "Range": f"bytes=0-{max_bytes}"}
    if etag:
        kwargs["IfMatch"] = etag if etag.startswith('"') else f'"{etag}"'
    try:
        response = s3.get_object(**kwargs)
    except ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", ""))
        if _missing(exc) or code in ("PreconditionFailed", "412"):
            return None
        if code == "InvalidRange":  # empty object
            return b""
        raise
    return bytes(response["Body"].read(max_bytes + 1))


def looks_like_mp4(first_bytes: bytes) -> bool:
    """ISO-BMFF files start with a box whose type is `ftyp`."""
    return len(first_bytes) >= 12 and first_bytes[4:8] == b"ftyp"


def validate_mp4(s3: Any, bucket: str, key: str, max_bytes: int) -> int:
    """Check an uploaded MP4: exists, size within bounds, starts with `ftyp`. Returns its size."""
    meta = head(s3, bucket, key)
    if meta is None:
        raise StoreError(f"the generated video {key} was not found in S3", retryable=True)
    size = int(meta.get("ContentLength", 0))
    if size < MP4_MIN_BYTES:
        raise StoreError(f"the generated video is {size} bytes, too small to be an MP4")
    if size > max_bytes:
        raise StoreError(f"the generated video is {size:,} bytes; at most {max_bytes:,} are allowed")
    first = s3.get_object(Bucket=bucket, Key=key, Range="bytes=0-63")["Body"].read()
    if not looks_like_mp4(first):
        raise StoreError("the generated file is not an MP4 (no ISO-BMFF 'ftyp' box at its start)")
    return size


def copy(s3: Any, bucket: str, source_key: str, dest_key: str, content_type: str = "video/mp4") -> None:
    """Server-side copy (objects here stay well under copy_object's 5 GB limit)."""
    s3.copy_object(
        Bucket=bucket,
        Key=dest_key,
        CopySource={"Bucket": bucket, "Key": source_key},
        MetadataDirective="REPLACE",
        ContentType=content_type,
    )


def stream_url_to_s3(
    http: httpx.Client,
    s3: Any,
    url: str,
    bucket: str,
    key: str,
    *,
    allowed_hosts: tuple[str, ...],
    max_bytes: int,
    timeout_s: float,
    allow_http_loopback: bool = False,
    require_mp4: bool = True,
    content_type: str = "video/mp4",
) -> int:
    """Stream `url` into `s3://bucket/key` by multipart upload, never holding the whole body.

    https + allow-listed hosts only (each redirect re-checked), size and wall-time caps. On any
    failure the multipart upload is aborted, so no partial object is left. Returns the size.
    """
    import httpx  # loaded with `http` already; not at init (vap_shared.http_limits)

    deadline = time.monotonic() + timeout_s
    upload_id: str | None = None
    try:
        current = url
        for _ in range(MAX_REDIRECTS + 1):
            try:
                check_fetch_url(current, allowed_hosts, allow_http_loopback)
            except UrlNotAllowed as exc:
                raise StoreError(f"refusing to download the result: {exc}") from None
            with http.stream("GET", current, follow_redirects=False) as response:
                if response.is_redirect:
                    location = response.headers.get("location", "")
                    current = urljoin(current, location)
                    continue
                if response.status_code != 200:
                    raise StoreError(
                        f"downloading the result failed with HTTP {response.status_code}",
                        retryable=response.status_code >= 500 or response.status_code == 429,
                    )
                declared = response.headers.get("content-length")
                if declared and declared.isdigit() and int(declared) > max_bytes:
                    raise StoreError(
                        f"the result is {int(declared):,} bytes; at most {max_bytes:,} are allowed"
                    )
                upload_id = s3.create_multipart_upload(Bucket=bucket, Key=key, ContentType=content_type)[
                    "UploadId"
                ]
                parts: list[dict[str, Any]] = []
                buffer = bytearray()
                total = 0
                checked = not require_mp4
                for chunk in response.iter_bytes(chunk_size=1024 * 1024):
                    total += len(chunk)
                    if total > max_bytes:
                        raise StoreError(f"the result is larger than the allowed {max_bytes:,} bytes")
                    if time.monotonic() > deadline:
                        raise StoreError(
                            f"downloading the result took longer than {timeout_s:.0f} s", retryable=True
                        )
                    buffer.extend(chunk)
                    if not checked and len(buffer) >= 12:
                        if not looks_like_mp4(bytes(buffer[:12])):
                            raise StoreError("the result is not an MP4 (no ISO-BMFF 'ftyp' box at its start)")
                        checked = True
                    if len(buffer) >= PART_SIZE:
                        parts.append(_upload_part(s3, bucket, key, upload_id, len(parts) + 1, bytes(buffer)))
                        buffer.clear()
                if total == 0:
                    raise StoreError("the result is empty")
                if not checked:
                    raise StoreError("the result is too small to be an MP4")
                if buffer or not parts:
                    parts.append(_upload_part(s3, bucket, key, upload_id, len(parts) + 1, bytes(buffer)))
                s3.complete_multipart_upload(
                    Bucket=bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts}
                )
                upload_id = None
                return total
        raise StoreError("too many redirects while downloading the result")
    except httpx.HTTPError as exc:
        raise StoreError(f"downloading the result failed: {type(exc).__name__}", retryable=True) from None
    finally:
        if upload_id is not None:
            # If even the abort fails, the bucket's lifecycle rule cleans up incomplete uploads.
            with contextlib.suppress(ClientError):
                s3.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id)


def _upload_part(s3: Any, bucket: str, key: str, upload_id: str, number: int, body: bytes) -> dict[str, Any]:
    response = s3.upload_part(Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=body)
    return {"ETag": response["ETag"], "PartNumber": number}
