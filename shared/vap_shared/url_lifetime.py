"""How long a presigned URL can really live: no longer than the credentials that signed it.

S3 refuses a presigned URL once the temporary credentials that signed it expire, whatever its
`X-Amz-Expires` says (AWS knowledge center, "presigned URL expires before the expiration time I
specified"). So a URL's lifetime is the shorter of what is wanted and what the signer's credentials
have left:

- long-term keys (an IAM user's: no session token): what is wanted (S3 allows up to 7 days);
- temporary credentials whose expiry botocore knows (assumed roles, SSO, container credentials,
  `AWS_CREDENTIAL_EXPIRATION`): until that expiry, less a margin for the signer's and S3's clocks;
- temporary credentials without a known expiry, as a Lambda function gets them (environment
  variables, no expiry): AWS documents no lifetime for them (a service assuming a role "doesn't
  necessarily comply with the role's session duration settings"), so at most `UNKNOWN_EXPIRY_S`,
  the shortest session STS issues for a role (15 min).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

UNKNOWN_EXPIRY_S = 900  # STS's shortest role session (AssumeRole DurationSeconds minimum)
CLOCK_MARGIN_S = 60  # the signer's clock and S3's may differ; a URL must not outlive its signer
MAX_PRESIGN_S = 7 * 24 * 3600  # SigV4's longest X-Amz-Expires


@dataclass(frozen=True)
class UrlLifetime:
    seconds: int
    why: str  # what bounded it, for logs and `vap url`

    def expires_at(self, now: datetime) -> datetime:
        return now + timedelta(seconds=self.seconds)


def signer_credentials(client: Any) -> Any:
    """The credentials a boto3 client signs with (botocore keeps them on its request signer; a
    client has no public accessor), or None."""
    return getattr(getattr(client, "_request_signer", None), "_credentials", None)


def credentials_expiry(credentials: Any) -> datetime | None:
    """When botocore's credentials expire, when it knows (RefreshableCredentials); None otherwise.
    Read after `get_frozen_credentials()`, which refreshes credentials close to their expiry first."""
    expiry = getattr(credentials, "_expiry_time", None)
    return expiry if isinstance(expiry, datetime) else None


def url_lifetime(client: Any, wanted_s: int, now: datetime | None = None) -> UrlLifetime:
    """The lifetime to presign with `client` for a URL wanted to live `wanted_s`."""
    wanted_s = max(1, min(int(wanted_s), MAX_PRESIGN_S))
    credentials = signer_credentials(client)
    if credentials is None:
        return UrlLifetime(wanted_s, "wanted (no credentials to inspect)")
    frozen = credentials.get_frozen_credentials()
    if not frozen.token:
        return UrlLifetime(wanted_s, "wanted (long-term credentials)")
    expiry = credentials_expiry(credentials)
    if expiry is None:
        return UrlLifetime(min(wanted_s, UNKNOWN_EXPIRY_S), "temporary credentials with no known expiry")
    now = now or datetime.now(UTC)
    left = int((expiry - now).total_seconds()) - CLOCK_MARGIN_S
    if left >= wanted_s:
        return UrlLifetime(wanted_s, "wanted (the credentials last longer)")
    return UrlLifetime(max(1, left), f"the signing credentials expire at {expiry.isoformat()}")
