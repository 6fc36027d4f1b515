import pytest
from vap_shared.contract import SEED_MAX
from vap_shared.gpu_contract import GenerationSettings
from vap_shared.settings_parser import SettingsError

from gpu.service.generation import (
    build_spec,
    default_steps,
    resolve_seed,
    target_size,
    valid_num_frames,
)


@pytest.mark.parametrize(
    ("aspect", "resolution", "size"),
    [
        ("16:9", "480p", (832, 480)),
        ("9:16", "480p", (480, 832)),
        ("16:9", "580p", (1024, 576)),
        ("9:16", "580p", (576, 1024)),
        ("16:9", "720p", (1280, 720)),
        ("9:16", "720p", (720, 1280)),
    ],
)
def test_target_size(aspect, resolution, size):
    assert target_size(aspect, resolution) == size
    assert size[0] % 16 == 0 and size[1] % 16 == 0


@pytest.mark.parametrize(
    ("requested", "frames"),
    [(1, 9), (9, 9), (10, 9), (11, 13), (12, 13), (13, 13), (46, 45), (47, 49), (48, 49), (49, 49), (50, 49),
     (51, 53), (118, 117), (119, 121), (120, 121), (121, 121), (500, 121)],
)  # fmt: skip
def test_num_frames_nearest_4k_plus_1_ties_up(requested, frames):
    assert valid_num_frames(requested) == frames


def test_num_frames_always_valid():
    for n in range(1, 200):
        got = valid_num_frames(n)
        assert got % 4 == 1 and 9 <= got <= 121
        if 9 <= n <= 121:
            assert abs(got - n) <= 2


def test_seed_given_is_kept_and_absent_is_random():
    assert resolve_seed(0) == 0
    assert resolve_seed(SEED_MAX) == SEED_MAX
    drawn = {resolve_seed(None) for _ in range(20)}
    assert len(drawn) > 15 and all(0 <= s <= SEED_MAX for s in drawn)
    with pytest.raises(ValueError):
        resolve_seed(SEED_MAX + 1)


def test_default_steps_env():
    assert default_steps({}) == 50
    assert default_steps({}, fallback=2) == 2
    assert default_steps({"VAP_DEFAULT_STEPS": "30"}) == 30
    for bad in ("0", "201", "many"):
        with pytest.raises(
            SettingsError, match=f"VAP_DEFAULT_STEPS must be a whole number from 1 to 200, got '{bad}'"
        ):
            default_steps({"VAP_DEFAULT_STEPS": bad})


def test_build_spec_maps_everything():
    settings = GenerationSettings(
        prompt=" a cat ", video_description="a man", seed=7, num_frames=50, fps=24,
        aspect_ratio="16:9", resolution="580p", guidance_scale=6, enable_safety_checker=False,
    )  # fmt: skip
    spec = build_spec(settings, None, 50)
    assert (spec.width, spec.height, spec.num_frames, spec.requested_frames) == (1024, 576, 49, 50)
    assert (spec.fps, spec.seed, spec.guidance_scale, spec.steps) == (24, 7, 6.0, 50)
    assert spec.prompt == "a cat" and spec.ref_prompt == "a man" and spec.safety is False
    assert build_spec(settings, 12, 50).steps == 12


def test_build_spec_defaults_and_random_seed():
    spec = build_spec(GenerationSettings(prompt="p", video_description="d"), None, 50)
    assert (spec.width, spec.height, spec.num_frames, spec.fps) == (480, 832, 49, 16)
    assert spec.safety is True and 0 <= spec.seed <= SEED_MAX


def test_build_spec_rejects_out_of_range():
    with pytest.raises(ValueError):
        build_spec(GenerationSettings(prompt="p", video_description="d", guidance_scale=1.0), None, 50)
    with pytest.raises(ValueError):
        build_spec(GenerationSettings(prompt="p", video_description="d", fps=0), None, 50)


def test_a_seed_left_open_is_drawn_from_the_job_id_the_same_on_every_attempt():
    # A re-run after a preemption must draw the same noise to continue the saved state.
    first, again = resolve_seed(None, "job-1"), resolve_seed(None, "job-1")
    assert first == again != resolve_seed(None, "job-2")
    assert all(0 <= resolve_seed(None, f"job-{i}") <= SEED_MAX for i in range(50))
    assert resolve_seed(7, "job-1") == 7  # the sidecar's own seed always wins
