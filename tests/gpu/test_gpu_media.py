import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gpu.service import media

SHARED_MEDIA = Path(__file__).resolve().parents[3] / "shared" / "media"


@pytest.mark.parametrize(
    ("src", "dst", "box"),
    [
        ((1920, 1080), (832, 480), (24, 0, 1896, 1080)),  # 16:9 into 26:15: trim the sides a little
        ((1920, 1080), (480, 832), (648, 0, 1271, 1080)),  # landscape into portrait: keep the centre
        ((1080, 1920), (832, 480), (0, 648, 1080, 1271)),  # portrait into landscape
        ((100, 100), (100, 100), (0, 0, 100, 100)),
    ],
)
def test_center_crop_box(src, dst, box):
    got = media.center_crop_box(*src, *dst)
    assert got == box
    left, top, right, bottom = got
    assert abs((right - left) / (bottom - top) - dst[0] / dst[1]) < 0.01


def test_fit_image_crops_instead_of_stretching():
    # Left third red, middle green, right third blue (landscape) → portrait keeps only the middle.
    array = np.zeros((90, 300, 3), dtype=np.uint8)
    array[:, :100, 0] = 255
    array[:, 100:200, 1] = 255
    array[:, 200:, 2] = 255
    fitted = media.fit_image(Image.fromarray(array), 48, 80)
    assert fitted.size == (48, 80)
    pixels = np.asarray(fitted)
    assert (pixels[:, :, 1] > 200).all() and (pixels[:, :, 0] < 50).all() and (pixels[:, :, 2] < 50).all()


def test_sample_indices_even_and_repeating():
    assert media.sample_indices(100, 5) == [0, 25, 50, 74, 99]
    assert media.sample_indices(49, 49) == list(range(49))
    short = media.sample_indices(4, 9)  # a short video repeats frames, in order
    assert short[0] == 0 and short[-1] == 3 and short == sorted(short) and len(short) == 9
    assert media.sample_indices(1, 3) == [0, 0, 0]
    with pytest.raises(media.MediaError):
        media.sample_indices(0, 3)


def test_decode_sampled_frames_order_and_size():
    clip = media.synth_frames(12, 64, 48)
    frames = media.decode_sampled_frames(media.encode_mp4(clip, 12, crf=5), 5, 32, 32)
    assert [f.size for f in frames] == [(32, 32)] * 5
    # Sampled frame k should be the (cropped, resized) source frame at sample_indices(12, 5)[k].
    for frame, index in zip(frames, media.sample_indices(12, 5), strict=True):
        expected = np.asarray(media.fit_image(Image.fromarray(clip[index]), 32, 32), dtype=np.float32)
        assert np.abs(np.asarray(frame, dtype=np.float32) - expected).mean() < 12


def test_decode_rejects_garbage():
    with pytest.raises(media.MediaError):
        media.decode_sampled_frames(b"not a video", 9, 32, 32)
    with pytest.raises(media.MediaError):
        media.load_image(b"not an image")


def test_load_image_applies_exif_rotation():
    image = Image.new("RGB", (40, 20), "red")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise on display
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif)
    assert media.load_image(buffer.getvalue()).size == (20, 40)


@pytest.mark.parametrize(
    ("frames", "size", "fps"), [(49, (480, 832), 16), (9, (64, 48), 24), (13, (32, 32), 1)]
)
def test_encode_mp4_h264_yuv420p_exact_frames_fps_faststart(frames, size, fps):
    width, height = size
    data = media.encode_mp4(media.synth_frames(frames, width, height), fps)
    info = media.probe_mp4(data)
    assert info.codec == "h264" and info.pix_fmt == "yuv420p"
    assert (info.width, info.height, info.num_frames) == (width, height, frames)
    assert info.fps == fps
    assert info.faststart
    assert media.mp4_top_level_boxes(data)[0] == "ftyp"


def test_encode_mp4_rejects_bad_input():
    with pytest.raises(ValueError):
        media.encode_mp4(np.zeros((3, 31, 32, 3), dtype=np.uint8), 16)  # odd height
    with pytest.raises(ValueError):
        media.encode_mp4(np.zeros((3, 32, 32, 3), dtype=np.float32), 16)


@pytest.mark.skipif(not (SHARED_MEDIA / "man-534.mp4").exists(), reason="../shared/media not available")
def test_real_reference_video_decodes_and_samples():
    data = (SHARED_MEDIA / "man-534.mp4").read_bytes()
    frames = media.decode_sampled_frames(data, 49, 480, 832)
    assert len(frames) == 49 and all(f.size == (480, 832) for f in frames)
    assert np.asarray(frames[0]).std() > 5  # real content, not a blank frame


# --- previews (issue 11) --------------------------------------------------------------------


@pytest.fixture(scope="module")
def noise_720p_121():
    """The largest accepted output (720p, 121 frames) as noise: the hardest content to compress."""
    return np.random.default_rng(7).integers(0, 256, size=(121, 720, 1280, 3), dtype=np.uint8)


def test_poster_is_the_middle_frame_full_size():
    # 121 frames at 720p, each a gradient shifted by its own brightness: frame i is i*2 brighter.
    gradient = np.broadcast_to(np.linspace(0, 12, 1280).astype(np.uint8)[None, :, None], (720, 1280, 3))
    frames = gradient[None] + (2 * np.arange(121, dtype=np.uint8))[:, None, None, None]
    poster = Image.open(io.BytesIO(media.poster_jpeg(frames)))
    assert poster.format == "JPEG" and poster.size == (1280, 720)
    pixels = np.asarray(poster.convert("RGB"), dtype=np.float32)
    distance = {i: np.abs(pixels - frames[i].astype(np.float32)).mean() for i in (0, 30, 59, 60, 61, 90, 120)}
    assert media.middle_index(121) == 60 and min(distance, key=distance.__getitem__) == 60
    assert distance[60] < 1.0 and distance[59] > 1.5 and distance[61] > 1.5


def test_middle_index():
    assert [media.middle_index(n) for n in (1, 2, 9, 49, 121)] == [0, 0, 4, 24, 60]


def test_preview_is_a_small_looping_animation_under_1mb(noise_720p_121):
    data = media.preview_webp(noise_720p_121, fps=16)
    assert len(data) < 1_000_000
    preview = Image.open(io.BytesIO(data))
    assert preview.format == "WEBP" and preview.is_animated
    assert preview.n_frames == media.PREVIEW_FRAMES and max(preview.size) <= media.PREVIEW_MAX_SIDE
    assert preview.size == (320, 180)  # the aspect ratio is kept
    assert preview.info["loop"] == 0  # loops forever
    durations = []
    for index in range(preview.n_frames):
        preview.seek(index)
        preview.load()
        durations.append(preview.info["duration"])
    # The 16 frames span the video's 121 / 16 s.
    assert abs(sum(durations) - 1000 * 121 / 16) < 16 * 2
    # Frames are the sampled ones, in order: the last shown frame is the video's last frame.
    last = np.asarray(preview.convert("RGB"), dtype=np.float32)
    expected = np.asarray(
        Image.fromarray(noise_720p_121[-1]).resize(preview.size, Image.Resampling.BILINEAR), dtype=np.float32
    )
    assert np.abs(last - expected).mean() < 12


def test_preview_shrinks_to_fit_and_refuses_what_cannot(noise_720p_121):
    roomy = media.preview_webp(noise_720p_121[:9], fps=8)
    tight = media.preview_webp(noise_720p_121[:9], fps=8, max_bytes=len(roomy) // 3)
    assert len(tight) <= len(roomy) // 3 and Image.open(io.BytesIO(tight)).n_frames == 9
    with pytest.raises(ValueError, match="smallest size"):
        media.preview_webp(noise_720p_121[:9], fps=8, max_bytes=100)


def test_short_videos_preview_every_frame():
    frames = media.synth_frames(5, 64, 48)
    preview = Image.open(io.BytesIO(media.preview_webp(frames, fps=5)))
    assert preview.n_frames == 5 and preview.size == (64, 48)
