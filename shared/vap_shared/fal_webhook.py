"""fal.ai webhook verification: Ed25519 over `request_id\\nuser_id\\ntimestamp\\nsha256_hex(body)`.

Public keys come from fal's JWKS (`FAL_JWKS_URL`), cached in-process for at most 24 h and
refetched once when no cached key verifies (key rotation), at most once a minute. Verified with
PyNaCl (libsodium: 3 MB unzipped in the layer; `cryptography` was 14 MB for this one check).
"""

from __future__ import annotations

import base64
import hashlib
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import httpx
from nacl.exceptions import BadSignatureError
from nacl.signing import VerifyKey

from .signing import SignatureError

REQUEST_ID_HEADER = "x-fal-webhook-request-id"
USER_ID_HEADER = "x-fal-webhook-user-id"
TIMESTAMP_HEADER = "x-fal-webhook-timestamp"
SIGNATURE_HEADER = "x-fal-webhook-signature"
WINDOW_SECONDS = 300
JWKS_MAX_AGE = 24 * 3600
REFETCH_MIN_INTERVAL = 60
ED25519_KEY_BYTES = 32


def _b64url(value: str) -> bytes:
    return base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))


def parse_jwks(document: Any) -> list[VerifyKey]:
    """Every entry whose `x` is a 32-byte Ed25519 public key (base64url). fal promises only the
    `x` field and its own verifier tries every key, so `kty`/`crv` are not required; an entry is
    skipped only when they say it is not an Ed25519 key (or `x` is not 32 bytes)."""
    keys: list[VerifyKey] = []
    entries = document.get("keys", []) if isinstance(document, dict) else []
    for entry in entries:
        if not isinstance(entry, dict) or not isinstance(entry.get("x"), str):
            continue
        if entry.get("kty", "OKP") != "OKP" or entry.get("crv", "Ed25519") != "Ed25519":
            continue
        try:
            raw = _b64url(entry["x"])
        except ValueError:
            continue
        if len(raw) == ED25519_KEY_BYTES:
            keys.append(VerifyKey(raw))
    return keys


def signed_message(request_id: str, user_id: str, timestamp: str, body: bytes) -> bytes:
    return "\n".join([request_id, user_id, timestamp, hashlib.sha256(body).hexdigest()]).encode("utf-8")


class JwksCache:
    def __init__(
        self,
        fetch: Callable[[], Any],
        clock: Callable[[], float] = time.monotonic,
        max_age: float = JWKS_MAX_AGE,
    ) -> None:
        self._fetch = fetch
        self._clock = clock
        self._max_age = max_age
        self._keys: list[VerifyKey] = []
        self._fetched_at: float | None = None
        self._lock = threading.Lock()

    @classmethod
    def from_url(cls, http: httpx.Client, url: str) -> JwksCache:
        def fetch() -> Any:
            response = http.get(url, timeout=httpx.Timeout(5.0, connect=3.0))
            response.raise_for_status()
            return response.json()

        return cls(fetch)

    def _refresh(self) -> None:
        keys = parse_jwks(self._fetch())
        if not keys:
            raise SignatureError("the JWKS holds no Ed25519 keys")
        self._keys = keys
        self._fetched_at = self._clock()

    def keys(self, force: bool = False) -> list[VerifyKey]:
        with self._lock:
            now = self._clock()
            stale = self._fetched_at is None or now - self._fetched_at > self._max_age
            recently = self._fetched_at is not None and now - self._fetched_at < REFETCH_MIN_INTERVAL
            if stale or (force and not recently):
                try:
                    self._refresh()
                except (httpx.HTTPError, ValueError) as exc:
                    if not self._keys:
                        raise SignatureError(f"could not fetch fal's JWKS ({type(exc).__name__})") from None
            return list(self._keys)


def _any_verifies(keys: list[VerifyKey], signature: bytes, message: bytes) -> bool:
    for key in keys:
        try:
            key.verify(message, signature)
            return True
        except BadSignatureError:
            continue
    return False


def verify_fal_webhook(
    headers: Mapping[str, str],
    body: bytes,
    jwks: JwksCache,
    now: float | None = None,
    window_seconds: int = WINDOW_SECONDS,
    expected_user_id: str | None = None,
) -> str:
    """Raise `SignatureError` unless a JWKS key signed this delivery (and, with `expected_user_id`,
    the delivery is for that fal user: fal signs every account's webhooks with the same keys);
    returns the request id.

    `headers` must have lower-case names (Function URL events do).
    """
    request_id = headers.get(REQUEST_ID_HEADER, "")
    user_id = headers.get(USER_ID_HEADER, "")
    timestamp = headers.get(TIMESTAMP_HEADER, "")
    signature_hex = headers.get(SIGNATURE_HEADER, "")
    if not (request_id and user_id and timestamp and signature_hex):
        raise SignatureError("missing fal webhook signature headers")
    if expected_user_id and user_id != expected_user_id:
        raise SignatureError("the webhook is for another fal user")
    if not timestamp.isascii() or not timestamp.isdigit() or len(timestamp) > 12:
        raise SignatureError("malformed timestamp")
    current = time.time() if now is None else now
    if abs(current - int(timestamp)) > window_seconds:
        raise SignatureError("timestamp outside the allowed window")
    try:
        signature = bytes.fromhex(signature_hex)
    except ValueError:
        raise SignatureError("signature is not hex") from None
    if len(signature) != 64:
        raise SignatureError("signature has the wrong length")
    message = signed_message(request_id, user_id, timestamp, body)
    if _any_verifies(jwks.keys(), signature, message):
        return request_id
    # Unknown key: fal may have rotated; refetch once (rate-limited) before refusing.
    if _any_verifies(jwks.keys(force=True), signature, message):
        return request_id
    raise SignatureError("signature mismatch")
