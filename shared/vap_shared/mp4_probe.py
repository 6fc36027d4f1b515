"""An MP4/MOV (ISO-BMFF) video's structure, checked without a decoder.

What a truncated or damaged upload gets wrong shows in the boxes: a top-level box (usually `mdat`)
runs past the end of the file, `moov` (the index of every frame) is missing or cut off, there is no
video track, or the track's frames lie beyond the file's end. Reading the top-level box headers and
the `moov` box is enough to see all of these; the frame data itself is never read.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from .contract import MAX_SOURCE_FRAMES  # the GPU side refuses the same
from .media_source import ByteSource, MediaDamaged, ProbeBudgetExceeded

# Top-level boxes walked before giving up (a fragmented file has two per fragment).
MAX_TOP_LEVEL_BOXES = 64
# A `moov` larger than this is not read (hours of video); the file is left to the GPU side.
MAX_MOOV_BYTES = 16 * 1024 * 1024
_CONTAINERS = frozenset({b"moov", b"trak", b"mdia", b"minf", b"stbl", b"mvex"})
_ENCRYPTED = frozenset({b"encv", b"drmi"})


@dataclass(frozen=True)
class Box:
    kind: bytes
    offset: int
    size: int
    header: int

    @property
    def name(self) -> str:
        return self.kind.decode("latin-1")

    @property
    def end(self) -> int:
        return self.offset + self.size


@dataclass(frozen=True)
class VideoFacts:
    width: int
    height: int
    frames: int | None  # None: a fragmented file (its frames are counted per fragment, not here)
    duration_s: float | None
    codec: str
    fragmented: bool


def _printable(kind: bytes) -> bool:
    return all(0x20 <= b <= 0x7E for b in kind) or kind == b"\xa9too"


def top_level_boxes(src: ByteSource) -> list[Box]:
    """Every top-level box, each checked to lie inside the file."""
    boxes: list[Box] = []
    offset = 0
    while offset < src.size:
        if len(boxes) >= MAX_TOP_LEVEL_BOXES:
            raise ProbeBudgetExceeded(f"more than {MAX_TOP_LEVEL_BOXES} top-level boxes")
        head = src.read(offset, 16)
        if not any(head[:8]):
            break  # zero padding after the last box (some muxers write it)
        if len(head) < 8:
            raise MediaDamaged(f"the MP4 ends inside a box header at byte {offset:,} (truncated upload?)")
        size32, kind = struct.unpack(">I4s", head[:8])
        if not _printable(kind):
            raise MediaDamaged(f"the MP4's box structure is broken at byte {offset:,} (damaged file?)")
        header = 8
        if size32 == 1:
            if len(head) < 16:
                raise MediaDamaged(f"the MP4 ends inside a box header at byte {offset:,} (truncated upload?)")
            (size,) = struct.unpack(">Q", head[8:16])
            header = 16
        elif size32 == 0:
            size = src.size - offset  # "to the end of the file"
        else:
            size = size32
        box = Box(kind, offset, size, header)
        if size < header:
            raise MediaDamaged(
                f"the MP4's `{box.name}` box at byte {offset:,} has an impossible size ({size:,})"
            )
        if box.end > src.size:
            raise MediaDamaged(
                f"the MP4 is truncated: its `{box.name}` box runs to byte {box.end:,} but the file has "
                f"{src.size:,} bytes (incomplete upload?)"
            )
        boxes.append(box)
        offset = box.end
    return boxes


def _children(data: bytes, start: int, end: int, parent: str) -> list[tuple[bytes, int, int]]:
    """(kind, payload start, payload end) of the boxes in data[start:end]."""
    found: list[tuple[bytes, int, int]] = []
    pos = start
    while pos + 8 <= end:
        size, kind = struct.unpack_from(">I4s", data, pos)
        header = 8
        if size == 1:
            if pos + 16 > end:
                break
            (size,) = struct.unpack_from(">Q", data, pos + 8)
            header = 16
        elif size == 0:
            size = end - pos
        if size < header or pos + size > end:
            raise MediaDamaged(
                f"the MP4's `{parent}` box is damaged: its `{kind.decode('latin-1')}` box runs past it "
                "(damaged file?)"
            )
        found.append((kind, pos + header, pos + size))
        pos += size
    return found


def _child(data: bytes, start: int, end: int, kind: bytes, parent: str) -> tuple[int, int] | None:
    for k, s, e in _children(data, start, end, parent):
        if k == kind:
            return s, e
    return None


@dataclass
class _Track:
    handler: bytes = b""
    codec: str = ""
    width: int = 0
    height: int = 0
    timescale: int = 0
    duration: int = 0
    sample_count: int = 0
    sample_size: int = 0  # one size for every sample (0: the per-sample table)
    sizes: tuple[int, ...] = ()
    chunk_offsets: tuple[int, ...] = ()
    chunk_runs: tuple[tuple[int, int], ...] = ()  # (first chunk, samples per chunk), 1-based
    stts_ticks: int = 0


def _u32s(data: bytes, pos: int, count: int, end: int, what: str) -> tuple[int, ...]:
    if count < 0 or pos + 4 * count > end:
        raise MediaDamaged(f"the MP4's {what} table is cut short (damaged file?)")
    return struct.unpack_from(f">{count}I", data, pos)


def _parse_track(data: bytes, start: int, end: int) -> _Track:
    track = _Track()
    mdia = _child(data, start, end, b"mdia", "trak")
    if mdia is None:
        return track
    hdlr = _child(data, *mdia, b"hdlr", "mdia")
    if hdlr and hdlr[1] - hdlr[0] >= 12:
        track.handler = data[hdlr[0] + 8 : hdlr[0] + 12]
    mdhd = _child(data, *mdia, b"mdhd", "mdia")
    if mdhd:
        version = data[mdhd[0]]
        if version == 1 and mdhd[1] - mdhd[0] >= 32:
            track.timescale, track.duration = struct.unpack_from(">IQ", data, mdhd[0] + 20)
        elif mdhd[1] - mdhd[0] >= 20:
            track.timescale, track.duration = struct.unpack_from(">II", data, mdhd[0] + 12)
    minf = _child(data, *mdia, b"minf", "mdia")
    stbl = _child(data, *minf, b"stbl", "minf") if minf else None
    if stbl is None:
        return track
    for kind, s, e in _children(data, *stbl, "stbl"):
        if kind == b"stsd" and e - s >= 16:
            entry = s + 8
            track.codec = data[entry + 4 : entry + 8].decode("latin-1")
            if e - entry >= 36:
                track.width, track.height = struct.unpack_from(">HH", data, entry + 32)
        elif kind == b"stsz" and e - s >= 12:
            track.sample_size, track.sample_count = struct.unpack_from(">II", data, s + 4)
            if track.sample_size == 0:
                track.sizes = _u32s(data, s + 12, track.sample_count, e, "sample size")
        elif kind == b"stz2" and e - s >= 12:
            field_bits = data[s + 7]
            (track.sample_count,) = struct.unpack_from(">I", data, s + 8)
            track.sizes = _packed_sizes(data, s + 12, e, field_bits, track.sample_count)
        elif kind in (b"stco", b"co64") and e - s >= 8:
            (count,) = struct.unpack_from(">I", data, s + 4)
            if kind == b"stco":
                track.chunk_offsets = _u32s(data, s + 8, count, e, "chunk offset")
            else:
                if s + 8 + 8 * count > e:
                    raise MediaDamaged("the MP4's chunk offset table is cut short (damaged file?)")
                track.chunk_offsets = struct.unpack_from(f">{count}Q", data, s + 8)
        elif kind == b"stsc" and e - s >= 8:
            (count,) = struct.unpack_from(">I", data, s + 4)
            flat = _u32s(data, s + 8, 3 * count, e, "sample-to-chunk")
            track.chunk_runs = tuple((flat[i], flat[i + 1]) for i in range(0, len(flat), 3))
        elif kind == b"stts" and e - s >= 8:
            (count,) = struct.unpack_from(">I", data, s + 4)
            flat = _u32s(data, s + 8, 2 * count, e, "time-to-sample")
            track.stts_ticks = sum(flat[i] * flat[i + 1] for i in range(0, len(flat), 2))
    return track


def _packed_sizes(data: bytes, pos: int, end: int, bits: int, count: int) -> tuple[int, ...]:
    if bits not in (4, 8, 16):
        raise MediaDamaged("the MP4's compact sample size table is damaged (damaged file?)")
    need = (count * bits + 7) // 8
    if pos + need > end:
        raise MediaDamaged("the MP4's sample size table is cut short (damaged file?)")
    if bits == 16:
        return struct.unpack_from(f">{count}H", data, pos)
    if bits == 8:
        return tuple(data[pos : pos + count])
    nibbles = [n for b in data[pos : pos + need] for n in (b >> 4, b & 0xF)]
    return tuple(nibbles[:count])


def _frames_end(track: _Track) -> int:
    """The byte just after the track's last frame, from its chunk offsets and sample sizes."""
    runs = [r for r in track.chunk_runs if r[0] >= 1]
    if not runs or not track.chunk_offsets:
        raise MediaDamaged("the MP4's video track does not say where its frames are (damaged file?)")
    end = 0
    sample = 0
    run = 0
    for chunk, offset in enumerate(track.chunk_offsets, start=1):
        while run + 1 < len(runs) and runs[run + 1][0] <= chunk:
            run += 1
        per_chunk = runs[run][1]
        count = min(per_chunk, track.sample_count - sample)
        if count <= 0:
            break
        size = track.sample_size * count if track.sample_size else sum(track.sizes[sample : sample + count])
        end = max(end, offset + size)
        sample += count
    return end


def check_mp4(src: ByteSource) -> VideoFacts:
    """Raises `MediaDamaged` (what is wrong, in words) or `ProbeBudgetExceeded` (not judged)."""
    boxes = top_level_boxes(src)
    moov = next((b for b in boxes if b.kind == b"moov"), None)
    if moov is None:
        raise MediaDamaged("the MP4 has no moov box, the index of its frames (truncated upload?)")
    if moov.size > MAX_MOOV_BYTES:
        raise ProbeBudgetExceeded(f"a {moov.size:,}-byte moov box")
    data = src.read(moov.offset, moov.size)
    if len(data) < moov.size:
        raise MediaDamaged("the MP4 is truncated inside its moov box (incomplete upload?)")
    children = _children(data, moov.header, moov.size, "moov")
    if any(kind == b"cmov" for kind, _s, _e in children):
        raise ProbeBudgetExceeded("a compressed moov box")
    fragmented = any(kind == b"mvex" for kind, _s, _e in children)
    tracks = [_parse_track(data, s, e) for kind, s, e in children if kind == b"trak"]
    video = [t for t in tracks if t.handler == b"vide"]
    if not video:
        raise MediaDamaged("the MP4 has no video track")
    track = max(video, key=lambda t: t.sample_count)
    if track.codec.encode("latin-1") in _ENCRYPTED:
        raise MediaDamaged("the MP4's video is encrypted (DRM); upload an unprotected copy")
    if track.width == 0 or track.height == 0:
        raise MediaDamaged("the MP4's video track has no picture size (damaged file?)")
    frames: int | None = track.sample_count
    if fragmented:
        if not any(b.kind == b"moof" for b in boxes) and track.sample_count == 0:
            raise MediaDamaged("the fragmented MP4 has no fragments, so no frames (truncated upload?)")
        frames = None
    else:
        if track.sample_count == 0:
            raise MediaDamaged("the MP4's video track has no frames")
        if track.sample_count > MAX_SOURCE_FRAMES:
            raise MediaDamaged(
                f"the video has {track.sample_count:,} frames; at most {MAX_SOURCE_FRAMES:,} are accepted "
                "(60 s at 60 fps): trim it"
            )
        end = _frames_end(track)
        if end > src.size:
            raise MediaDamaged(
                f"the MP4 is truncated: its video frames run to byte {end:,} but the file has "
                f"{src.size:,} bytes (incomplete upload?)"
            )
    ticks = track.stts_ticks or track.duration
    duration = ticks / track.timescale if track.timescale and ticks else None
    return VideoFacts(track.width, track.height, frames, duration, track.codec, fragmented)
