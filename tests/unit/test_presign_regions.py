"""Presigned URLs name the regional virtual-hosted endpoint `<bucket>.s3.<region>.amazonaws.com`.

botocore decides the host, so these tests run botocore's real presigning (fake credentials, no
endpoint override, no emulator) through the clients the Lambdas and `vap` build. A client with only
`signature_version="s3v4"` names the legacy global host `<bucket>.s3.amazonaws.com`: S3 answers a
new bucket there with a 307, and regions opened after March 2019 with a 400.
"""

from __future__ import annotations

from urllib.parse import parse_qs, urlsplit

import boto3
import pytest
from vap_shared.config import Settings
from vap_shared.runtime import Runtime

from vap_cli.config import StackInfo

# af-south-1 … il-central-1 opened after 2019-03-20 (opt-in regions: no global-endpoint fallback).
REGIONS = [
    "us-east-1",
    "us-west-2",
    "eu-west-1",
    "af-south-1",
    "ap-east-1",
    "me-south-1",
    "eu-south-1",
    "ap-southeast-3",
    "il-central-1",
]
BUCKET = "vap-stack-123456789012-bucket"


def session(region: str) -> boto3.session.Session:
    return boto3.session.Session(
        aws_access_key_id="testing-key-id", aws_secret_access_key="fake", region_name=region
    )


def runtime(region: str, monkeypatch: pytest.MonkeyPatch) -> Runtime:
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    settings = Settings(bucket_name=BUCKET, jobs_table="t", topic_arn="")
    return Runtime.build(settings, session=session(region))


def check(url: str, region: str, key: str) -> dict[str, list[str]]:
    parts = urlsplit(url)
    assert parts.scheme == "https"
    assert parts.netloc == f"{BUCKET}.s3.{region}.amazonaws.com", url
    assert parts.path == "/" + key
    query = parse_qs(parts.query)
    # Signed for the same region the host names (SigV4 credential scope).
    assert query["X-Amz-Algorithm"] == ["AWS4-HMAC-SHA256"]
    assert query["X-Amz-Credential"][0].endswith(f"/{region}/s3/aws4_request")
    return query


@pytest.mark.parametrize("region", REGIONS)
def test_lambda_presigned_get_and_put_name_the_regional_virtual_host(
    region: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    rt = runtime(region, monkeypatch)
    get = check(rt.sign_get(BUCKET, "inbox/set/clip.mp4"), region, "inbox/set/clip.mp4")
    assert get["X-Amz-SignedHeaders"] == ["host"]
    assert get["X-Amz-Expires"] == [str(rt.settings.budget.url_ttl_s)]  # the job budget
    put = check(
        rt.output_put_url("20261125T182301Z-0123456789"), region, "work/20261125T182301Z-0123456789/video.mp4"
    )
    # The PUT stays pinned to the MP4 content type (the uploader must send exactly that header).
    assert put["X-Amz-SignedHeaders"] == ["content-type;host"]


@pytest.mark.parametrize("region", ["us-east-1", "af-south-1", "il-central-1"])
def test_vap_cli_s3_client_presigns_the_same_way(region: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    info = StackInfo(kind="deployed", name="s", region=region, bucket=BUCKET, session=session(region))
    url = info.client("s3").generate_presigned_url(
        "get_object", Params={"Bucket": BUCKET, "Key": "outputs/a/video.mp4"}, ExpiresIn=60
    )
    check(url, region, "outputs/a/video.mp4")


def test_an_emulator_endpoint_keeps_path_style(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:5999")
    settings = Settings(bucket_name=BUCKET, jobs_table="t", topic_arn="")
    url = Runtime.build(settings, session=session("eu-west-1")).sign_get(BUCKET, "inbox/a.mp4")
    assert url.startswith(f"http://127.0.0.1:5999/{BUCKET}/inbox/a.mp4?")
