"""Estimated cost of one job: GPU seconds at Modal's price, fal's price per video, and AWS.

The `cost` object goes into `metadata.json`, `status.json` and the notification (schema 1.1). It
is an estimate from the stack's configured prices, never a bill: Modal bills whole containers
(start-up, model load and idle time before scale-down are not in a job's GPU seconds), and fal's
and AWS's prices change. Prices come from stack parameters (`ModalPricePerSecondH100`,
`ModalPricePerSecondH200`, `FalPricePerVideo`) through the environment.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from .settings_parser import number

# Defaults: Modal's list prices per GPU-second (H100 $3.95/h, H200 $4.54/h) and fal's price for
# fal-ai/video-as-prompt in third-party price tables (unverified on fal's own page).
DEFAULT_MODAL_PER_SECOND: Final[Mapping[str, float]] = {"H100": 0.001097, "H200": 0.001261}
DEFAULT_FAL_PER_VIDEO: Final = 1.00
# Lambda, S3, DynamoDB, SQS, SNS and Secrets Manager for one job at us-east-1 list prices, as
# measured by `make bench` (docs/benchmarks.md, "cost per video": AWS 0.0006).
AWS_PER_JOB: Final = 0.0006
# A device whose type we cannot tell (the local CPU server, a new GPU) is priced as this one.
DEFAULT_GPU_TYPE: Final = "H100"

ENV_MODAL_PRICE: Final = "MODAL_PRICE_PER_SECOND_{gpu}"
ENV_FAL_PRICE: Final = "FAL_PRICE_PER_VIDEO"
CURRENCY: Final = "USD"
NOTE: Final = (
    "Estimate from the stack's configured prices: GPU seconds of the run (not container start-up "
    "or idle time), fal's price per video, and an average AWS cost per job. Not a bill."
)
_ROUND = 6


def _price(env: Mapping[str, str], name: str, default: float) -> float:
    """A price in the environment: a finite number of at least 0 (else `SettingsError`)."""
    return number(env, name, default, low=0)


@dataclass(frozen=True)
class Prices:
    modal_per_second: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_MODAL_PER_SECOND))
    fal_per_video: float = DEFAULT_FAL_PER_VIDEO
    aws_per_job: float = AWS_PER_JOB

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Prices:
        env = os.environ if env is None else env
        modal = {
            gpu: _price(env, ENV_MODAL_PRICE.format(gpu=gpu), default)
            for gpu, default in DEFAULT_MODAL_PER_SECOND.items()
        }
        return cls(modal, _price(env, ENV_FAL_PRICE, DEFAULT_FAL_PER_VIDEO))

    def per_gpu_second(self, gpu_type: str) -> float:
        return self.modal_per_second.get(gpu_type, self.modal_per_second[DEFAULT_GPU_TYPE])


def gpu_type_of(device: str | None) -> str | None:
    """`NVIDIA H100 80GB HBM3` -> `H100`; None for `cpu` or a GPU without a configured price."""
    found = re.search(r"\b(H100|H200)\b", device or "", re.IGNORECASE)
    return found.group(1).upper() if found else None


@dataclass(frozen=True)
class GpuRun:
    """One run on Modal: its GPU seconds, the GPU type (or device name) and how many GPUs it held."""

    seconds: float
    gpu_type: str | None = None
    gpu_count: int = 1
    device: str | None = None


def _gpu_item(prices: Prices, run: GpuRun) -> dict[str, Any]:
    gpu_type = run.gpu_type or gpu_type_of(run.device) or DEFAULT_GPU_TYPE
    unit = prices.per_gpu_second(gpu_type)
    seconds = max(0.0, float(run.seconds))
    count = max(1, int(run.gpu_count))
    return {
        "backend": "modal",
        "what": "gpu_seconds",
        "gpu_type": gpu_type,
        "gpu_count": count,
        "quantity": round(seconds, 3),
        "unit_price": unit,
        "amount": round(seconds * count * unit, _ROUND),
    }


def estimate(
    prices: Prices, gpu_runs: Iterable[GpuRun] = (), fal_videos: int = 0, include_aws: bool = True
) -> dict[str, Any]:
    """The `cost` object: one item per GPU run, fal videos and AWS; `total` is their sum (USD)."""
    items = [_gpu_item(prices, run) for run in gpu_runs]
    if fal_videos:
        items.append(
            {
                "backend": "fal",
                "what": "videos",
                "quantity": fal_videos,
                "unit_price": prices.fal_per_video,
                "amount": round(fal_videos * prices.fal_per_video, _ROUND),
            }
        )
    if include_aws:
        items.append(
            {
                "backend": "aws",
                "what": "requests",
                "quantity": 1,
                "unit_price": prices.aws_per_job,
                "amount": prices.aws_per_job,
            }
        )
    return {
        "estimate": True,
        "currency": CURRENCY,
        "total": round(sum(float(i["amount"]) for i in items), _ROUND),
        "items": items,
        "note": NOTE,
    }


def gpu_run_of_result(result: Mapping[str, Any], gpu_count: int = 1, gpu_type: str | None = None) -> GpuRun:
    """A GPU run from a `GpuResult` (dumped): `timings.total_s` (download, generate, encode, upload)
    on the device it names. `gpu_type`/`gpu_count` are what the job was dispatched with, if known."""
    timings = result.get("timings") or {}
    seconds = timings.get("total_s")
    if not isinstance(seconds, int | float):
        seconds = sum(v for k, v in timings.items() if k.endswith("_s") and isinstance(v, int | float))
    return GpuRun(float(seconds), gpu_type, gpu_count, str(result.get("gpu") or "") or None)


def by_backend(costs: Iterable[Mapping[str, Any] | None]) -> dict[str, float]:
    """Sum the items of many `cost` objects per backend (`modal`, `fal`, `aws`): for `vap cost`."""
    totals: dict[str, float] = {}
    for cost in costs:
        for item in (cost or {}).get("items") or []:
            backend = str(item.get("backend") or "other")
            amount = item.get("amount")
            if isinstance(amount, int | float) and not isinstance(amount, bool):
                totals[backend] = round(totals.get(backend, 0.0) + float(amount), _ROUND)
    return totals
