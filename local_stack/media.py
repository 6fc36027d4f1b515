"""Small sample media made with the ffmpeg binary that imageio-ffmpeg ships (nothing downloaded)."""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

import imageio_ffmpeg


def _ffmpeg(args: list[str], out: Path) -> bytes:
    command = [imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-y", *args, str(out)]
    subprocess.run(command, check=True, timeout=120)  # noqa: S603 - fixed arguments, no shell
    return out.read_bytes()


def synth_mp4(width: int = 256, height: int = 448, frames: int = 17, fps: int = 16) -> bytes:
    """A short H.264 MP4 (moving test pattern), even dimensions, yuv420p: plays everywhere."""
    with tempfile.TemporaryDirectory() as tmp:
        return _ffmpeg(
            [
                "-f", "lavfi", "-i", f"testsrc2=size={width}x{height}:rate={fps}",
                "-frames:v", str(frames), "-pix_fmt", "yuv420p", "-c:v", "libx264",
                "-preset", "ultrafast", "-movflags", "+faststart",
            ],
            Path(tmp) / "clip.mp4",
        )  # fmt: skip


def synth_image(width: int = 256, height: int = 448, suffix: str = ".png") -> bytes:
    """A still image (PNG or JPEG by `suffix`) of a colour gradient pattern."""
    with tempfile.TemporaryDirectory() as tmp:
        return _ffmpeg(
            ["-f", "lavfi", "-i", f"gradients=size={width}x{height}:seed=7", "-frames:v", "1"],
            Path(tmp) / f"image{suffix}",
        )
