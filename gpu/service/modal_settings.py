"""Deploy-time settings of the Modal app, read once from the deployer's environment.

Modal re-imports `gpu/service/modal_app.py` inside every container with only what a function's `env=` /
secrets forward, so every setting the module (or a container) reads is listed in `SETTING_NAMES`
and `forwarded_env` hands exactly those to every function: a container then reads the same
settings the deployer did. Time limits are not settings of their own: they come from the job
budget (`vap_shared.budget.Budget`), the same derivation the AWS side uses.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from vap_shared.budget import (
    DEFAULT_BUDGET_S,
    DEFAULT_MODAL_CONTAINERS,
    MAX_BUDGET_S,
    MAX_MODAL_CONTAINERS,
    MIN_BUDGET_S,
    Budget,
    BudgetError,
)
from vap_shared.contract import DEFAULT_STEPS, GPU_COUNTS, STEPS_MAX
from vap_shared.settings_parser import SettingsError, flag, integer, names, text

APP = "VAP_MODAL_APP"
GPUS = "VAP_MODAL_GPUS"
MAX_CONTAINERS = "VAP_MODAL_MAX_CONTAINERS"
MIN_CONTAINERS = "VAP_MODAL_MIN_CONTAINERS"
SCALEDOWN = "VAP_MODAL_SCALEDOWN_S"
BUDGET = "VAP_JOB_BUDGET_S"
STEPS = "VAP_DEFAULT_STEPS"
COMPILE = "VAP_MODAL_COMPILE"
REVISION = "VAP_REVISION"
VOLUME = "VAP_MODAL_VOLUME"
SECRETS = "VAP_MODAL_SECRETS"
CALLS_DICT = "VAP_MODAL_CALLS_DICT"
# Read inside the GPU containers by gpu.vap.attention (forces one attention backend, still probed).
ATTENTION_BACKEND = "VAP_ATTENTION_BACKEND"

# Every environment variable the app module reads. A container sees only what is forwarded, so a
# name missing here would silently fall back to its default there (the bug this list prevents).
SETTING_NAMES: tuple[str, ...] = (
    APP, GPUS, MAX_CONTAINERS, MIN_CONTAINERS, SCALEDOWN, BUDGET, STEPS, COMPILE, REVISION, VOLUME,
    SECRETS, CALLS_DICT, ATTENTION_BACKEND,
)  # fmt: skip

# Names that used to be read; now derived from VAP_JOB_BUDGET_S or renamed. Setting one is an
# error rather than silently ignored.
REMOVED_NAMES: dict[str, str] = {
    "VAP_MODAL_TIMEOUT_S": f"the run limit is derived from {BUDGET} (vap_shared.budget)",
    "VAP_MODAL_STARTUP_TIMEOUT_S": "the startup limit is vap_shared.budget.STARTUP_S",
    "VAP_MODAL_GPU": f"list the offered GPU choices in {GPUS}, e.g. 'H100!,H200,H100:8'",
}

# One class per offered choice: pinned H100 and H200 for one GPU, H100 x 2/4/8 for sequence parallel.
DEFAULT_GPUS = ("H100!", "H200", "H100:2", "H100:4", "H100:8")
_COMMIT_RE = re.compile(r"[0-9a-f]{40}")  # gpu.vap.loading.is_commit (this module imports no torch)
_GPU_RE = re.compile(r"^(?P<type>[A-Z][A-Z0-9-]*)(?P<pin>!?)(?::(?P<count>\d+))?$")


@dataclass(frozen=True)
class GpuClass:
    """One Modal class: the `gpu=` string Modal gets and the Python class name it is registered as."""

    modal_gpu: str  # e.g. "H100!", "H200", "H100:8"
    gpu_type: str  # "H100"
    count: int

    @property
    def class_name(self) -> str:
        suffix = f"x{self.count}" if self.count > 1 else ""
        return f"VapGenerator{self.gpu_type.replace('-', '')}{suffix}"


def parse_gpu(modal_gpu: str) -> GpuClass:
    match = _GPU_RE.match(modal_gpu.strip())
    if match is None:
        raise SettingsError(f"{GPUS}: {modal_gpu!r} is not a Modal GPU string like 'H100!' or 'H100:8'")
    count = int(match["count"] or 1)
    if count not in GPU_COUNTS:
        allowed = ", ".join(str(n) for n in GPU_COUNTS)
        raise SettingsError(f"{GPUS}: {modal_gpu!r} asks for {count} GPUs; one job uses one of {allowed}")
    return GpuClass(modal_gpu=modal_gpu.strip(), gpu_type=match["type"], count=count)


def offered_class(modal_gpu: str, offered: Iterable[str]) -> str | None:
    """The offered Modal GPU string that serves a choice spelled `modal_gpu`: the same GPU type and
    count. `!` (no upgrade by Modal to a bigger GPU) is the deployment's spelling, not part of the
    choice: gpu.tools.plan names "H100!:8" where a deployment may offer "H100:8", and the other way
    round (`read_settings` allows one class per type and count, so the match is unique)."""
    try:
        wanted = parse_gpu(modal_gpu)
    except SettingsError:
        return None
    for name in offered:
        have = parse_gpu(name)
        if (have.gpu_type, have.count) == (wanted.gpu_type, wanted.count):
            return have.modal_gpu
    return None


@dataclass(frozen=True)
class ModalSettings:
    app_name: str = "vap-gpu"
    gpus: tuple[GpuClass, ...] = tuple(parse_gpu(g) for g in DEFAULT_GPUS)
    max_containers: int = DEFAULT_MODAL_CONTAINERS  # per class: GPUs at once, caps spend
    min_containers: int = 0  # > 0 keeps warm GPUs (billed while idle)
    scaledown_s: int = 300  # an idle container is kept this long for the next job
    budget: Budget = field(default_factory=Budget)
    default_steps: int = DEFAULT_STEPS
    compile_blocks: bool = False  # regional torch.compile: faster steps, slower cold start
    revision: str = ""  # the VAP weights' commit (40 hex; "" = gpu.vap.loading.VAP_REVISION)
    volume: str = "vap-weights"
    secrets: tuple[str, ...] = ()  # Modal secret names, e.g. ("huggingface",)
    calls_dict: str = "vap-gpu-calls"  # modal.Dict: job id -> call id, cancel records

    @property
    def timeout_s(self) -> int:
        """Modal's per-run `timeout` (the runner stops itself a minute earlier)."""
        return self.budget.run_s

    @property
    def startup_timeout_s(self) -> int:
        return self.budget.startup_s

    def gpu_class(self, modal_gpu: str) -> GpuClass | None:
        return next((g for g in self.gpus if g.modal_gpu == modal_gpu), None)


def read_settings(env: Mapping[str, str] | None = None) -> ModalSettings:
    """The settings in `env` (default: this process's environment); raises `SettingsError`."""
    env = os.environ if env is None else env
    removed = [f"{name} ({why})" for name, why in REMOVED_NAMES.items() if env.get(name, "").strip()]
    if removed:
        raise SettingsError("no longer read: " + "; ".join(removed))
    gpus = tuple(parse_gpu(g) for g in names(env.get(GPUS, ""))) or ModalSettings.gpus
    class_names = [g.class_name for g in gpus]
    if len(set(class_names)) != len(class_names):
        raise SettingsError(f"{GPUS} lists one GPU choice twice: {', '.join(g.modal_gpu for g in gpus)}")
    max_containers = integer(env, MAX_CONTAINERS, DEFAULT_MODAL_CONTAINERS, 1, MAX_MODAL_CONTAINERS)
    try:
        budget = Budget(
            job_s=integer(env, BUDGET, DEFAULT_BUDGET_S, MIN_BUDGET_S, MAX_BUDGET_S),
            modal_containers=max_containers,
        )
    except BudgetError as exc:  # pragma: no cover - both values are range-checked above
        raise SettingsError(f"{BUDGET}: {exc}") from None
    revision = text(env, REVISION)
    if revision and not _COMMIT_RE.fullmatch(revision):
        raise SettingsError(f"{REVISION} must be a commit (40 hex digits), not a branch or tag: {revision!r}")
    return ModalSettings(
        app_name=text(env, APP, ModalSettings.app_name),
        gpus=gpus,
        max_containers=max_containers,
        min_containers=integer(env, MIN_CONTAINERS, 0, 0, max_containers),
        scaledown_s=integer(env, SCALEDOWN, 300, 2, 3600),  # Modal's allowed range
        budget=budget,
        default_steps=integer(env, STEPS, DEFAULT_STEPS, 1, STEPS_MAX),
        compile_blocks=flag(env, COMPILE),
        revision=revision,
        volume=text(env, VOLUME, ModalSettings.volume),
        secrets=names(env.get(SECRETS, "")),
        calls_dict=text(env, CALLS_DICT, ModalSettings.calls_dict),
    )


def forwarded_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """What every Modal function gets as `env=`: the deployer's value of each setting it set."""
    env = os.environ if env is None else env
    return {name: env[name] for name in SETTING_NAMES if env.get(name, "").strip()}
