"""Ingest's media structure check (vap_shared.media_probe): intact media pass, truncated or damaged
ones get one line naming the field, and an S3 object is read in a few small ranges, not whole."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import boto3
import pytest
from media_kit import box, mp4, png
from moto import mock_aws
from vap_shared.contract import MAX_SOURCE_FRAMES
from vap_shared.media_probe import media_problem
from vap_shared.media_source import (
    MAX_PROBE_GETS,
    BytesSource,
    ProbeBudgetExceeded,
    S3RangeSource,
    SourceChanged,
)
from vap_shared.mp4_probe import check_mp4

from local_stack.media import synth_image, synth_mp4

SHARED_MEDIA = Path(__file__).resolve().parents[2] / ".." / "shared" / "media"
needs_shared = pytest.mark.skipif(not SHARED_MEDIA.is_dir(), reason="../shared/media is not here")


def problem(field: str, data: bytes) -> str | None:
    return media_problem(field, BytesSource(data))


@pytest.fixture(scope="module")
def encoded() -> dict[str, bytes]:
    """Real encoder output (imageio-ffmpeg's ffmpeg), small."""
    return {
        "mp4": synth_mp4(width=64, height=48, frames=9),
        "png": synth_image(width=64, height=48),
        "jpg": synth_image(width=64, height=48, suffix=".jpg"),
        "webp": synth_image(width=64, height=48, suffix=".webp"),
    }


def _no_faststart(data: bytes) -> bytes:
    """The same MP4 with `moov` moved after `mdat` (how a camera or a plain ffmpeg run writes it)."""
    from vap_shared.mp4_probe import top_level_boxes

    boxes = top_level_boxes(BytesSource(data))
    parts = {b.name: data[b.offset : b.end] for b in boxes}
    moov, mdat = parts["moov"], parts["mdat"]
    # Chunk offsets point into mdat: shift them by how far mdat moves forward (moov no longer before it).
    shift = -len(moov)
    out = bytearray(moov)
    pos = out.find(b"stco")
    (count,) = struct.unpack_from(">I", out, pos + 8)
    for i in range(count):
        at = pos + 12 + 4 * i
        (offset,) = struct.unpack_from(">I", out, at)
        struct.pack_into(">I", out, at, offset + shift)
    head = b"".join(v for k, v in parts.items() if k not in ("moov", "mdat"))
    return head + mdat + bytes(out)


# ---------------------------------------------------------------------------------------------- intact


def test_encoded_media_pass_and_their_facts_are_read(encoded: dict[str, bytes]) -> None:
    facts = check_mp4(BytesSource(encoded["mp4"]))
    assert (facts.width, facts.height, facts.frames, facts.codec) == (64, 48, 9, "avc1")
    assert facts.duration_s == pytest.approx(9 / 16)
    assert problem("video_url", encoded["mp4"]) is None
    for kind in ("png", "jpg", "webp"):
        assert problem("image_url", encoded[kind]) is None, kind


def test_moov_after_mdat_passes(encoded: dict[str, bytes]) -> None:
    late = _no_faststart(encoded["mp4"])
    assert check_mp4(BytesSource(late)).frames == 9
    assert check_mp4(BytesSource(mp4(moov_first=False))).frames == 3


@needs_shared
def test_the_reference_video_and_images_pass() -> None:
    video = (SHARED_MEDIA / "man-534.mp4").read_bytes()
    facts = check_mp4(BytesSource(video))
    assert (facts.width, facts.height, facts.frames) == (1200, 768, 129)
    assert problem("video_url", video) is None
    for name in ("woman-7.jpg", "animal-2.jpg"):
        assert problem("image_url", (SHARED_MEDIA / name).read_bytes()) is None, name


# ---------------------------------------------------------------------------------------------- truncated


@pytest.mark.parametrize("keep", [0.5, 0.99])
def test_a_truncated_mp4_names_the_field_and_the_cut(encoded: dict[str, bytes], keep: float) -> None:
    data = encoded["mp4"]
    cut = data[: int(len(data) * keep)]
    message = problem("video_url", cut)
    assert message is not None and message.startswith("`video_url`: the MP4 is truncated")
    assert f"the file has {len(cut):,} bytes" in message and "\n" not in message


def test_an_mp4_cut_before_its_late_moov_has_no_moov(encoded: dict[str, bytes]) -> None:
    late = _no_faststart(encoded["mp4"])
    moov_at = late.find(b"moov") - 4
    assert problem("video_url", late[:moov_at]) == (
        "`video_url`: the MP4 has no moov box, the index of its frames (truncated upload?)."
    )
    assert "its `moov` box runs to byte" in (problem("video_url", late[: moov_at + 40]) or "")


@needs_shared
def test_the_reference_video_truncated() -> None:
    video = (SHARED_MEDIA / "man-534.mp4").read_bytes()
    for size in (100, len(video) // 2, len(video) - 1):
        assert "truncated" in (problem("video_url", video[:size]) or ""), size


def test_frames_beyond_the_end_of_a_zero_sized_mdat() -> None:
    """An `mdat` of size 0 runs "to the end of the file", so only the frame index shows the cut."""
    data = bytearray(mp4(frames=3, frame_bytes=600))
    at = data.find(b"mdat") - 4
    struct.pack_into(">I", data, at, 0)
    assert problem("video_url", bytes(data)) is None
    message = problem("video_url", bytes(data[:-100]))
    assert message is not None and "its video frames run to byte" in message


def test_truncated_images(encoded: dict[str, bytes]) -> None:
    assert "the PNG is truncated" in (problem("image_url", encoded["png"][:-6]) or "")
    assert "the WebP is truncated" in (problem("image_url", encoded["webp"][:-6]) or "")
    assert "the JPEG ends before its image data" in (problem("image_url", encoded["jpg"][:120]) or "")


@needs_shared
def test_the_reference_jpeg_cut_in_its_headers() -> None:
    image = (SHARED_MEDIA / "animal-2.jpg").read_bytes()
    assert "the JPEG ends before its image data" in (problem("image_url", image[:1000]) or "")


# ---------------------------------------------------------------------------------------------- damaged


def test_no_video_track() -> None:
    assert problem("video_url", mp4(handler=b"soun")) == "`video_url`: the MP4 has no video track."


def test_no_frames() -> None:
    assert problem("video_url", mp4(frames=0)) == "`video_url`: the MP4's video track has no frames."


def test_too_many_frames_is_refused_before_a_gpu_decodes_it() -> None:
    message = problem("video_url", mp4(frames=MAX_SOURCE_FRAMES + 1, frame_bytes=1))
    assert message is not None and f"has {MAX_SOURCE_FRAMES + 1:,} frames; at most" in message
    assert problem("video_url", mp4(frames=MAX_SOURCE_FRAMES, frame_bytes=1)) is None


def test_no_picture_size() -> None:
    assert "has no picture size" in (problem("video_url", mp4(width=0)) or "")


def test_garbage_after_the_first_box(encoded: dict[str, bytes]) -> None:
    data = bytearray(encoded["mp4"])
    ftyp_size = struct.unpack_from(">I", data, 0)[0]
    data[ftyp_size + 4 : ftyp_size + 8] = b"\x00\x01\x02\x03"
    assert "box structure is broken at byte" in (problem("video_url", bytes(data)) or "")


def test_an_inner_box_running_past_moov() -> None:
    data = bytearray(mp4())
    at = data.find(b"trak") - 4
    struct.pack_into(">I", data, at, 1 << 20)
    assert "the MP4's `moov` box is damaged" in (problem("video_url", bytes(data)) or "")


def test_an_only_ftyp_file_is_not_a_video() -> None:
    assert "has no moov box" in (problem("video_url", box(b"ftyp", b"isom", bytes(4))) or "")


def test_damaged_png_header() -> None:
    data = bytearray(png())
    data[20] ^= 0xFF  # inside IHDR's width: the CRC no longer matches
    assert "IHDR header is damaged" in (problem("image_url", bytes(data)) or "")


def test_image_too_large_for_the_gpu() -> None:
    message = problem("image_url", png(width=10_000, height=8_000, pixels=False))
    assert message is not None and "80.0 megapixels" in message and message.startswith("`image_url`:")


def test_a_jpeg_without_a_frame_header() -> None:
    # SOI, then straight to the image data (SOS) with no SOF before it.
    sos = b"\xff\xda" + struct.pack(">H", 8) + bytes(6)
    assert "no frame header (SOF)" in (problem("image_url", b"\xff\xd8" + sos + b"\x00" * 64) or "")


def test_formats_without_a_structure_check_pass() -> None:
    webm = b"\x1a\x45\xdf\xa3" + bytes(60)
    assert problem("video_url", webm) is None
    assert problem("image_url", b"BM" + bytes(60)) is None


def test_the_coarse_sniff_still_answers_first() -> None:
    assert "does not look like a video" in (problem("video_url", b"<html>Access denied</html>") or "")
    assert problem("video_url", b"") == "`video_url`: the file is empty (0 bytes)."


# ---------------------------------------------------------------------------------------------- reading S3


class CountingS3:
    def __init__(self, client: Any) -> None:
        self.client = client
        self.ranges: list[str] = []

    def get_object(self, **kwargs: Any) -> Any:
        self.ranges.append(kwargs["Range"])
        return self.client.get_object(**kwargs)


@pytest.fixture
def s3(monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    with mock_aws():
        client = boto3.client("s3", region_name="us-east-1")
        client.create_bucket(Bucket="probe-bucket")
        yield client


def _source(s3: Any, data: bytes) -> tuple[S3RangeSource, CountingS3]:
    etag = s3.put_object(Bucket="probe-bucket", Key="inbox/v.mp4", Body=data)["ETag"]
    counting = CountingS3(s3)
    return S3RangeSource(counting, "probe-bucket", "inbox/v.mp4", len(data), etag), counting


def test_a_large_video_is_judged_from_a_few_small_ranges(s3: Any) -> None:
    big = mp4(frames=40, frame_bytes=100_000)  # ~4 MB, moov first
    source, counting = _source(s3, big)
    assert media_problem("video_url", source) is None
    assert len(counting.ranges) == 1 and source.fetched <= 64 * 1024
    late = mp4(frames=40, frame_bytes=100_000, moov_first=False)
    source, counting = _source(s3, late)
    assert media_problem("video_url", source) is None
    assert len(counting.ranges) == 2 and source.fetched <= 2 * 64 * 1024  # the head, then the tail


def test_a_replaced_object_is_noticed(s3: Any) -> None:
    source, _ = _source(s3, mp4())
    s3.put_object(Bucket="probe-bucket", Key="inbox/v.mp4", Body=mp4(frames=4))
    with pytest.raises(SourceChanged):
        media_problem("video_url", source)


def test_the_read_budget_bounds_a_probe() -> None:
    many = b"".join(box(b"free", bytes(70_000)) for _ in range(MAX_PROBE_GETS + 2))

    class Spread(BytesSource):
        def __init__(self, data: bytes) -> None:
            super().__init__(data)
            self.reads = 0

        def read(self, offset: int, length: int) -> bytes:
            self.reads += 1
            if self.reads > MAX_PROBE_GETS:
                raise ProbeBudgetExceeded("test")
            return super().read(offset, length)

    assert media_problem("video_url", Spread(box(b"ftyp", b"isom", bytes(4)) + many)) is None
