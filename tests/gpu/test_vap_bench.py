"""gpu/tools/bench.py: the CPU smoke run goes through the same code as `--full` on a GPU."""

from __future__ import annotations

import pytest

from gpu.tools import bench

pytestmark = pytest.mark.slow

MARKER = "<!-- gpu.tools.bench output below: generated, do not edit -->"


def test_smoke_run_reports_every_section_and_writes_the_document(tmp_path, capsys):
    doc = tmp_path / "gpu-benchmarks.md"
    doc.write_text(f"# GPU benchmarks\n\nHand-written format notes.\n\n{MARKER}\n\nold output\n")
    assert bench.main(["--smoke", "--vae", "--write", str(doc)]) == 0
    out = capsys.readouterr().out
    assert "| bfloat16 |" in out  # the VAE precision table
    assert "| native | no |" in out and "| _native_math | no |" in out
    assert "unavailable (probe failed)" in out  # flash_4 is not installed here: a row, not a crash
    assert "End-to-end pipeline (48x32x9, 2 steps" in out and "Result: all checks passed" in out
    text = doc.read_text()
    assert text.startswith("# GPU benchmarks\n\nHand-written format notes.")  # prose kept
    assert "old output" not in text and text.count(MARKER) == 1
    assert "**GPU figures: unmeasured.**" in text and "### Run: smoke on cpu" in text


def test_a_backend_that_disagrees_with_the_math_kernel_fails_the_run(monkeypatch, capsys):
    monkeypatch.setattr(bench, "kernel_check", lambda backend, *a: 0.5 if backend == "_native_math" else 1e-3)
    assert bench.main(["--smoke", "--no-pipeline"]) == 1
    assert "_native_math (compile=False): kernel rel err 5.00e-01" in capsys.readouterr().out


def test_a_planned_job_that_does_not_fit_fails_the_run(monkeypatch, capsys):
    job = {"num_frames": 121, "height": 720, "width": 1280, "peak_bytes": 70 * 2**30}
    monkeypatch.setattr(bench, "planned_jobs", lambda device: [("H100", job)])

    def oom(name, job, factory, device):
        return {
            "gpu": name,
            "shape": "1280x720x121",
            "offload_encoders": True,
            "planned_gib": 70.0,
            "capacity_gib": 79.6,
            "fits": False,
            "error": "OutOfMemoryError: ...",
        }

    monkeypatch.setattr(bench, "check_memory", oom)
    assert bench.main(["--smoke", "--iters", "1", "--pipeline-steps", "1"]) == 1
    out = capsys.readouterr().out
    assert "largest planned H100 job 1280x720x121 does not fit" in out
    assert "| H100 | 1280x720x121 | yes | 70.0 |" in out


@pytest.mark.skipif(bench.torch.cuda.is_available(), reason="on a GPU machine --full would run")
def test_full_needs_a_gpu():
    with pytest.raises(SystemExit):
        bench.main(["--full"])


def test_full_size_pipeline_code_builds_and_runs_with_small_configs(monkeypatch):
    # The --full branch (components from gpu.vap.released, random weights, the safety checker)
    # with the encoders' configs shrunk so it runs on a CPU; the VAE is the real layout.
    import torch

    from gpu.vap import configs, released
    from gpu.vap.tiny import IMAGE_DIM, TEXT_DIM, build_tiny_transformer

    monkeypatch.setitem(configs.UMT5_XXL_CONFIG, "vocab_size", 64)
    for key, value in {"d_model": TEXT_DIM, "d_kv": 8, "d_ff": 32, "num_layers": 1, "num_heads": 2}.items():
        monkeypatch.setitem(configs.UMT5_XXL_CONFIG, key, value)
    for key, value in {"hidden_size": IMAGE_DIM, "intermediate_size": 8, "num_hidden_layers": 2}.items():
        monkeypatch.setitem(configs.CLIP_VIT_H_CONFIG, key, value)
    monkeypatch.setitem(configs.CLIP_VIT_H_CONFIG, "num_attention_heads", 2)
    for key, value in {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1}.items():
        monkeypatch.setitem(configs.SAFETY_VISION_CONFIG, key, value)
    monkeypatch.setitem(configs.SAFETY_VISION_CONFIG, "num_attention_heads", 2)
    monkeypatch.setattr(released, "TEXT_DTYPE", torch.float32)
    cpu = torch.device("cpu")
    pipe = bench.build_pipeline(True, cpu, offload_encoders=True, transformer=build_tiny_transformer(0))
    assert pipe.encoders_offloaded
    result = bench.run_pipeline(pipe, bench.safety_classifier(True, cpu), bench.Shape(5, 16, 32), 2, cpu)
    assert result["steps"] == 2 and result["pipeline_s"] > 0 and "s_per_step" in result


def test_a_section_that_raises_is_recorded_and_the_next_one_runs(monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(bench, "run_pipeline", broken)  # not an out-of-memory error
    assert bench.main(["--smoke", "--vae", "--iters", "1"]) == 1
    out = capsys.readouterr().out
    assert "section pipeline: RuntimeError: CUDA error: an illegal memory access" in out
    assert "| pipeline | failed: RuntimeError" in out
    assert "| bfloat16 |" in out and "| vae | ok |" in out  # the section after it ran


def test_the_report_is_written_after_every_section(monkeypatch, tmp_path):
    doc = tmp_path / "bench.md"
    seen: dict[str, str] = {}
    real = bench.bench_vae

    def vae_reads_the_document(full, device):
        seen["doc"] = doc.read_text() if doc.exists() else ""
        return real(full, device)

    monkeypatch.setattr(bench, "bench_vae", vae_reads_the_document)
    assert bench.main(["--smoke", "--vae", "--iters", "1", "--write", str(doc)]) == 0
    # When the VAE section started, the backends and the pipeline were already on disk.
    assert "| native | no |" in seen["doc"] and "End-to-end pipeline (48x32x9" in seen["doc"]
    assert "| bfloat16 |" not in seen["doc"] and "| bfloat16 |" in doc.read_text()
