"""Which GPU class runs a job: the memory plan's table, the time estimate, the offered classes.

The memory plan (`gpu.tools.plan`) measured every accepted job on the model and recorded, for
each GPU count, the cheapest offered GPU type it fits and whether that GPU class keeps the
encoders in host memory (`gpu/tools/plan_table.py`); `choose_gpu` reads that table. A job
ESTIMATED too slow for one run on the GPUs it asked for goes to the fewest GPUs that finish it in
time (`gpu.tools.scaling`); `choose_class` names the deployment's Modal class for the choice.
No torch here: the API container and the Modal app's module import this.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from vap_shared.contract import GPU_COUNTS
from vap_shared.cost import DEFAULT_MODAL_PER_SECOND
from vap_shared.gpu_contract import GenerationSettings

from gpu.service.generation import target_size, valid_num_frames
from gpu.service.modal_settings import offered_class
from gpu.tools import plan_table
from gpu.tools.scaling import JobShape, estimate

GIB = 2**30


@dataclass(frozen=True)
class GpuType:
    name: str
    capacity_gib: float  # total memory as the driver reports it (nvidia-smi / torch total_memory)
    price_per_s: float  # Modal, USD per GPU-second
    modal: str  # Modal's gpu= name ("!" pins the type: plain "H100" may be upgraded)


# Cheapest first. B200 is not offered: every accepted job fits an H100 (H200 is the next size up).
OFFERED: tuple[GpuType, ...] = (
    GpuType("H100", 81559 / 1024, DEFAULT_MODAL_PER_SECOND["H100"], "H100!"),
    GpuType("H200", 143771 / 1024, DEFAULT_MODAL_PER_SECOND["H200"], "H200"),
)


@dataclass(frozen=True)
class GpuChoice:
    gpu_type: str  # "H100", "H200"
    count: int
    modal_gpu: str  # Modal's gpu= string: "H100!", "H200", "H100!:8"
    peak_gib: float  # estimated peak per GPU, margin included
    capacity_gib: float
    offload_encoders: bool = False  # load_pipeline(offload_encoders=...) for this GPU class
    price_per_s: float = 0.0  # for all `count` GPUs


class DoesNotFit(ValueError):
    """No offered GPU has the memory for this job."""


class SubmitRejected(Exception):
    """The job cannot be submitted: `status_code` 422 (no offered GPU can run it: permanent) or
    503 (this deployment cannot take it now; the caller may retry or fall back)."""

    def __init__(self, status_code: int, message: str) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message


def modal_gpu(gpu: GpuType, count: int) -> str:
    return gpu.modal if count == 1 else f"{gpu.modal}:{count}"


def gpu_type(name: str) -> GpuType:
    return next(g for g in OFFERED if g.name == name)


# -- the memory plan's table ----------------------------------------------------------------


def read_table() -> dict[str, Any]:
    """gpu/tools/plan_table.py in `gpu.tools.plan.build_table`'s shape."""
    t = plan_table
    n = len(t.JOB_FIELDS)
    jobs = [
        {**dict(zip(t.JOB_FIELDS, row[:n], strict=True)), "phases": dict(zip(t.PHASES, row[n:], strict=True))}
        for row in t.JOBS
    ]
    return {"weights": dict(t.WEIGHTS), "offload_encoders": dict(t.OFFLOAD_ENCODERS), "jobs": jobs}


_TABLE: dict[str, Any] | None = None


def _load_table() -> dict[str, Any]:
    global _TABLE
    if _TABLE is None:
        _TABLE = read_table()
    return _TABLE


_INDEX: dict[tuple[int, int, int, int], dict[str, Any]] | None = None


def _index() -> dict[tuple[int, int, int, int], dict[str, Any]]:
    global _INDEX
    if _INDEX is None:
        jobs = _load_table()["jobs"]
        _INDEX = {(j["width"], j["height"], j["num_frames"], j["gpus"]): j for j in jobs}
    return _INDEX


def offload_encoders(gpu: str, count: int = 1) -> bool:
    """Whether the Modal class for `gpu` × `count` loads with `offload_encoders=True`."""
    return bool(_load_table()["offload_encoders"].get(f"{gpu}:{count}", False))


def choose_gpu(width: int, height: int, num_frames: int, gpus: int = 1) -> GpuChoice:
    """The cheapest offered GPU class that runs this job (`num_frames` as requested: the GPU runs
    its nearest 4k+1). `DoesNotFit` when none can; `ValueError` for a size the service does not
    accept or a GPU count it does not offer."""
    if gpus not in GPU_COUNTS:
        raise ValueError(f"gpus must be one of {GPU_COUNTS}, got {gpus}")
    job = _index().get((width, height, valid_num_frames(num_frames), gpus))
    if job is None:
        raise ValueError(f"{width}x{height} is not an accepted size")
    if job["gpu"] is None:
        raise DoesNotFit(
            f"{width}x{height}, {num_frames} frames needs more memory than any offered GPU "
            f"({', '.join(g.name for g in OFFERED)})"
        )
    gpu = gpu_type(job["gpu"])
    return GpuChoice(
        gpu_type=gpu.name,
        count=gpus,
        modal_gpu=modal_gpu(gpu, gpus),
        peak_gib=job["peak_bytes"] / GIB,
        capacity_gib=gpu.capacity_gib,
        offload_encoders=offload_encoders(gpu.name, gpus),
        price_per_s=gpu.price_per_s * gpus,
    )


# -- the GPU class of a job ------------------------------------------------------------------


class GpuChoiceLike(Protocol):
    modal_gpu: str


ChooseGpu = Callable[..., GpuChoiceLike]  # as `choose_gpu(width, height, num_frames, gpus=1)`


def gpus_within(
    width: int, height: int, frames: int, steps: int, gpus: int, run_limit_s: float | None
) -> list[int]:
    """GPU counts to try for a job, fewest first: the requested count, then larger ones, keeping
    only those whose ESTIMATED generation time (`gpu.tools.scaling`) fits the run limit; the
    requested count alone when none does (or there is no limit)."""
    if run_limit_s is None:
        return [gpus]
    shape = JobShape(width, height, frames, steps)
    fitting: list[int] = [n for n in GPU_COUNTS if n >= gpus and estimate(shape, n).total_s <= run_limit_s]
    return fitting or [gpus]


def choose_class(
    settings: GenerationSettings,
    gpus: int,
    offered: Iterable[str],
    choose: tuple[ChooseGpu, type[Exception]] | None = None,
    *,
    steps: int = 50,
    run_limit_s: float | None = None,
) -> str:
    """The offered Modal GPU string (one class each) that `choose_gpu` (or `choose`, a stand-in)
    picks for a job of these settings. With `run_limit_s`, a job too slow for one run on `gpus`
    GPUs goes to the fewest offered GPUs that finish it in time (the sidecar's `gpus` is a
    minimum). Raises `SubmitRejected`: 422 when no offered GPU can run it, 503 when the plan
    names a GPU this deployment has no class for."""
    pick, does_not_fit = choose or (choose_gpu, DoesNotFit)
    width, height = target_size(settings.aspect_ratio, settings.resolution)
    frames = valid_num_frames(settings.num_frames)
    available = sorted(offered)
    counts = gpus_within(width, height, frames, steps, gpus, run_limit_s)
    for count in counts:
        try:
            choice = pick(width, height, frames, gpus=count)
        except does_not_fit as exc:
            if count == counts[-1]:
                raise SubmitRejected(422, f"no offered GPU can run this job: {exc}") from exc
            continue
        offered_gpu = offered_class(choice.modal_gpu, available)  # "H100!:8" and "H100:8": one class
        if offered_gpu is not None:
            return offered_gpu
    raise SubmitRejected(
        503, f"this deployment has no {choice.modal_gpu} class (offers {', '.join(available)})"
    )
