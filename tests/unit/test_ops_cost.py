"""vap_shared.cost: the `cost` object of metadata.json and the notification."""

from __future__ import annotations

import pytest
from vap_shared.cost import (
    AWS_PER_JOB,
    GpuRun,
    Prices,
    by_backend,
    estimate,
    gpu_run_of_result,
    gpu_type_of,
)
from vap_shared.settings_parser import SettingsError

from tests.notification_schema import _validator


def cost_problems(cost: object) -> list[str]:
    return [e.message for e in _validator("cost").iter_errors(cost)]


def test_defaults_are_the_documented_prices() -> None:
    prices = Prices.from_env({})
    assert prices.modal_per_second == {"H100": 0.001097, "H200": 0.001261}
    assert prices.fal_per_video == 1.00


def test_prices_from_the_stack_parameters() -> None:
    env = {
        "MODAL_PRICE_PER_SECOND_H100": "0.002",
        "MODAL_PRICE_PER_SECOND_H200": "0.003",
        "FAL_PRICE_PER_VIDEO": "0.5",
    }
    prices = Prices.from_env(env)
    assert prices.modal_per_second == {"H100": 0.002, "H200": 0.003} and prices.fal_per_video == 0.5
    for bad in ("x", "-1", "nan", "inf"):
        with pytest.raises(SettingsError, match="FAL_PRICE_PER_VIDEO must be a number of at least 0"):
            Prices.from_env({"FAL_PRICE_PER_VIDEO": bad})


def test_modal_run_priced_per_gpu_type_and_count() -> None:
    prices = Prices()
    one = estimate(prices, [GpuRun(240.0, "H100", 1)])
    (gpu, aws) = one["items"]
    assert gpu == {
        "backend": "modal",
        "what": "gpu_seconds",
        "gpu_type": "H100",
        "gpu_count": 1,
        "quantity": 240.0,
        "unit_price": 0.001097,
        "amount": 0.26328,
    }
    assert aws["backend"] == "aws" and aws["amount"] == AWS_PER_JOB
    assert one["total"] == pytest.approx(0.26328 + AWS_PER_JOB)
    assert one["estimate"] is True and one["currency"] == "USD" and "estimate" in one["note"].lower()
    eight = estimate(prices, [GpuRun(100.0, "H200", 8)], include_aws=False)
    assert eight["items"][0]["amount"] == pytest.approx(100 * 8 * 0.001261)
    assert cost_problems(one) == [] and cost_problems(eight) == []


def test_fallback_after_a_gpu_run_pays_both() -> None:
    cost = estimate(Prices(), [GpuRun(60.0, device="NVIDIA H100 80GB HBM3")], fal_videos=1)
    assert [i["backend"] for i in cost["items"]] == ["modal", "fal", "aws"]
    assert cost["total"] == pytest.approx(60 * 0.001097 + 1.0 + AWS_PER_JOB)
    assert cost_problems(cost) == []


def test_device_names_and_results() -> None:
    assert gpu_type_of("NVIDIA H200") == "H200"
    assert gpu_type_of("NVIDIA H100 80GB HBM3") == "H100"
    assert gpu_type_of("cpu") is None and gpu_type_of(None) is None
    result = {"gpu": "NVIDIA H200", "timings": {"download_s": 1.0, "generate_s": 200.0, "total_s": 210.5}}
    run = gpu_run_of_result(result, gpu_count=2)
    assert run == GpuRun(210.5, None, 2, "NVIDIA H200")
    (item, _aws) = estimate(Prices(), [run])["items"]
    assert item["gpu_type"] == "H200" and item["amount"] == pytest.approx(210.5 * 2 * 0.001261)
    # Without total_s: the parts; an unknown device (the local CPU server) is priced as an H100.
    cpu = gpu_run_of_result({"gpu": "cpu", "timings": {"generate_s": 3.0, "encode_s": 1.0}})
    (item, _aws) = estimate(Prices(), [cpu])["items"]
    assert item["gpu_type"] == "H100" and item["quantity"] == 4.0


def test_reused_and_failed_before_a_backend_cost_only_aws() -> None:
    cost = estimate(Prices())
    assert [i["backend"] for i in cost["items"]] == ["aws"] and cost["total"] == AWS_PER_JOB


def test_sum_by_backend() -> None:
    costs = [
        estimate(Prices(), [GpuRun(100.0, "H100")]),
        estimate(Prices(), fal_videos=1),
        None,  # a job without a cost (cancelled, or older than the feature)
        {"items": [{"backend": "fal", "amount": "oops"}]},
    ]
    totals = by_backend(costs)
    assert totals == {
        "modal": pytest.approx(0.1097),
        "fal": 1.0,
        "aws": pytest.approx(2 * AWS_PER_JOB),
    }
