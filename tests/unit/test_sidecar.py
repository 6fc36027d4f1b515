import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from vap_shared.sidecar import Sidecar, SidecarInvalid, fal_input, parse_sidecar
from vap_testkit import FAL_EXAMPLE

MAX = 65536


def errors_of(raw: bytes | str | dict) -> list[dict]:
    if isinstance(raw, dict):
        raw = json.dumps(raw)
    if isinstance(raw, str):
        raw = raw.encode()
    with pytest.raises(SidecarInvalid) as info:
        parse_sidecar(raw, MAX)
    return info.value.errors


def with_(**changes):
    data = {k: v for k, v in FAL_EXAMPLE.items()}
    for k, v in changes.items():
        if v is ...:
            data.pop(k)
        else:
            data[k] = v
    return data


def test_fal_example_validates_as_is():
    sidecar = parse_sidecar(json.dumps(FAL_EXAMPLE).encode(), MAX)
    assert sidecar.num_frames == 49 and sidecar.guidance_scale == 5.0 and sidecar.backend is None
    body = fal_input(sidecar, sidecar.video_url, sidecar.image_url)
    assert body["video_url"] == FAL_EXAMPLE["video_url"]
    assert set(body) == set(FAL_EXAMPLE)


def test_the_reference_page_example_validates():
    # The JSON block of the API page itself, verbatim.
    from pathlib import Path

    # ../shared beside the repository (reference material, not part of it).
    page = Path(__file__).resolve().parents[3] / "shared" / "reference" / "fal-video-as-prompt-api.txt"
    if not page.exists():
        pytest.skip(f"reference page not available ({page} is outside this checkout)")
    text = page.read_text()
    start = text.index('{\n"prompt"')
    end = text.index("}", text.index('"guidance_scale"')) + 1
    sidecar = parse_sidecar(text[start:end].encode(), MAX)
    assert sidecar.resolution == "480p"


def test_defaults_and_backend():
    minimal = {k: FAL_EXAMPLE[k] for k in ("prompt", "video_description", "video_url", "image_url")}
    sidecar = parse_sidecar(json.dumps({**minimal, "backend": "fal", "seed": 7}).encode(), MAX)
    assert (sidecar.fps, sidecar.aspect_ratio, sidecar.enable_safety_checker) == (16, "9:16", True)
    assert sidecar.backend == "fal" and sidecar.settings().seed == 7


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        (b"", "empty"),
        (b"   ", "empty"),
        (b"\xff\xfe{}", "not valid UTF-8"),
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "must be a JSON object"),
        (b'"text"', "must be a JSON object"),
        (b'{"prompt": "a", "prompt": "b"}', "appears more than once"),
        (b'{"seed": NaN}', "NaN"),
        (b'{"guidance_scale": Infinity}', "Infinity"),
        (b"{" + b'"a":' * 0 + b'"x": "' + b"y" * 70000 + b'"}', "at most 65,536 bytes"),
    ],
)
def test_malformed_documents(raw, needle):
    errors = errors_of(raw)
    assert len(errors) == 1
    assert needle in errors[0]["message"]


@pytest.mark.parametrize(
    ("changes", "field", "needle"),
    [
        ({"num_frames": True}, "num_frames", "whole number from 9 to 121; got the boolean true"),
        ({"num_frames": 49.5}, "num_frames", "got the number 49.5"),
        ({"num_frames": "49"}, "num_frames", 'got the text "49"'),
        ({"num_frames": 8}, "num_frames", "is 8, which is out of range"),
        ({"num_frames": 122}, "num_frames", "out of range"),
        ({"fps": 0}, "fps", "from 1 to 60"),
        ({"fps": 61}, "fps", "from 1 to 60"),
        ({"seed": -1}, "seed", "from 0 to 4,294,967,295"),
        ({"seed": 4294967296}, "seed", "out of range"),
        ({"guidance_scale": 1}, "guidance_scale", "greater than 1 and at most 20"),
        ({"guidance_scale": 20.5}, "guidance_scale", "out of range"),
        ({"guidance_scale": "5"}, "guidance_scale", "got the text"),
        ({"aspect_ratio": "4:3"}, "aspect_ratio", 'one of "16:9", "9:16"; got the text "4:3"'),
        ({"resolution": "1080p"}, "resolution", '"480p", "580p", "720p"'),
        ({"backend": "runpod"}, "backend", '"auto", "modal", "fal"'),
        ({"enable_safety_checker": "yes"}, "enable_safety_checker", "true or false"),
        ({"prompt": "   "}, "prompt", "is empty"),
        ({"prompt": "x" * 5001}, "prompt", "5,001 characters long"),
        ({"prompt": 5}, "prompt", "must be text of 1 to 5,000 characters"),
        ({"video_url": ""}, "video_url", "is empty"),
        ({"image_url": None}, "image_url", "got null"),
        ({"prompt": ...}, "prompt", "required but missing"),
        ({"num_frame": 49}, "num_frame", "not a known field. Did you mean `num_frames`?"),
    ],
)
def test_field_errors_are_plain_words(changes, field, needle):
    errors = errors_of(with_(**changes))
    assert [e["field"] for e in errors] == [field]
    assert needle in errors[0]["message"]
    # Never pydantic's own wording.
    assert "Input should" not in errors[0]["message"]


def test_boundaries_are_accepted():
    sidecar = parse_sidecar(
        json.dumps(
            with_(num_frames=9, fps=60, seed=4294967295, guidance_scale=20, prompt="x" * 5000)
        ).encode(),
        MAX,
    )
    assert sidecar.num_frames == 9 and sidecar.seed == 4294967295
    assert parse_sidecar(json.dumps(with_(num_frames=121, fps=1, seed=0, guidance_scale=1.01)).encode(), MAX)


def test_all_problems_are_reported_together():
    errors = errors_of(with_(num_frames=0, fps="x", aspect_ratio="1:1", video_url=..., colour="red"))
    assert {e["field"] for e in errors} == {"num_frames", "fps", "aspect_ratio", "video_url", "colour"}


def test_model_is_frozen_and_strict():
    sidecar = parse_sidecar(json.dumps(FAL_EXAMPLE).encode(), MAX)
    assert isinstance(sidecar, Sidecar)
    with pytest.raises(Exception):
        sidecar.fps = 3  # type: ignore[misc]


# --------------------------------------------------------------------------- properties

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=10,
)


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_never_crash(raw):
    try:
        parse_sidecar(raw, 200)
    except SidecarInvalid as exc:
        assert exc.errors and all(isinstance(e["message"], str) and e["message"] for e in exc.errors)


@settings(max_examples=150, deadline=None)
@given(st.dictionaries(st.sampled_from([*FAL_EXAMPLE, "backend", "extra"]), json_values, max_size=8))
def test_arbitrary_objects_either_validate_or_list_problems(data):
    try:
        sidecar = parse_sidecar(json.dumps(data).encode(), MAX)
    except SidecarInvalid as exc:
        fields = [e["field"] for e in exc.errors]
        assert len(fields) == len(set(fields))
        return
    assert 9 <= sidecar.num_frames <= 121 and 1 < sidecar.guidance_scale <= 20


@settings(max_examples=100, deadline=None)
@given(
    num_frames=st.integers(9, 121),
    fps=st.integers(1, 60),
    seed=st.none() | st.integers(0, 2**32 - 1),
    guidance=st.floats(1.0001, 20.0),
    aspect=st.sampled_from(["16:9", "9:16"]),
    resolution=st.sampled_from(["480p", "580p", "720p"]),
)
def test_valid_values_always_accepted(num_frames, fps, seed, guidance, aspect, resolution):
    data = with_(num_frames=num_frames, fps=fps, seed=seed, guidance_scale=guidance)
    data.update(aspect_ratio=aspect, resolution=resolution)
    sidecar = parse_sidecar(json.dumps(data).encode(), MAX)
    assert sidecar.settings().num_frames == num_frames
