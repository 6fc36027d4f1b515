"""Media in and out of the generation: decode, crop, sample, encode and probe.

Decoding and encoding use the ffmpeg binary bundled with `imageio-ffmpeg`, so the same code runs
on a laptop, in CI and in the Modal image without a system ffmpeg.
"""

from __future__ import annotations

import contextlib
import io
import re
import struct
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import imageio_ffmpeg
import numpy as np
from PIL import Image, ImageOps
from vap_shared.contract import MAX_IMAGE_PIXELS, MAX_SOURCE_FRAMES  # PIL's own bomb guard is per process

ENCODE_CRF = 18  # visually lossless-ish for generated video; the files stay a few MB


class MediaError(ValueError):
    """The input media cannot be used (corrupt, empty, unsupported, too large); the message is one
    line a user can act on (never a tool's whole output)."""


# What ffmpeg says about a broken input, most telling first (its output also holds its banner,
# build configuration and library versions).
_FFMPEG_TELLING = (
    "Error opening input:",
    "moov atom not found",
    "partial file",
    "Invalid data found",
    "corrupt",
    "Could not find codec parameters",
    "Invalid NAL unit",
    "Error splitting the input",
)
_FFMPEG_CONTEXT = re.compile(r"^\[[^\]]*@ 0x[0-9a-f]+\]\s*")
_TEMP_PATH = re.compile(r"/\S*vap-ref-\S*")


def ffmpeg_reason(output: str, limit: int = 160) -> str:
    """The one line of ffmpeg's output that says what is wrong with an input, without its context
    prefix (`[in#0/mov,mp4,... @ 0x...]`) and temporary paths."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    messages = [_FFMPEG_CONTEXT.sub("", line) for line in lines if _FFMPEG_CONTEXT.match(line)]
    telling = next((m for key in _FFMPEG_TELLING for m in messages if key in m), None)
    if telling is None and any("output file" in line for line in lines):
        # It opened the file but found nothing to map to the output: no usable video stream.
        telling = "no readable video stream"
    if telling is None:
        telling = messages[0] if messages else next((ln for ln in reversed(lines) if "rror" in ln), "")
    chosen = telling
    chosen = _TEMP_PATH.sub("the file", chosen.removeprefix("Error opening input: ")).strip()
    return (chosen or "ffmpeg could not read it")[:limit]


def _one_line(exc: BaseException, limit: int = 160) -> str:
    return " ".join(str(exc).split())[:limit] or type(exc).__name__


def ffmpeg_exe() -> str:
    return str(imageio_ffmpeg.get_ffmpeg_exe())


# --- geometry --------------------------------------------------------------------------------


def center_crop_box(src_w: int, src_h: int, dst_w: int, dst_h: int) -> tuple[int, int, int, int]:
    """The largest centred box of `src` with the aspect ratio `dst_w:dst_h` (left, top, right, bottom)."""
    if min(src_w, src_h, dst_w, dst_h) <= 0:
        raise MediaError(f"empty size: {src_w}x{src_h} -> {dst_w}x{dst_h}")
    # Compare aspect ratios in integers to avoid float ties flipping the branch.
    if src_w * dst_h > dst_w * src_h:  # source is wider: trim left and right
        crop_w, crop_h = max(1, round(src_h * dst_w / dst_h)), src_h
    else:  # source is taller (or equal): trim top and bottom
        crop_w, crop_h = src_w, max(1, round(src_w * dst_h / dst_w))
    left = (src_w - crop_w) // 2
    top = (src_h - crop_h) // 2
    return left, top, left + crop_w, top + crop_h


def fit_image(image: Image.Image, width: int, height: int) -> Image.Image:
    """Centre-crop to the target aspect, then resize: nothing is stretched (the reference stretches)."""
    box = center_crop_box(image.width, image.height, width, height)
    cropped = image.crop(box)
    if cropped.size == (width, height):
        return cropped
    return cropped.resize((width, height), Image.Resampling.LANCZOS)


def sample_indices(available: int, count: int) -> list[int]:
    """`count` evenly spaced indices over `available` frames (repeats when the video is short)."""
    if available <= 0:
        raise MediaError("the reference video has no frames")
    if count <= 0:
        raise ValueError("count must be positive")
    return [int(i) for i in np.round(np.linspace(0, available - 1, count)).astype(np.int64)]


# --- decoding --------------------------------------------------------------------------------


def load_image(data: bytes) -> Image.Image:
    """Decode an image (any PIL format), apply its EXIF rotation and return it as RGB."""
    try:
        with Image.open(io.BytesIO(data)) as probe:
            if probe.width * probe.height > MAX_IMAGE_PIXELS:
                raise MediaError(f"image too large: {probe.width}x{probe.height}")
            probe.load()
            image = ImageOps.exif_transpose(probe) or probe
            return image.convert("RGB")
    except MediaError:
        raise
    except Exception as exc:  # PIL raises many types for bad data
        raise MediaError(f"cannot decode the image: {_one_line(exc)}") from exc


def _frame_stream(path: Path) -> Iterator[tuple[int, int, bytes]]:
    """Yield (width, height, rgb24 bytes) for each decoded frame (rotation metadata applied)."""
    reader = imageio_ffmpeg.read_frames(str(path))
    meta = next(reader)
    width, height = (int(v) for v in meta["size"])
    try:
        for raw in reader:
            yield width, height, raw
    finally:
        reader.close()


def count_frames(path: Path) -> int:
    """Frame count of a video file (packet count of the first video stream, no decoding)."""
    frames, _ = imageio_ffmpeg.count_frames_and_secs(str(path))
    return int(frames)


def decode_sampled_frames(data: bytes, count: int, width: int, height: int) -> list[Image.Image]:
    """Decode a video, sample `count` frames evenly and fit each to `width`×`height`.

    Two passes (count packets, then decode keeping only the sampled frames) keep memory at
    `count` frames whatever the source length.
    """
    with tempfile.TemporaryDirectory(prefix="vap-ref-") as tmp:
        path = Path(tmp) / "reference"
        path.write_bytes(data)
        try:
            total = count_frames(path)
        except Exception as exc:
            raise MediaError(f"cannot read the reference video: {ffmpeg_reason(str(exc))}") from exc
        if total <= 0:
            raise MediaError("the reference video has no frames")
        if total > MAX_SOURCE_FRAMES:
            raise MediaError(f"the reference video has {total} frames; at most {MAX_SOURCE_FRAMES}")
        indices = sample_indices(total, count)
        wanted = set(indices)
        kept: dict[int, Image.Image] = {}
        decoded = 0
        try:
            for index, (w, h, raw) in enumerate(_frame_stream(path)):
                decoded = index + 1
                if index in wanted:
                    frame = Image.frombuffer("RGB", (w, h), raw, "raw", "RGB", 0, 1)
                    kept[index] = fit_image(frame, width, height)
        except Exception as exc:
            raise MediaError(f"cannot decode the reference video: {ffmpeg_reason(str(exc))}") from exc
    if not kept:
        raise MediaError("the reference video has no decodable frames")
    if decoded < total:
        # The packet count can exceed the decodable frames (e.g. a truncated file): resample
        # over what was decoded, using the frames already kept.
        available = sorted(kept)
        return [
            kept[available[min(range(len(available)), key=lambda j: abs(available[j] - i))]] for i in indices
        ]
    return [kept[i] for i in indices]


# --- encoding --------------------------------------------------------------------------------


def encode_mp4(frames: np.ndarray, fps: int, crf: int = ENCODE_CRF) -> bytes:
    """Encode uint8 RGB frames `[F, H, W, 3]` as MP4: H.264 (High), yuv420p, BT.709, `+faststart`.

    Exactly F frames at exactly `fps` (constant frame rate); width and height must be even
    (4:2:0 chroma subsampling).
    """
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected uint8 [F, H, W, 3], got {frames.dtype} {frames.shape}")
    num, height, width, _ = frames.shape
    if num < 1 or width % 2 or height % 2:
        raise ValueError(f"need at least one frame of even width and height, got {frames.shape}")
    with tempfile.TemporaryDirectory(prefix="vap-enc-") as tmp:
        out = Path(tmp) / "video.mp4"
        log = Path(tmp) / "ffmpeg.log"
        cmd = [
            ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-nostdin", "-y",
            "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{width}x{height}", "-framerate", str(fps),
            "-i", "pipe:0",
            "-an", "-c:v", "libx264", "-preset", "medium", "-crf", str(crf), "-profile:v", "high",
            # Convert with the BT.709 matrix and say so in the stream, so players don't guess.
            "-vf", "scale=out_color_matrix=bt709:out_range=tv,format=yuv420p",
            "-colorspace", "bt709", "-color_primaries", "bt709", "-color_trc", "bt709",
            "-color_range", "tv", "-pix_fmt", "yuv420p",
            "-fps_mode", "cfr", "-r", str(fps),  # same rate in and out: no dropped or duplicated frames
            "-movflags", "+faststart",  # moov before mdat: playback starts before the download ends
            str(out),
        ]  # fmt: skip
        with log.open("wb") as errors:
            proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stderr=errors)  # noqa: S603 (fixed argv)
            assert proc.stdin is not None
            try:
                for frame in frames:
                    proc.stdin.write(np.ascontiguousarray(frame).tobytes())
            except BrokenPipeError:
                pass  # ffmpeg died; its log says why
            finally:
                with contextlib.suppress(BrokenPipeError):
                    proc.stdin.close()
            code = proc.wait()
        if code != 0:
            raise RuntimeError(f"ffmpeg failed ({code}): {log.read_text(errors='replace')[-2000:]}")
        return out.read_bytes()


# --- previews (issue 11): a poster frame and a small animation, next to the MP4 ----------------

POSTER_QUALITY = 85
PREVIEW_MAX_BYTES = 1_000_000  # the preview must stay small: it is shown before the MP4 is fetched
PREVIEW_FRAMES = 16
PREVIEW_MAX_SIDE = 320
# Tried in order until the animation fits PREVIEW_MAX_BYTES: (WebP quality, longest side).
_PREVIEW_STEPS = ((60, PREVIEW_MAX_SIDE), (40, PREVIEW_MAX_SIDE), (30, 240), (20, 160), (10, 96))


def middle_index(num_frames: int) -> int:
    """The poster's frame: the middle one (the earlier of two for an even count)."""
    return (num_frames - 1) // 2


def poster_jpeg(frames: np.ndarray, quality: int = POSTER_QUALITY) -> bytes:
    """The middle frame of uint8 `[F, H, W, 3]` as a full-size JPEG."""
    if frames.dtype != np.uint8 or frames.ndim != 4 or len(frames) == 0:
        raise ValueError(f"expected uint8 [F, H, W, 3], got {frames.dtype} {frames.shape}")
    buffer = io.BytesIO()
    middle = Image.fromarray(frames[middle_index(len(frames))])
    middle.save(buffer, format="JPEG", quality=quality, optimize=True)
    return buffer.getvalue()


def preview_webp(
    frames: np.ndarray,
    fps: int,
    *,
    max_frames: int = PREVIEW_FRAMES,
    max_bytes: int = PREVIEW_MAX_BYTES,
) -> bytes:
    """A looping animated WebP of a few evenly spaced frames, scaled down, spanning the video's
    duration, under `max_bytes` (lower quality and size until it fits)."""
    if frames.dtype != np.uint8 or frames.ndim != 4 or len(frames) == 0:
        raise ValueError(f"expected uint8 [F, H, W, 3], got {frames.dtype} {frames.shape}")
    picked = [frames[i] for i in sample_indices(len(frames), min(max_frames, len(frames)))]
    # Each shown frame stands for len(frames)/len(picked) video frames: same duration as the video.
    duration_ms = max(20, round(1000 * len(frames) / (fps * len(picked))))
    height, width = frames.shape[1:3]
    data = b""
    for quality, side in _PREVIEW_STEPS:
        scale = min(1.0, side / max(width, height))
        size = (max(2, round(width * scale)), max(2, round(height * scale)))
        images = [Image.fromarray(f).resize(size, Image.Resampling.BILINEAR) for f in picked]
        buffer = io.BytesIO()
        images[0].save(
            buffer, format="WEBP", save_all=True, append_images=images[1:], duration=duration_ms, loop=0,
            quality=quality, method=4,
        )  # fmt: skip
        data = buffer.getvalue()
        if len(data) <= max_bytes:
            return data
    raise ValueError(f"the preview is still {len(data)} bytes at the smallest size (limit {max_bytes})")


# --- probing (tests, and a sanity check before upload) ---------------------------------------


@dataclass(frozen=True)
class VideoInfo:
    codec: str
    profile: str
    pix_fmt: str
    width: int
    height: int
    fps: float
    num_frames: int
    faststart: bool


_STREAM_RE = re.compile(
    r"Stream #\d+:\d+.*?: Video: (?P<codec>\w+)(?: \((?P<profile>[^)]*)\))?.*?, "
    r"(?P<pix>yuv\w+|rgb\w+|gray\w*|nv\w+)[(,].*?(?P<w>\d{2,5})x(?P<h>\d{2,5}).*?(?P<fps>[\d.]+) fps"
)


def mp4_top_level_boxes(data: bytes) -> list[str]:
    """Names of the top-level ISO-BMFF boxes in order (e.g. ftyp, moov, mdat)."""
    names: list[str] = []
    offset = 0
    while offset + 8 <= len(data):
        size, kind = struct.unpack(">I4s", data[offset : offset + 8])
        if size == 1:  # 64-bit size follows
            (size,) = struct.unpack(">Q", data[offset + 8 : offset + 16])
        elif size == 0:  # box extends to the end of the file
            size = len(data) - offset
        names.append(kind.decode("latin-1"))
        if size < 8:
            break
        offset += size
    return names


def probe_mp4(data: bytes) -> VideoInfo:
    """Read codec, pixel format, size, fps and frame count back from an MP4 (no ffprobe needed)."""
    with tempfile.TemporaryDirectory(prefix="vap-probe-") as tmp:
        path = Path(tmp) / "video.mp4"
        path.write_bytes(data)
        proc = subprocess.run(  # noqa: S603 (fixed argv)
            [ffmpeg_exe(), "-hide_banner", "-nostdin", "-i", str(path)],
            capture_output=True,
            text=True,
            check=False,
        )
        match = _STREAM_RE.search(proc.stderr)
        if match is None:
            raise MediaError(f"no video stream found: {proc.stderr[-1000:]}")
        num_frames = count_frames(path)
    boxes = mp4_top_level_boxes(data)
    faststart = "moov" in boxes and "mdat" in boxes and boxes.index("moov") < boxes.index("mdat")
    return VideoInfo(
        codec=match["codec"],
        profile=match["profile"] or "",
        pix_fmt=match["pix"],
        width=int(match["w"]),
        height=int(match["h"]),
        fps=float(match["fps"]),
        num_frames=num_frames,
        faststart=faststart,
    )


# --- synthetic media for tests and demos -----------------------------------------------------


def synth_frames(num_frames: int, width: int, height: int, seed: int = 0) -> np.ndarray:
    """A moving colour pattern, uint8 `[F, H, W, 3]`: bars sliding right over a vertical gradient."""
    rng = np.random.default_rng(seed)
    phase = rng.uniform(0, 2 * np.pi, size=3)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    frames = np.empty((num_frames, height, width, 3), dtype=np.uint8)
    for t in range(num_frames):
        shift = t * max(1, width // 24)
        for c in range(3):
            wave = np.sin(2 * np.pi * (xs - shift) / max(8, width / 3) + phase[c] + c * ys / max(1, height))
            frames[t, :, :, c] = np.clip(127.5 + 127.5 * wave, 0, 255).astype(np.uint8)
    return frames


def synth_clip_mp4(
    num_frames: int = 24, width: int = 64, height: int = 48, fps: int = 12, seed: int = 0
) -> bytes:
    """A small synthetic MP4 clip (no external media needed in tests or the demo)."""
    return encode_mp4(synth_frames(num_frames, width, height, seed), fps)


def synth_image_png(width: int = 64, height: int = 48, seed: int = 1) -> bytes:
    """A synthetic PNG image of the same pattern."""
    buffer = io.BytesIO()
    Image.fromarray(synth_frames(1, width, height, seed)[0]).save(buffer, format="PNG")
    return buffer.getvalue()


def to_pil_frames(frames: Sequence[np.ndarray]) -> list[Image.Image]:
    return [Image.fromarray(frame) for frame in frames]
