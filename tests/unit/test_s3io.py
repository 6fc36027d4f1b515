import boto3
import httpx
import pytest
from moto import mock_aws
from vap_shared import s3io
from vap_shared.s3io import StoreError, stream_url_to_s3, validate_mp4
from vap_testkit import MP4

BUCKET = "s3io-bucket"


@pytest.fixture
def s3(monkeypatch):
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "t")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "t")
    with mock_aws():
        client = boto3.client("s3", region_name="us-east-1")
        client.create_bucket(Bucket=BUCKET)
        yield client


class Source:
    """A streaming body served through MockTransport; counts how much was read."""

    def __init__(self, size: int, head: bytes = MP4[:24], declare: bool = True, redirect: str | None = None):
        self.size, self.head, self.declare, self.redirect = size, head, declare, redirect
        self.sent = 0
        self.hosts: list[str] = []

    def chunks(self):
        yield self.head
        self.sent += len(self.head)
        remaining = self.size - len(self.head)
        while remaining > 0:
            n = min(remaining, 1024 * 1024)
            self.sent += n
            remaining -= n
            yield b"\x00" * n

    def handler(self, request: httpx.Request) -> httpx.Response:
        self.hosts.append(request.url.host)
        if self.redirect and request.url.host == "v3.fal.media":
            return httpx.Response(302, headers={"location": self.redirect})
        headers = {"content-length": str(self.size)} if self.declare else {}
        return httpx.Response(200, headers=headers, content=self.chunks())

    def client(self) -> httpx.Client:
        return httpx.Client(transport=httpx.MockTransport(self.handler))


def stream(source: Source, s3, url="https://v3.fal.media/f/out.mp4", max_bytes=20 * 1024 * 1024, **kw):
    return stream_url_to_s3(
        source.client(),
        s3,
        url,
        BUCKET,
        "outputs/x/video.mp4",
        allowed_hosts=("*.fal.media",),
        max_bytes=max_bytes,
        timeout_s=30,
        **kw,
    )


def no_object(s3):
    assert s3.list_objects_v2(Bucket=BUCKET).get("KeyCount", 0) == 0
    assert not s3.list_multipart_uploads(Bucket=BUCKET).get("Uploads")


def test_streams_multiple_parts(s3):
    size = s3io.PART_SIZE + 3 * 1024 * 1024
    assert stream(Source(size), s3) == size
    head = s3.head_object(Bucket=BUCKET, Key="outputs/x/video.mp4")
    assert head["ContentLength"] == size and head["ContentType"] == "video/mp4"


def test_size_cap_stops_reading_and_aborts(s3):
    source = Source(12 * 1024 * 1024, declare=False)
    with pytest.raises(StoreError, match="larger than the allowed"):
        stream(source, s3, max_bytes=9 * 1024 * 1024)
    assert source.sent < 11 * 1024 * 1024  # stopped early, never read the whole body
    no_object(s3)


def test_declared_length_over_cap_is_refused_up_front(s3):
    with pytest.raises(StoreError, match="at most"):
        stream(Source(5000), s3, max_bytes=4000)
    no_object(s3)


def test_not_an_mp4(s3):
    with pytest.raises(StoreError, match="not an MP4"):
        stream(Source(5000, head=b"<!doctype html><html>"), s3)
    no_object(s3)


@pytest.mark.parametrize(
    "url",
    [
        "http://v3.fal.media/x.mp4",
        "https://evil.test/x.mp4",
        "https://169.254.169.254/x",
        "https://127.0.0.1/x",
        "file:///etc/passwd",
    ],
)
def test_refuses_disallowed_urls(s3, url):
    source = Source(5000)
    with pytest.raises(StoreError, match="refusing"):
        stream(source, s3, url=url)
    assert source.hosts == []


def test_redirect_to_a_disallowed_host_is_refused(s3):
    source = Source(5000, redirect="https://169.254.169.254/latest/meta-data")
    with pytest.raises(StoreError, match="refusing"):
        stream(source, s3)
    assert source.hosts == ["v3.fal.media"]
    no_object(s3)


def test_loopback_http_only_with_the_local_flag(s3):
    with pytest.raises(StoreError):
        stream(Source(5000), s3, url="http://127.0.0.1:9000/x.mp4")
    assert stream(Source(5000), s3, url="http://127.0.0.1:9000/x.mp4", allow_http_loopback=True) == 5000


def test_validate_mp4(s3):
    s3.put_object(Bucket=BUCKET, Key="ok.mp4", Body=MP4)
    assert validate_mp4(s3, BUCKET, "ok.mp4", 10_000) == len(MP4)
    with pytest.raises(StoreError) as missing:
        validate_mp4(s3, BUCKET, "missing.mp4", 10_000)
    assert missing.value.retryable
    s3.put_object(Bucket=BUCKET, Key="html.mp4", Body=b"<html>" * 10)
    with pytest.raises(StoreError, match="not an MP4"):
        validate_mp4(s3, BUCKET, "html.mp4", 10_000)
    with pytest.raises(StoreError, match="at most"):
        validate_mp4(s3, BUCKET, "ok.mp4", 100)
    s3.put_object(Bucket=BUCKET, Key="empty.mp4", Body=b"")
    with pytest.raises(StoreError, match="too small"):
        validate_mp4(s3, BUCKET, "empty.mp4", 10_000)
