"""`vap_shared.contract` is the one definition of the service's enums, defaults and bounds; what
cannot import it (template.yaml's parameters, the sidecar tables in README.md and docs/contracts.md)
states the same values."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from vap_shared.budget import (
    DEFAULT_BUDGET_S,
    DEFAULT_FAL_MAX_OUTSTANDING,
    DEFAULT_MODAL_CONTAINERS,
    MAX_BUDGET_S,
    MAX_MODAL_CONTAINERS,
    MIN_BUDGET_S,
)
from vap_shared.contract import (
    ASPECT_RATIOS,
    BACKEND_CHOICES,
    BACKEND_NAMES,
    DEFAULT_ASPECT_RATIO,
    DEFAULT_BACKEND,
    DEFAULT_FPS,
    DEFAULT_GPUS,
    DEFAULT_GUIDANCE_SCALE,
    DEFAULT_NUM_FRAMES,
    DEFAULT_RESOLUTION,
    DEFAULT_SAFETY_CHECKER,
    DEFAULT_STEPS,
    FPS_MAX,
    FPS_MIN,
    GPU_COUNTS,
    GUIDANCE_SCALE_ABOVE,
    GUIDANCE_SCALE_MAX,
    LANDSCAPE_SIZES,
    MAX_GPUS,
    NUM_FRAMES_MAX,
    NUM_FRAMES_MIN,
    RESOLUTIONS,
    SEED_MAX,
    TEXT_MAX_CHARS,
    frame_size,
)
from vap_shared.gpu_contract import GenerationSettings, GpuJobRequest
from vap_shared.sidecar import FIELDS, Sidecar

from local_stack.cfn import load_template

ROOT = Path(__file__).resolve().parents[2]
PARAMETERS: dict[str, dict[str, Any]] = load_template(ROOT / "template.yaml")["Parameters"]

# Parameter -> the contract's (AllowedValues, Default).
ENUM_PARAMETERS: dict[str, tuple[tuple[Any, ...], Any]] = {
    "DefaultBackend": (BACKEND_CHOICES, DEFAULT_BACKEND),
    "DefaultGpus": (GPU_COUNTS, DEFAULT_GPUS),
    "MaxGpus": (GPU_COUNTS, MAX_GPUS),
}
# Enumerated parameters whose values are another service's (CloudWatch Logs' retention periods).
FOREIGN_ENUMS = {"LogRetentionDays"}
# Parameter -> the code's (MinValue, MaxValue, Default); None: the template sets none.
BOUNDED_PARAMETERS: dict[str, tuple[int | None, int | None, int]] = {
    "JobBudgetSeconds": (MIN_BUDGET_S, MAX_BUDGET_S, DEFAULT_BUDGET_S),
    "ModalContainers": (1, MAX_MODAL_CONTAINERS, DEFAULT_MODAL_CONTAINERS),
    "FalMaxOutstanding": (1, 1000, DEFAULT_FAL_MAX_OUTSTANDING),
}


def test_the_contract_is_consistent() -> None:
    assert ("auto", *BACKEND_NAMES) == BACKEND_CHOICES and max(GPU_COUNTS) == MAX_GPUS
    assert DEFAULT_GPUS in GPU_COUNTS and DEFAULT_BACKEND in BACKEND_CHOICES
    assert set(LANDSCAPE_SIZES) == set(RESOLUTIONS)
    for resolution in RESOLUTIONS:
        width, height = frame_size("16:9", resolution)
        assert width % 16 == height % 16 == 0, "whole VAE x patch cells"  # gpu.vap.geometry.RELEASED
        assert frame_size("9:16", resolution) == (height, width)


def test_the_models_take_their_defaults_from_the_contract() -> None:
    sidecar = Sidecar(prompt="p", video_description="d", video_url="v", image_url="i")
    for settings in (sidecar.settings(), GenerationSettings(prompt="p", video_description="d")):
        assert (settings.num_frames, settings.fps, settings.guidance_scale) == (
            DEFAULT_NUM_FRAMES,
            DEFAULT_FPS,
            DEFAULT_GUIDANCE_SCALE,
        )
        assert (settings.aspect_ratio, settings.resolution, settings.enable_safety_checker) == (
            DEFAULT_ASPECT_RATIO,
            DEFAULT_RESOLUTION,
            DEFAULT_SAFETY_CHECKER,
        )
    assert GpuJobRequest.model_fields["gpus"].default == DEFAULT_GPUS


@pytest.mark.parametrize("name", sorted(ENUM_PARAMETERS))
def test_template_enum_parameters_are_the_contracts(name: str) -> None:
    allowed, default = ENUM_PARAMETERS[name]
    assert tuple(PARAMETERS[name]["AllowedValues"]) == allowed
    assert PARAMETERS[name]["Default"] == default


def test_every_enumerated_template_parameter_is_compared() -> None:
    enumerated = {name for name, spec in PARAMETERS.items() if "AllowedValues" in spec}
    assert enumerated == set(ENUM_PARAMETERS) | FOREIGN_ENUMS


@pytest.mark.parametrize("name", sorted(BOUNDED_PARAMETERS))
def test_template_bounds_are_the_codes(name: str) -> None:
    low, high, default = BOUNDED_PARAMETERS[name]
    spec = PARAMETERS[name]
    assert (spec.get("MinValue"), spec.get("MaxValue"), spec["Default"]) == (low, high, default)


# ---------------------------------------------------------------------------------------------- docs


def _table(path: Path, heading: str) -> dict[str, list[str]]:
    """field -> its cells after the first, from the markdown table under `heading`."""
    text = path.read_text(encoding="utf-8").split(heading, 1)[1]
    rows: dict[str, list[str]] = {}
    for line in text.split("\n| field |", 1)[1].splitlines()[2:]:
        if not line.startswith("|"):
            break
        first, *cells = [cell.strip() for cell in line.strip("|").split(" | ")]
        for field in re.findall(r"`([a-z_]+)`", first):
            rows[field] = cells
    return rows


TABLES = {
    "README.md": _table(ROOT / "README.md", "### Sidecar reference"),
    "docs/contracts.md": _table(ROOT / "docs" / "contracts.md", "## Sidecar value ranges"),
}


@pytest.mark.parametrize("doc", sorted(TABLES))
def test_the_sidecar_tables_state_the_contract(doc: str) -> None:
    rows = TABLES[doc]
    assert set(rows) == set(FIELDS), "every sidecar field has a row"
    default = {field: cells[1] for field, cells in rows.items()}
    allowed = {field: cells[2] for field, cells in rows.items()}

    def ticked(value: object) -> str:
        return f"`{value}`"

    for field in ("prompt", "video_description"):
        assert f"1–{TEXT_MAX_CHARS:,} characters" in allowed[field]
    assert allowed["seed"].startswith(f"0–{SEED_MAX:,}")
    assert default["num_frames"] == str(DEFAULT_NUM_FRAMES)
    assert allowed["num_frames"].startswith(f"{NUM_FRAMES_MIN}–{NUM_FRAMES_MAX}")
    assert default["fps"] == str(DEFAULT_FPS) and allowed["fps"] == f"{FPS_MIN}–{FPS_MAX}"
    assert default["enable_safety_checker"] == str(DEFAULT_SAFETY_CHECKER).lower()
    assert default["aspect_ratio"] == ticked(DEFAULT_ASPECT_RATIO)
    assert allowed["aspect_ratio"] == ", ".join(map(ticked, ASPECT_RATIOS))
    assert default["resolution"] == ticked(DEFAULT_RESOLUTION)
    sizes = ", ".join(f"`{r}` ({w}×{h})" for r, (w, h) in LANDSCAPE_SIZES.items())
    assert allowed["resolution"].startswith(sizes)
    assert default["guidance_scale"] == f"{DEFAULT_GUIDANCE_SCALE:g}"
    assert allowed["guidance_scale"].startswith(f"> {GUIDANCE_SCALE_ABOVE:g} and ≤ {GUIDANCE_SCALE_MAX:g}")
    assert tuple(re.findall(r"`([a-z]+)`", allowed["backend"])) == BACKEND_CHOICES
    counts = ", ".join(map(ticked if doc == "README.md" else str, GPU_COUNTS))
    assert allowed["gpus"].startswith(counts)
    if doc == "README.md":
        assert f"`DefaultGpus` ({DEFAULT_GPUS})" in default["gpus"]
        assert f"`MaxGpus` ({MAX_GPUS})" in allowed["gpus"]


def test_the_wire_models_in_the_contracts_doc_state_the_defaults() -> None:
    text = (ROOT / "docs" / "contracts.md").read_text(encoding="utf-8")
    block = " ".join(text.split("GenerationSettings: ", 1)[1].split("GpuJobRequest:", 1)[0].split())
    for name, field in GenerationSettings.model_fields.items():
        if field.is_required() or field.default is None:
            continue
        value = f'"{field.default}"' if isinstance(field.default, str) else repr(field.default)
        assert f"{name}={value}" in block, name
    assert f"gpus: {'|'.join(map(str, GPU_COUNTS))} = {DEFAULT_GPUS}" in text
    assert f"(None → server default, {DEFAULT_STEPS})" in text


def test_the_gpu_doc_states_the_sizes() -> None:
    text = (ROOT / "docs" / "gpu.md").read_text(encoding="utf-8")
    landscape = ", ".join(f"{r} → {w}×{h}" for r, (w, h) in LANDSCAPE_SIZES.items())
    portrait = ", ".join(f"{h}×{w}" for w, h in LANDSCAPE_SIZES.values())
    assert f"`16:9`: {landscape}; `9:16` swaps them ({portrait})" in text
