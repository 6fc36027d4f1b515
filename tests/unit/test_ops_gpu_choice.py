"""The README's cost-vs-latency table per GPU count is the output of its named command, and its
prices are the cost model's."""

from __future__ import annotations

from pathlib import Path

import pytest
from vap_shared.contract import GPU_COUNTS
from vap_shared.cost import DEFAULT_MODAL_PER_SECOND

from bench import gpu_choice
from gpu.tools import scaling

README = Path(__file__).resolve().parents[2] / "README.md"


def test_the_readme_section_is_the_commands_output() -> None:
    text = README.read_text(encoding="utf-8")
    start, end = text.index(gpu_choice.BEGIN), text.index(gpu_choice.END) + len(gpu_choice.END)
    assert text[start:end] == gpu_choice.section(), (
        "README.md's GPU-count table is stale: run `python -m bench.gpu_choice --write README.md`"
    )


def test_the_table_has_every_gpu_count_for_each_job_and_says_it_is_an_estimate() -> None:
    rows = [line for line in gpu_choice.section().splitlines() if line.startswith("| ") and "job:" in line]
    assert len(rows) == len(gpu_choice.JOBS) * len(GPU_COUNTS)
    assert [row.split("|")[3].strip() for row in rows[:4]] == [str(n) for n in GPU_COUNTS]
    assert "ESTIMATES, not measurements" in gpu_choice.section()
    # More GPUs: shorter, never cheaper (the GPU-seconds multiply by the count).
    for _, shape in gpu_choice.JOBS:
        estimates = scaling.table(shape, gpu_choice.hardware(shape))
        assert [e.total_s for e in estimates] == sorted((e.total_s for e in estimates), reverse=True)
        assert [e.cost_usd for e in estimates] == sorted(e.cost_usd for e in estimates)


def test_the_scaling_model_prices_gpus_as_the_cost_estimate_does() -> None:
    assert scaling.H100.price_per_gpu_s == DEFAULT_MODAL_PER_SECOND["H100"]
    assert scaling.H200.price_per_gpu_s == DEFAULT_MODAL_PER_SECOND["H200"]


def test_write_replaces_only_the_marked_section(tmp_path: Path) -> None:
    target = tmp_path / "README.md"
    target.write_text(f"before\n{gpu_choice.BEGIN}\nold\n{gpu_choice.END}\nafter\n", encoding="utf-8")
    assert gpu_choice.main(["--write", str(target)]) == 0
    assert target.read_text(encoding="utf-8") == f"before\n{gpu_choice.section()}\nafter\n"
    target.write_text("no markers\n", encoding="utf-8")
    with pytest.raises(ValueError, match="no generated GPU-choice section"):
        gpu_choice.main(["--write", str(target)])
