"""Sidecar parsing: raw bytes → `Sidecar`, or every problem in plain words.

The sidecar is fal's `fal-ai/video-as-prompt` input plus the service's own optional `backend`,
`reuse` and `gpus` (never sent to fal, not generation settings). Checks are
written by hand (not pydantic's messages) so each problem names the field, what is wrong and
what is allowed; the pydantic model then guards the result once more.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from difflib import get_close_matches
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .contract import (
    ASPECT_RATIOS,
    BACKEND_CHOICES,
    DEFAULT_ASPECT_RATIO,
    DEFAULT_FPS,
    DEFAULT_GUIDANCE_SCALE,
    DEFAULT_NUM_FRAMES,
    DEFAULT_RESOLUTION,
    DEFAULT_SAFETY_CHECKER,
    FPS_MAX,
    FPS_MIN,
    GPU_COUNTS,  # the stack caps it further (MaxGpus)
    GUIDANCE_SCALE_ABOVE,
    GUIDANCE_SCALE_MAX,
    NUM_FRAMES_MAX,
    NUM_FRAMES_MIN,
    RESOLUTIONS,
    SEED_MAX,
    TEXT_MAX_CHARS,
    URL_MAX_CHARS,
    AspectRatio,
    BackendChoice,
    GpuCount,
    Resolution,
)
from .errors import FieldError, field_error
from .gpu_contract import GenerationSettings

# The service's own fields: how and where to run, not what to generate (never sent to fal).
SERVICE_FIELDS = ("backend", "reuse", "gpus")
MEDIA_ALLOWED = (
    "a key relative to the sidecar's folder (e.g. clip.mp4), an s3://<this bucket>/… URI, "
    "an https:// URL on an allowed host, or a data:<mime>;base64,… URI"
)


class Sidecar(BaseModel):
    """A validated sidecar; field names, types and defaults as fal's API."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    prompt: str = Field(min_length=1, max_length=TEXT_MAX_CHARS)
    video_description: str = Field(min_length=1, max_length=TEXT_MAX_CHARS)
    video_url: str = Field(min_length=1)
    image_url: str = Field(min_length=1)
    seed: int | None = Field(default=None, ge=0, le=SEED_MAX)
    num_frames: int = Field(default=DEFAULT_NUM_FRAMES, ge=NUM_FRAMES_MIN, le=NUM_FRAMES_MAX)
    fps: int = Field(default=DEFAULT_FPS, ge=FPS_MIN, le=FPS_MAX)
    enable_safety_checker: bool = DEFAULT_SAFETY_CHECKER
    aspect_ratio: AspectRatio = DEFAULT_ASPECT_RATIO
    resolution: Resolution = DEFAULT_RESOLUTION
    guidance_scale: float = Field(
        default=DEFAULT_GUIDANCE_SCALE, gt=GUIDANCE_SCALE_ABOVE, le=GUIDANCE_SCALE_MAX
    )
    backend: BackendChoice | None = None
    # null/absent = true: an equal earlier job's result may be copied instead of running again.
    reuse: bool | None = None
    # GPUs of one container for this job; null/absent = the stack's DefaultGpus.
    gpus: GpuCount | None = None

    def settings(self) -> GenerationSettings:
        return GenerationSettings(
            prompt=self.prompt,
            video_description=self.video_description,
            seed=self.seed,
            num_frames=self.num_frames,
            fps=self.fps,
            enable_safety_checker=self.enable_safety_checker,
            aspect_ratio=self.aspect_ratio,
            resolution=self.resolution,
            guidance_scale=self.guidance_scale,
        )


FIELDS = tuple(Sidecar.model_fields)
REQUIRED = ("prompt", "video_description", "video_url", "image_url")


class SidecarInvalid(Exception):
    def __init__(self, errors: list[FieldError]) -> None:
        super().__init__("; ".join(e["message"] for e in errors))
        self.errors = errors


def describe(value: Any) -> str:
    """A short plain description of a JSON value, for 'got …' phrases."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"the boolean {'true' if value else 'false'}"
    if isinstance(value, int):
        return f"the integer {value}"
    if isinstance(value, float):
        return f"the number {value:g}"
    if isinstance(value, str):
        shown = value if len(value) <= 40 else value[:37] + "..."
        return f"the text {json.dumps(shown)}" if value else "an empty text"
    if isinstance(value, list):
        return "a list"
    return "an object"


class _DuplicateKey(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def _no_constants(name: str) -> Any:
    raise ValueError(name)


def decode_json_object(raw: bytes, max_bytes: int) -> dict[str, Any]:
    """Bytes → JSON object, strictly; raises `SidecarInvalid` with one plain message."""
    if len(raw) > max_bytes:
        raise SidecarInvalid(
            [
                field_error(
                    None, f"The sidecar is {len(raw):,} bytes; at most {max_bytes:,} bytes are allowed."
                )
            ]
        )
    if not raw.strip():
        raise SidecarInvalid([field_error(None, "The sidecar is empty; it must be a JSON object.")])
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise SidecarInvalid(
            [field_error(None, f"The sidecar is not valid UTF-8 text (bad byte at position {exc.start}).")]
        ) from None
    try:
        data = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constants)
    except _DuplicateKey as exc:
        key = str(exc)
        raise SidecarInvalid(
            [field_error(key, f"The field `{key}` appears more than once; each field may appear once.")]
        ) from None
    except json.JSONDecodeError as exc:
        raise SidecarInvalid(
            [
                field_error(
                    None,
                    f"The sidecar is not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}.",
                )
            ]
        ) from None
    except ValueError as exc:
        raise SidecarInvalid(
            [field_error(None, f"The sidecar contains {exc}, which is not valid JSON; use a finite number.")]
        ) from None
    except RecursionError:
        raise SidecarInvalid([field_error(None, "The sidecar is nested too deeply.")]) from None
    if not isinstance(data, dict):
        raise SidecarInvalid(
            [field_error(None, f"The sidecar must be a JSON object ({{...}}), but it is {describe(data)}.")]
        )
    return data


def _text(name: str, value: Any) -> tuple[Any, str | None]:
    allowed = f"text of 1 to {TEXT_MAX_CHARS:,} characters"
    if not isinstance(value, str):
        return None, f"`{name}` must be {allowed}; got {describe(value)}."
    trimmed = value.strip()
    if not trimmed:
        return None, f"`{name}` is empty; it must be {allowed}."
    if len(trimmed) > TEXT_MAX_CHARS:
        return None, f"`{name}` is {len(trimmed):,} characters long; it must be {allowed}."
    return trimmed, None


def _media(name: str, value: Any) -> tuple[Any, str | None]:
    if not isinstance(value, str):
        return None, f"`{name}` must be text naming the media: {MEDIA_ALLOWED}; got {describe(value)}."
    if not value.strip():
        return None, f"`{name}` is empty; it must be {MEDIA_ALLOWED}."
    if not value.startswith("data:") and len(value) > URL_MAX_CHARS:
        return None, f"`{name}` is {len(value):,} characters long; at most {URL_MAX_CHARS:,} are allowed."
    return value.strip(), None


def _int_range(lo: int, hi: int, nullable: bool = False) -> Callable[[str, Any], tuple[Any, str | None]]:
    def check(name: str, value: Any) -> tuple[Any, str | None]:
        allowed = f"a whole number from {lo:,} to {hi:,}" + (" (or null for random)" if nullable else "")
        if value is None and nullable:
            return None, None
        # bool is an int subclass in Python; JSON true is not a number.
        if isinstance(value, bool) or not isinstance(value, int):
            return None, f"`{name}` must be {allowed}; got {describe(value)}."
        if not lo <= value <= hi:
            return None, f"`{name}` is {value:,}, which is out of range; it must be {allowed}."
        return value, None

    return check


def _bool(name: str, value: Any) -> tuple[Any, str | None]:
    if not isinstance(value, bool):
        return None, f"`{name}` must be true or false; got {describe(value)}."
    return value, None


def _nullable_bool(name: str, value: Any) -> tuple[Any, str | None]:
    return (None, None) if value is None else _bool(name, value)


def _gpu_count(name: str, value: Any) -> tuple[Any, str | None]:
    allowed = "one of " + ", ".join(str(n) for n in GPU_COUNTS) + " (or null for the stack's default)"
    if value is None:
        return None, None
    if isinstance(value, bool) or not isinstance(value, int) or value not in GPU_COUNTS:
        return None, f"`{name}` must be {allowed}; got {describe(value)}."
    return value, None


def _enum(options: tuple[str, ...], nullable: bool = False) -> Callable[[str, Any], tuple[Any, str | None]]:
    def check(name: str, value: Any) -> tuple[Any, str | None]:
        if value is None and nullable:
            return None, None
        allowed = ", ".join(f'"{o}"' for o in options)
        if not isinstance(value, str) or value not in options:
            return None, f"`{name}` must be one of {allowed}; got {describe(value)}."
        return value, None

    return check


def _guidance(name: str, value: Any) -> tuple[Any, str | None]:
    allowed = f"a number greater than {GUIDANCE_SCALE_ABOVE:g} and at most {GUIDANCE_SCALE_MAX:g}"
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None, f"`{name}` must be {allowed}; got {describe(value)}."
    number = float(value)
    if not math.isfinite(number) or not GUIDANCE_SCALE_ABOVE < number <= GUIDANCE_SCALE_MAX:
        return None, f"`{name}` is {value:g}, which is out of range; it must be {allowed}."
    return number, None


CHECKS: dict[str, Callable[[str, Any], tuple[Any, str | None]]] = {
    "prompt": _text,
    "video_description": _text,
    "video_url": _media,
    "image_url": _media,
    "seed": _int_range(0, SEED_MAX, nullable=True),
    "num_frames": _int_range(NUM_FRAMES_MIN, NUM_FRAMES_MAX),
    "fps": _int_range(FPS_MIN, FPS_MAX),
    "enable_safety_checker": _bool,
    "aspect_ratio": _enum(ASPECT_RATIOS),
    "resolution": _enum(RESOLUTIONS),
    "guidance_scale": _guidance,
    "backend": _enum(BACKEND_CHOICES, nullable=True),
    "reuse": _nullable_bool,
    "gpus": _gpu_count,
}
assert set(CHECKS) == set(FIELDS)


def validate_object(data: dict[str, Any]) -> Sidecar:
    """Check a decoded JSON object; raises `SidecarInvalid` listing every problem."""
    errors: list[FieldError] = []
    clean: dict[str, Any] = {}
    for name in data:
        if name not in CHECKS:
            close = get_close_matches(name, FIELDS, n=1, cutoff=0.75)
            hint = f" Did you mean `{close[0]}`?" if close else ""
            errors.append(
                field_error(
                    name,
                    f"`{name}` is not a known field.{hint} Allowed fields: {', '.join(FIELDS)}.",
                )
            )
    for name in REQUIRED:
        if name not in data:
            errors.append(field_error(name, f"`{name}` is required but missing."))
    for name, check in CHECKS.items():
        if name not in data:
            continue
        value, problem = check(name, data[name])
        if problem:
            errors.append(field_error(name, problem))
        elif value is not None:
            clean[name] = value
    if errors:
        raise SidecarInvalid(errors)
    try:
        return Sidecar.model_validate(clean)
    except ValidationError as exc:  # pragma: no cover - the checks above mirror the model
        raise SidecarInvalid(
            [
                field_error(str(e["loc"][0]) if e["loc"] else None, "This value is not allowed.")
                for e in exc.errors()
            ]
        ) from None


def parse_sidecar(raw: bytes, max_bytes: int) -> Sidecar:
    return validate_object(decode_json_object(raw, max_bytes))


def fal_input(sidecar: Sidecar, video_url: str, image_url: str) -> dict[str, Any]:
    """The fal request body: the sidecar's fal fields with the media URLs as resolved."""
    body = sidecar.model_dump(exclude=set(SERVICE_FIELDS), exclude_none=True)
    body["video_url"] = video_url
    body["image_url"] = image_url
    return body
