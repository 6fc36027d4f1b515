"""`vap gallery`'s media links: their lifetime (asked, SigV4's 7 days, the credentials' expiry),
the names of downloaded files, and what is never fetched."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import boto3
import pytest
from botocore.credentials import Credentials, RefreshableCredentials

from vap_cli.config import StackInfo
from vap_cli.errors import CliError
from vap_cli.gallery import parse_expires
from vap_cli.gallery_jobs import MediaSource
from vap_cli.gallery_media import SIGV4_MAX_S, DownloadedLinks, PresignedLinks, file_name, link_lifetime

NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)


class CredentialsOf:
    """A session as far as link_lifetime looks at one: its credentials (real botocore objects)."""

    def __init__(self, credentials: Credentials) -> None:
        self.credentials = credentials

    def get_credentials(self) -> Credentials:
        return self.credentials


def temporary(expires_in: timedelta) -> RefreshableCredentials:
    """Credentials like SSO's or an assumed role's (valid until `expires_in` from now)."""
    expiry = (datetime.now(UTC) + expires_in).isoformat()
    metadata = {"access_key": "AKIA", "secret_key": "secret", "token": "token", "expiry_time": expiry}
    return RefreshableCredentials.create_from_metadata(
        metadata=metadata, refresh_using=lambda: metadata, method="sts-assume-role"
    )


def test_links_live_as_asked_with_long_lived_keys() -> None:
    lifetime = link_lifetime(86400, CredentialsOf(Credentials("AKIA", "secret")), NOW)
    assert (lifetime.seconds, lifetime.expires_at, lifetime.limited_by) == (
        86400,
        NOW + timedelta(days=1),
        None,
    )


def test_links_never_outlive_sigv4s_seven_days() -> None:
    lifetime = link_lifetime(30 * 86400, CredentialsOf(Credentials("AKIA", "secret")), NOW)
    assert lifetime.seconds == SIGV4_MAX_S == 7 * 86400
    assert lifetime.limited_by is not None and "7-day" in lifetime.limited_by


def test_links_end_when_temporary_credentials_do() -> None:
    now = datetime.now(UTC)
    lifetime = link_lifetime(86400, CredentialsOf(temporary(timedelta(hours=2))), now)
    assert 7200 - 5 <= lifetime.seconds <= 7200
    assert lifetime.limited_by is not None and "credentials" in lifetime.limited_by
    # Credentials that outlive the asked lifetime do not shorten it.
    assert link_lifetime(3600, CredentialsOf(temporary(timedelta(hours=2))), now).seconds == 3600


@pytest.mark.parametrize(
    ("text", "seconds"), [("1d", 86400), ("12h", 43200), ("30m", 1800), ("2w", 1209600), ("90", 90)]
)
def test_expires_spans(text: str, seconds: int) -> None:
    assert parse_expires(text) == seconds


@pytest.mark.parametrize("text", ["0", "soon", "-1d", "1y"])
def test_expires_refuses_what_is_not_a_lifetime(text: str) -> None:
    with pytest.raises(CliError, match="--expires"):
        parse_expires(text)


def test_presigned_links_carry_the_lifetime() -> None:
    session = boto3.session.Session(
        aws_access_key_id="AKIA", aws_secret_access_key="secret", region_name="eu-west-1"
    )
    stack = StackInfo(kind="deployed", name="vap", region="eu-west-1", bucket="vap-bucket", session=session)
    lifetime = link_lifetime(3600, session, NOW)
    link = PresignedLinks(stack, lifetime).link(
        MediaSource("s3", bucket="vap-bucket", key="outputs/a/b/20261125T120000Z-0123456789/video.mp4")
    )
    assert link.href is not None and link.problem is None
    url = urlsplit(link.href)
    assert url.netloc == "vap-bucket.s3.eu-west-1.amazonaws.com"
    assert parse_qs(url.query)["X-Amz-Expires"] == ["3600"]
    # A user's https input is linked as it is; another bucket's object is not linked at all.
    https = MediaSource("https", url="https://media.example.com/a.png")
    assert PresignedLinks(stack, lifetime).link(https).href == "https://media.example.com/a.png"
    other = PresignedLinks(stack, lifetime).link(MediaSource("s3", bucket="elsewhere", key="inbox/a.mp4"))
    assert other.href is None and "not in the stack's bucket" in str(other.problem)


def test_downloaded_file_names_are_flat_unique_and_safe() -> None:
    a = MediaSource("s3", bucket="b", key="inbox/balloon/horse/clip.mp4")
    b = MediaSource("s3", bucket="b", key="inbox/kite/clip.mp4")
    odd = MediaSource("https", url="https://media.example.com/x/../we%20ird name?.mp4?sig=1")
    assert file_name(a) == file_name(a) != file_name(b)
    assert file_name(a).endswith("-clip.mp4") and "/" not in file_name(odd)
    assert all(ch.isalnum() or ch in "._-" for ch in file_name(odd))


def test_downloads_fetch_only_https_urls(tmp_path: Path) -> None:
    stack = StackInfo(kind="local", name="vap-local", region="us-east-1", bucket="b", session=None)
    link = DownloadedLinks(stack, tmp_path).link(MediaSource("https", url="http://127.0.0.1:9/a.mp4"))
    assert link.href == "http://127.0.0.1:9/a.mp4"
    assert link.problem is not None and "only https" in link.problem
    assert not list((tmp_path / "media").iterdir())
