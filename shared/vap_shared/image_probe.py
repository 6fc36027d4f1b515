"""An image's header checked without a decoder: format, picture size, and, where the format says
where it ends, that the file is complete.

PNG: the IHDR chunk (CRC-checked) and the IEND chunk at the end. JPEG: the frame header (SOF) and
the start of the image data (SOS) inside the file; its end is not checked (phones append data after
the image, e.g. motion photos). WebP: the RIFF size against the file size and the VP8/VP8L/VP8X
picture size. GIF: the screen size. Other image formats pass (the GPU side decodes them).
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

from .contract import MAX_IMAGE_PIXELS  # the GPU side refuses the same
from .media_source import ByteSource, MediaDamaged, ProbeBudgetExceeded

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_IEND = b"\x00\x00\x00\x00IEND\xaeB`\x82"
# Bytes after IEND that are still accepted (some tools append a little).
_PNG_TAIL = 4096
_PNG_DEPTHS = {0: (1, 2, 4, 8, 16), 2: (8, 16), 3: (1, 2, 4, 8), 4: (8, 16), 6: (8, 16)}
# JPEG frame headers: every SOFn but DHT (C4), JPG (C8) and DAC (CC).
_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_JPEG_STANDALONE = frozenset({0x01, *range(0xD0, 0xD8)})
MAX_JPEG_SEGMENTS = 128


@dataclass(frozen=True)
class ImageFacts:
    format: str
    width: int
    height: int


def _sized(fmt: str, width: int, height: int) -> ImageFacts:
    if width <= 0 or height <= 0:
        raise MediaDamaged(f"the {fmt} has no picture size ({width}×{height}; damaged file?)")
    if width * height > MAX_IMAGE_PIXELS:
        raise MediaDamaged(
            f"the {fmt} is {width:,}×{height:,} ({width * height / 1e6:.1f} megapixels); at most "
            f"{MAX_IMAGE_PIXELS / 1e6:.0f} megapixels are accepted"
        )
    return ImageFacts(fmt, width, height)


def check_png(src: ByteSource) -> ImageFacts:
    head = src.read(0, 33)
    length, kind = struct.unpack(">I4s", head[8:16]) if len(head) >= 16 else (0, b"")
    if len(head) < 33 or kind != b"IHDR" or length != 13:
        raise MediaDamaged("the PNG has no IHDR header (damaged or truncated file?)")
    width, height, depth, color = struct.unpack(">IIBB", head[16:26])
    if zlib.crc32(head[12:29]) != struct.unpack(">I", head[29:33])[0]:
        raise MediaDamaged("the PNG's IHDR header is damaged (its checksum does not match)")
    if depth not in _PNG_DEPTHS.get(color, ()):
        raise MediaDamaged(f"the PNG's IHDR header is damaged (colour type {color}, bit depth {depth})")
    facts = _sized("PNG", width, height)
    tail_start = max(33, src.size - _PNG_TAIL)
    if _PNG_IEND not in src.read(tail_start, src.size - tail_start):
        raise MediaDamaged("the PNG is truncated: it has no IEND chunk at its end (incomplete upload?)")
    return facts


def check_jpeg(src: ByteSource) -> ImageFacts:
    pos = 2  # after SOI
    facts: ImageFacts | None = None
    for _ in range(MAX_JPEG_SEGMENTS):
        marker = src.read(pos, 4)
        while len(marker) >= 2 and marker[0] == 0xFF and marker[1] == 0xFF:  # fill bytes
            pos += 1
            marker = src.read(pos, 4)
        if len(marker) < 2:
            raise MediaDamaged("the JPEG ends before its image data (truncated upload?)")
        if marker[0] != 0xFF:
            raise MediaDamaged(f"the JPEG's structure is broken at byte {pos:,} (damaged file?)")
        code = marker[1]
        if code in _JPEG_STANDALONE:
            pos += 2
            continue
        if code == 0xD9:
            raise MediaDamaged("the JPEG ends before its image data (damaged file?)")
        if len(marker) < 4:
            raise MediaDamaged("the JPEG ends before its image data (truncated upload?)")
        (length,) = struct.unpack(">H", marker[2:4])
        if length < 2:
            raise MediaDamaged(f"the JPEG's structure is broken at byte {pos:,} (damaged file?)")
        if code in _SOF:
            segment = src.read(pos + 4, 5)
            if len(segment) < 5:
                raise MediaDamaged("the JPEG ends inside its frame header (truncated upload?)")
            height, width = struct.unpack(">HH", segment[1:5])
            facts = _sized("JPEG", width, height)
        if code == 0xDA:  # start of scan: the image data follows this header
            if facts is None:
                raise MediaDamaged("the JPEG has no frame header (SOF) before its image data (damaged file?)")
            if pos + 2 + length >= src.size:
                raise MediaDamaged("the JPEG ends before its image data (truncated upload?)")
            return facts
        pos += 2 + length
    raise ProbeBudgetExceeded(f"more than {MAX_JPEG_SEGMENTS} JPEG segments before the image data")


def check_webp(src: ByteSource) -> ImageFacts:
    head = src.read(0, 30)
    if len(head) < 30:
        raise MediaDamaged("the WebP ends inside its header (truncated upload?)")
    (riff_size,) = struct.unpack("<I", head[4:8])
    if riff_size + 8 > src.size:
        raise MediaDamaged(
            f"the WebP is truncated: its header says {riff_size + 8:,} bytes but the file has "
            f"{src.size:,} (incomplete upload?)"
        )
    chunk = head[12:16]
    data = head[20:30]
    if chunk == b"VP8 ":
        if data[3:6] != b"\x9d\x01\x2a":
            raise MediaDamaged("the WebP's VP8 frame header is damaged (damaged file?)")
        width, height = (v & 0x3FFF for v in struct.unpack("<HH", data[6:10]))
    elif chunk == b"VP8L":
        if data[0] != 0x2F:
            raise MediaDamaged("the WebP's VP8L header is damaged (damaged file?)")
        (bits,) = struct.unpack("<I", data[1:5])
        width, height = (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    elif chunk == b"VP8X":
        width = int.from_bytes(data[4:7], "little") + 1
        height = int.from_bytes(data[7:10], "little") + 1
    else:
        raise MediaDamaged(f"the WebP has no image chunk (found {chunk!r}; damaged file?)")
    return _sized("WebP", width, height)


def check_gif(src: ByteSource) -> ImageFacts:
    head = src.read(0, 10)
    if len(head) < 10:
        raise MediaDamaged("the GIF ends inside its header (truncated upload?)")
    width, height = struct.unpack("<HH", head[6:10])
    return _sized("GIF", width, height)
