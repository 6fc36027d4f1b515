"""A result URL never claims to outlive the credentials that signed it: S3 refuses a presigned URL
once its signer's temporary credentials expire, whatever `X-Amz-Expires` says. The credentials are
botocore's own, loaded the way the functions and `vap` load them (environment variables)."""

from __future__ import annotations

import contextlib
import io
import json
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qs, urlsplit

import boto3
import pytest
from moto import mock_aws
from vap_shared.jobs import Job, iso, parse_iso
from vap_shared.notifier import OUTPUT_URL_TTL, build_notification
from vap_shared.runtime import s3_client
from vap_shared.url_lifetime import CLOCK_MARGIN_S, UNKNOWN_EXPIRY_S, url_lifetime

from vap_cli.__main__ import main

BUCKET = "vap-bucket"
REGION = "eu-west-1"


def _expires(url: str) -> int:
    return int(parse_qs(urlsplit(url).query)["X-Amz-Expires"][0])


@pytest.fixture
def credentials(monkeypatch: pytest.MonkeyPatch) -> Any:
    """Set the environment's credentials: long-term keys, or a session token with or without
    `AWS_CREDENTIAL_EXPIRATION` (botocore's EnvProvider reads the expiry from it)."""
    for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_SESSION_TOKEN", "AWS_CREDENTIAL_EXPIRATION"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "ASIAEXAMPLEKEY")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")

    def use(token: str | None = None, expires_in_s: int | None = None) -> datetime | None:
        if token is not None:
            monkeypatch.setenv("AWS_SESSION_TOKEN", token)
        if expires_in_s is None:
            return None
        expiry = (datetime.now(UTC) + timedelta(seconds=expires_in_s)).replace(microsecond=0)
        monkeypatch.setenv("AWS_CREDENTIAL_EXPIRATION", expiry.isoformat())
        return expiry

    return use


def _s3() -> Any:
    """The functions' own S3 client (vap_shared.runtime), from the environment's credentials."""
    return s3_client(boto3.session.Session(region_name=REGION))


def _job() -> Job:
    return Job(
        job_id="20261125T182301Z-3f9c0a1b2d",
        state="succeeded",
        sidecar_bucket=BUCKET,
        sidecar_key="inbox/balloon/horse.json",
        name="balloon/horse",
        output_key="outputs/balloon/horse/20261125T182301Z-3f9c0a1b2d/video.mp4",
        metadata_key="outputs/balloon/horse/20261125T182301Z-3f9c0a1b2d/metadata.json",
        poster_key="outputs/balloon/horse/20261125T182301Z-3f9c0a1b2d/poster.jpg",
        bytes=1234,
        received_at=iso(datetime.now(UTC)),
        updated_at=iso(datetime.now(UTC)),
    )


def test_a_notification_url_ends_when_its_signers_credentials_do(credentials: Any) -> None:
    expiry = credentials(token="session", expires_in_s=20 * 60)
    note = build_notification(_job(), _s3(), BUCKET)
    expires_at = parse_iso(note["output_url_expires_at"])
    assert expires_at is not None and expires_at <= expiry - timedelta(seconds=CLOCK_MARGIN_S - 1)
    for field in ("output_url", "poster_url"):
        lifetime = _expires(note[field])
        assert 20 * 60 - CLOCK_MARGIN_S - 5 <= lifetime <= 20 * 60 - CLOCK_MARGIN_S, field
    assert note["video"]["url"] == note["output_url"]
    # What the notification says is what the URL does: it stops at output_url_expires_at.
    signed_at = datetime.strptime(
        parse_qs(urlsplit(note["output_url"]).query)["X-Amz-Date"][0], "%Y%m%dT%H%M%SZ"
    )
    signed_end = signed_at.replace(tzinfo=UTC) + timedelta(seconds=_expires(note["output_url"]))
    assert abs((signed_end - expires_at).total_seconds()) <= 2


def test_credentials_without_a_known_expiry_get_the_shortest_role_session(credentials: Any) -> None:
    # A Lambda function's credentials: a session token in the environment, no expiry given.
    credentials(token="session")
    note = build_notification(_job(), _s3(), BUCKET)
    assert _expires(note["output_url"]) == UNKNOWN_EXPIRY_S == 900
    expires_at = parse_iso(note["output_url_expires_at"])
    assert expires_at is not None
    assert abs((expires_at - datetime.now(UTC)).total_seconds() - UNKNOWN_EXPIRY_S) < 5


def test_long_term_keys_and_long_lived_sessions_get_the_full_hour(credentials: Any) -> None:
    credentials()  # an IAM user's keys: no session token
    assert _expires(build_notification(_job(), _s3(), BUCKET)["output_url"]) == OUTPUT_URL_TTL == 3600
    credentials(token="session", expires_in_s=6 * 3600)
    assert _expires(build_notification(_job(), _s3(), BUCKET)["output_url"]) == OUTPUT_URL_TTL


def test_the_lifetime_says_why_it_is_short(credentials: Any) -> None:
    expiry = credentials(token="session", expires_in_s=30 * 60)
    lifetime = url_lifetime(_s3(), 3600)
    assert lifetime.seconds <= 30 * 60 - CLOCK_MARGIN_S and expiry is not None
    assert expiry.isoformat() in lifetime.why
    assert url_lifetime(_s3(), 10 * 24 * 3600).seconds <= 7 * 24 * 3600  # never past SigV4's limit


# ------------------------------------------------------------------------------------------ vap url

_STACK = {
    "Resources": {"Bucket": {"Type": "AWS::S3::Bucket", "Properties": {"BucketName": BUCKET}}},
    "Outputs": {"BucketName": {"Value": {"Ref": "Bucket"}}},
}


def _vap(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([*args, "--stack", "vap", "--region", REGION])
    return code, out.getvalue(), err.getvalue()


def test_vap_url_signs_a_fresh_url_with_the_callers_credentials(credentials: Any) -> None:
    job = _job()
    with mock_aws():
        boto3.client("cloudformation", region_name=REGION).create_stack(
            StackName="vap", TemplateBody=json.dumps(_STACK)
        )
        s3 = boto3.client("s3", region_name=REGION)
        folder = str(job.output_key).rsplit("/", 1)[0]
        status = {"job_id": job.job_id, "state": "succeeded", "name": job.name, "output_key": job.output_key}
        s3.put_object(Bucket=BUCKET, Key=f"{folder}/status.json", Body=json.dumps(status).encode())
        s3.put_object(Bucket=BUCKET, Key=str(job.output_key), Body=b"mp4")

        credentials(token="caller-session", expires_in_s=2 * 3600)  # e.g. an SSO session
        code, out, err = _vap("url", job.job_id, "--expires", "3000")
        assert (
            code == 0 and _expires(out.strip()) == 3000 and urlsplit(out.strip()).path.endswith("video.mp4")
        )
        assert "valid until" in err
        assert parse_qs(urlsplit(out.strip()).query)["X-Amz-Security-Token"] == ["caller-session"]

        code, out, err = _vap("url", job.job_id, "--expires", str(3 * 3600))  # past the session's end
        assert code == 0 and _expires(out.strip()) <= 2 * 3600 - CLOCK_MARGIN_S
        assert "signing credentials expire" in err

        code, _, err = _vap("url", job.job_id, "--file", "poster")
        assert code == 2 and "has no poster" in err
