import base64

import pytest
from vap_shared.media import MediaRef, resolve_reference

BUCKET = "b"


def resolve(value, field="video_url", sidecar_key="inbox/set/job.json", max_data=1000):
    return resolve_reference(
        field,
        value,
        sidecar_key=sidecar_key,
        bucket=BUCKET,
        allowed_hosts=("storage.googleapis.com", "*.example.org"),
        max_data_bytes=max_data,
    )


def test_relative_key_resolves_against_the_sidecar_folder():
    ref = resolve("clip.mp4")
    assert isinstance(ref, MediaRef) and (ref.bucket, ref.key) == (BUCKET, "inbox/set/clip.mp4")
    assert resolve("./sub/clip.mp4").key == "inbox/set/sub/clip.mp4"  # type: ignore[union-attr]
    assert resolve("clip.mp4", sidecar_key="inbox/job.json").key == "inbox/clip.mp4"  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("value", "needle"),
    [
        ("../other/clip.mp4", "contains '..'"),
        ("sub/../../x.mp4", "contains '..'"),
        ("/etc/passwd", "absolute path"),
        ("a//b.mp4", "empty path segment"),
        ("s3://other-bucket/inbox/clip.mp4", "names the bucket 'other-bucket'"),
        ("s3://b/outputs/x/video.mp4", "outside inbox/"),
        ("s3://b/", "not a complete"),
        ("http://storage.googleapis.com/x.mp4", "http: scheme"),
        ("file:///etc/passwd", "file: scheme"),
        ("ftp://example.org/x.mp4", "ftp: scheme"),
        ("gs://bucket/x.mp4", "gs: scheme"),
        ("https://evil.test/x.mp4", "host evil.test, which is not allowed"),
        ("https://169.254.169.254/latest/meta-data", "not allowed"),
        ("https://127.0.0.1/x.mp4", "not allowed"),
        ("https://[::1]/x.mp4", "not allowed"),
        ("https://10.0.0.7/x.mp4", "not allowed"),
        ("https://localhost/x.mp4", "not allowed"),
        ("https://user:pw@storage.googleapis.com/x.mp4", "credentials"),
        ("https://storage.googleapis.com:8443/x.mp4", "default port"),
        ("https://example.org/x.mp4", "not allowed"),  # the wildcard does not cover the apex
    ],
)
def test_rejected_references(value, needle):
    error = resolve(value)
    assert isinstance(error, dict), error
    assert error["field"] == "video_url"
    assert needle in error["message"]


def test_https_on_allowed_hosts_passes_through_unchanged():
    url = "https://storage.googleapis.com/falserverless/bytedance-vid2pro/object-725.mp4?x=1"
    ref = resolve(url)
    assert isinstance(ref, MediaRef) and ref.kind == "https" and ref.url == url
    assert isinstance(resolve("https://cdn.a.example.org/x.mp4"), MediaRef)


def test_s3_same_bucket():
    ref = resolve("s3://b/inbox/other/clip.mp4")
    assert isinstance(ref, MediaRef) and ref.key == "inbox/other/clip.mp4"


def test_data_uris():
    png = b"\x89PNG\r\n\x1a\n...."
    payload = base64.b64encode(png).decode()
    ref = resolve(f"data:image/png;base64,{payload}", field="image_url")
    assert isinstance(ref, MediaRef) and ref.kind == "data" and ref.data == png
    assert ref.to_record()["kind"] == "s3"

    too_big = base64.b64encode(b"x" * 1001).decode()
    assert "at most 1,000 bytes" in resolve(f"data:video/mp4;base64,{too_big}")["message"]  # type: ignore[index]
    huge = "data:video/mp4;base64," + "A" * 100_000
    assert "of more than 1,000 bytes" in resolve(huge)["message"]  # type: ignore[index]
    assert "must be a image/*" in resolve(f"data:video/mp4;base64,{payload}", field="image_url")["message"]  # type: ignore[index]
    assert "not valid" in resolve("data:video/mp4;base64,@@@")["message"]  # type: ignore[index]
    assert "malformed" in resolve("data:nonsense")["message"]  # type: ignore[index]

    text = base64.b64encode(b"hello world, not a picture").decode()
    assert (
        "does not look like an image"
        in resolve(f"data:image/png;base64,{text}", field="image_url")["message"]
    )  # type: ignore[index]


@pytest.mark.parametrize(
    ("field", "head", "ok"),
    [
        ("video_url", b"\x00\x00\x00\x20ftypisom", True),
        ("video_url", b"\x1a\x45\xdf\xa3\x00", True),
        ("video_url", b"RIFF\x00\x00\x00\x00AVI LIST", True),
        ("video_url", b"GIF89a....", True),
        ("video_url", b"\x89PNG\r\n\x1a\n", False),
        ("video_url", b"<!DOCTYPE html>", False),
        ("image_url", b"\xff\xd8\xff\xe0JFIF", True),
        ("image_url", b"RIFF\x00\x00\x00\x00WEBPVP8 ", True),
        ("image_url", b"\x00\x00\x00\x1cftypavif", True),
        ("image_url", b"\x00\x00\x00\x1cftypisom", False),
        ("image_url", b"", False),
    ],
)
def test_sniffing(field, head, ok):
    from vap_shared.media import sniff

    assert (sniff(field, head) is None) == ok
