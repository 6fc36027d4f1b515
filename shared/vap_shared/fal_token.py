"""The per-job secret in the fal webhook URL: what ties a fal delivery to one of our requests.

fal signs every account's webhooks with the same keys, so a valid signature proves only that fal
sent a delivery, not that it belongs to a request we made: anyone with a fal account who learns a
job id could point a request of their own at our webhook. So the URL we give fal carries a token
only we and fal know: `HMAC-SHA256(stack secret, "vap-fal-webhook-v1:" + job_id)` (hex), derived
like the GPU's callback key but with its own context, so the GPU's key does not give it away.
Never logged, never in notifications, `status.json` or `metadata.json`.
"""

from __future__ import annotations

import hashlib
import hmac

from .routes import url

TOKEN_PARAM = "token"  # noqa: S105 - the query parameter's name, not a secret
_CONTEXT = b"vap-fal-webhook-v1:"


def fal_webhook_token(stack_secret: bytes, job_id: str) -> str:
    return hmac.new(stack_secret, _CONTEXT + job_id.encode("utf-8"), hashlib.sha256).hexdigest()


def token_matches(stack_secret: bytes, job_id: str, token: str | None) -> bool:
    """Whether `token` is the job's (constant-time comparison)."""
    if not token:
        return False
    expected = fal_webhook_token(stack_secret, job_id).encode("ascii")
    return hmac.compare_digest(expected, token.encode("utf-8", "replace"))


def fal_webhook_url(base_url: str, job_id: str, token: str) -> str:
    """The `fal` route's URL with `?token=<token>`: the `fal_webhook` of a submit."""
    return f"{url(base_url, 'fal', job_id)}?{TOKEN_PARAM}={token}"
