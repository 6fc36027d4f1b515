"""Ingest's cheap media check: is an input's structure intact, before a GPU is paid to decode it?

The Lambda layer has no decoder (no ffmpeg), so nothing is decoded: the format comes from the first
bytes (`media.sniff`), then the container or header is read through a `ByteSource` (a few ranged
GETs): MP4/MOV boxes (`mp4_probe`), PNG/JPEG/WebP/GIF headers (`image_probe`). A problem is one
line naming the field, e.g. "`video_url`: the MP4 has no moov box, the index of its frames
(truncated upload?)." Formats without a check here (WebM, AVI, MPEG-TS, BMP, TIFF, AVIF...) and
files a probe cannot judge within its read budget pass; the GPU side decodes them.
"""

from __future__ import annotations

from aws_lambda_powertools import Logger

from .image_probe import ImageFacts, check_gif, check_jpeg, check_png, check_webp
from .media import sniff
from .media_source import ByteSource, MediaDamaged, ProbeBudgetExceeded
from .mp4_probe import VideoFacts, check_mp4

logger = Logger(child=True)

SNIFF_BYTES = 64
_ISO_BMFF = (b"ftyp", b"moov", b"mdat", b"free", b"wide", b"skip", b"pnot")


def media_problem(field: str, src: ByteSource) -> str | None:
    """The one-line problem with the medium at `src` for `field` (`video_url`/`image_url`), or None."""
    if src.size == 0:
        return f"`{field}`: the file is empty (0 bytes)."
    head = src.read(0, SNIFF_BYTES)
    problem = sniff(field, head)
    if problem:
        return problem
    try:
        check(field, head, src)
    except MediaDamaged as exc:
        return f"`{field}`: {exc}."
    except ProbeBudgetExceeded as exc:
        logger.info("media not checked at ingest", extra={"field": field, "reason": str(exc)})
    return None


def check(field: str, head: bytes, src: ByteSource) -> VideoFacts | ImageFacts | None:
    """What the structure says (None: a format not looked into); raises `MediaDamaged` or
    `ProbeBudgetExceeded`. `head` is the file's first bytes."""
    if field == "video_url":
        if head[4:8] in _ISO_BMFF:
            return check_mp4(src)
        if head.startswith((b"GIF87a", b"GIF89a")):
            return check_gif(src)
        return None
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return check_png(src)
    if head.startswith(b"\xff\xd8\xff"):
        return check_jpeg(src)
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return check_webp(src)
    if head.startswith((b"GIF87a", b"GIF89a")):
        return check_gif(src)
    return None
