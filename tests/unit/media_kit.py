"""Test media: structurally complete MP4s and images built byte by byte (no encoder), so the unit
tests' uploads pass ingest's structure check, and variants of them with one thing broken.

The MP4s have every box ingest reads (ftyp, moov with a video track's sample tables, mdat holding
the frames) but their frames are filler bytes: the fake GPU never decodes them. Real encoded media
come from `local_stack.media` (imageio-ffmpeg's ffmpeg) in the probe tests.
"""

from __future__ import annotations

import struct
import zlib


def box(kind: bytes, *parts: bytes) -> bytes:
    payload = b"".join(parts)
    return struct.pack(">I4s", 8 + len(payload), kind) + payload


def full_box(kind: bytes, version: int, *parts: bytes) -> bytes:
    return box(kind, bytes([version, 0, 0, 0]), *parts)


def _video_track(width: int, height: int, sizes: list[int], first_offset: int, handler: bytes) -> bytes:
    entry = box(
        b"avc1",
        bytes(6),
        struct.pack(">H", 1),
        bytes(16),
        struct.pack(">HH", width, height),
        struct.pack(">II", 0x00480000, 0x00480000),
        bytes(4),
        struct.pack(">H", 1),
        bytes(32),
        struct.pack(">Hh", 0x18, -1),
    )
    stbl = box(
        b"stbl",
        full_box(b"stsd", 0, struct.pack(">I", 1), entry),
        full_box(b"stts", 0, struct.pack(">III", 1, len(sizes), 512)),
        full_box(b"stsc", 0, struct.pack(">IIII", 1, 1, len(sizes), 1)),
        full_box(b"stsz", 0, struct.pack(">II", 0, len(sizes)), struct.pack(f">{len(sizes)}I", *sizes)),
        full_box(b"stco", 0, struct.pack(">II", 1, first_offset)),
    )
    minf = box(b"minf", full_box(b"vmhd", 0, bytes(8)), stbl)
    mdia = box(
        b"mdia",
        full_box(b"mdhd", 0, struct.pack(">IIII", 0, 0, 8192, 512 * len(sizes)), bytes(4)),
        full_box(b"hdlr", 0, bytes(4), handler, bytes(12), b"VideoHandler\x00"),
        minf,
    )
    size = struct.pack(">II", width << 16, height << 16)
    tkhd = full_box(b"tkhd", 0, bytes(20), bytes(8), bytes(8), bytes(36), size)
    return box(b"trak", tkhd, mdia)


def mp4(
    width: int = 64,
    height: int = 48,
    frames: int = 3,
    frame_bytes: int = 600,
    *,
    moov_first: bool = True,
    handler: bytes = b"vide",
) -> bytes:
    """A structurally complete MP4: `frames` frames of `frame_bytes` filler bytes each."""
    sizes = [frame_bytes] * frames
    ftyp = box(b"ftyp", b"isom", struct.pack(">I", 0x200), b"isomiso2avc1mp41")
    mdat_payload = bytes(range(256)) * (sum(sizes) // 256) + bytes(sum(sizes) % 256)

    def moov(offset: int) -> bytes:
        mvhd = full_box(b"mvhd", 0, struct.pack(">IIII", 0, 0, 1000, 1000), bytes(80))
        return box(b"moov", mvhd, _video_track(width, height, sizes, offset, handler))

    if moov_first:
        probe = moov(0)
        offset = len(ftyp) + len(probe) + 8
        return ftyp + moov(offset) + box(b"mdat", mdat_payload)
    offset = len(ftyp) + 8
    return ftyp + box(b"mdat", mdat_payload) + moov(offset)


def png(width: int = 8, height: int = 8, *, pixels: bool = True) -> bytes:
    """A valid 8-bit greyscale PNG (`pixels=False`: its header and end only, for sizes too big to
    fill in a test)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = b""
    if pixels:
        rows = b"".join(b"\x00" + bytes((x * 7 + y) % 256 for x in range(width)) for y in range(height))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    body = chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + body
