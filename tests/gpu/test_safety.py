import numpy as np
import pytest
from PIL import Image

from gpu.service import media
from gpu.service.safety import (
    DiffusersSafetyClassifier,
    SafetyViolation,
    check_image,
    check_output,
    output_sample_indices,
)


class Recording:
    """An injected classifier: flags the images whose call-order position is listed."""

    def __init__(self, flag_calls=(), flag_positions=()):
        self.calls: list[int] = []
        self.flag_calls = set(flag_calls)
        self.flag_positions = set(flag_positions)

    def __call__(self, images):
        call = len(self.calls)
        self.calls.append(len(images))
        return [call in self.flag_calls or i in self.flag_positions for i in range(len(images))]


def test_output_sample_indices():
    assert output_sample_indices(5) == [0, 1, 2, 3, 4]
    picks = output_sample_indices(49)
    assert len(picks) == 8 and picks[0] == 0 and picks[-1] == 48 and picks == sorted(set(picks))


def test_check_image_passes_and_fails():
    image = Image.new("RGB", (32, 32))
    check_image(Recording(), image)
    with pytest.raises(SafetyViolation, match="input image"):
        check_image(Recording(flag_calls={0}), image)


def test_check_output_reports_flagged_frames():
    frames = media.synth_frames(49, 32, 32)
    classifier = Recording()
    check_output(classifier, frames)
    assert classifier.calls == [8]
    with pytest.raises(SafetyViolation, match=r"frames 7") as info:
        check_output(Recording(flag_positions={1}), frames)
    assert "not stored" in str(info.value)


def test_diffusers_checker_tiny_runs_the_real_model_code():
    frames = [Image.fromarray(f) for f in media.synth_frames(3, 48, 40)]
    assert DiffusersSafetyClassifier.tiny()(frames) == [False, False, False]
    assert DiffusersSafetyClassifier.tiny(flag_everything=True)(frames) == [True, True, True]
    assert DiffusersSafetyClassifier.tiny()([]) == []
    with pytest.raises(SafetyViolation):
        check_output(
            DiffusersSafetyClassifier.tiny(flag_everything=True), np.stack([np.asarray(f) for f in frames])
        )
