"""HMAC signatures of GPU callbacks (see docs/contracts.md).

The stack holds one secret; each job gets its own key derived from it, so the GPU side only
ever holds a key that can sign callbacks for that one job.
"""

from __future__ import annotations

import hashlib
import hmac
import time

TIMESTAMP_HEADER = "X-VAP-Timestamp"
SIGNATURE_HEADER = "X-VAP-Signature"
SIGNATURE_VERSION = "v1"
DEFAULT_WINDOW_SECONDS = 300
_KEY_CONTEXT = b"vap-callback-v1:"


class SignatureError(Exception):
    """The callback's signature or timestamp is not acceptable."""


def derive_callback_key(stack_secret: bytes, job_id: str) -> bytes:
    return hmac.new(stack_secret, _KEY_CONTEXT + job_id.encode("utf-8"), hashlib.sha256).digest()


def sign_callback(key: bytes, timestamp: int, body: bytes) -> str:
    """The `X-VAP-Signature` header value for `body` sent at `timestamp`."""
    mac = hmac.new(key, f"{timestamp}.".encode("ascii") + body, hashlib.sha256).hexdigest()
    return f"{SIGNATURE_VERSION}={mac}"


def signed_headers(key: bytes, body: bytes, now: float | None = None) -> dict[str, str]:
    timestamp = int(time.time() if now is None else now)
    return {
        "Content-Type": "application/json",
        TIMESTAMP_HEADER: str(timestamp),
        SIGNATURE_HEADER: sign_callback(key, timestamp, body),
    }


def verify_callback(
    key: bytes,
    timestamp_header: str | None,
    signature_header: str | None,
    body: bytes,
    now: float | None = None,
    window_seconds: int = DEFAULT_WINDOW_SECONDS,
) -> None:
    """Raise `SignatureError` unless the signature matches and the timestamp is fresh."""
    if not timestamp_header or not signature_header:
        raise SignatureError("missing signature headers")
    if not timestamp_header.isascii() or not timestamp_header.isdigit() or len(timestamp_header) > 12:
        raise SignatureError("malformed timestamp")
    timestamp = int(timestamp_header)
    current = time.time() if now is None else now
    if abs(current - timestamp) > window_seconds:
        raise SignatureError("timestamp outside the allowed window")
    expected = sign_callback(key, timestamp, body)
    # compare_digest keeps the comparison constant-time; both sides are ASCII here.
    if not hmac.compare_digest(expected.encode("ascii"), signature_header.encode("utf-8", "replace")):
        raise SignatureError("signature mismatch")
