"""gpu/tools/check.py (`make gpu-check`): its CPU path writes every section; a section that fails
or hangs is reported and the next one runs."""

from __future__ import annotations

import pytest

from gpu.tools import check

MARKER = "<!-- gpu.tools.check output below: generated, do not edit -->"


def test_the_checked_attention_shapes_are_the_models():
    shapes = {s.name: s for s in check.attention_shapes(cpu=False)}
    joint = shapes["joint self-attention 720p/121"]
    # 720p, 121 frames: 31 x 45 x 80 tokens per stream, main + reference, CFG batch 2, 40 x 128.
    assert (joint.batch, joint.queries, joint.heads, joint.dim) == (2, 2 * 111_600, 40, 128)
    assert joint.elements > 2**31 and joint.layout == "heads-major"
    assert shapes["cross-attention 480p/49, image"].keys == 257
    assert shapes["cross-attention 480p/49, text"].keys == 512
    received = shapes["8-GPU shard 480p/49, received"]
    assert (received.heads, received.queries, received.layout) == (5, 2 * 20_280, "received")


@pytest.mark.slow
def test_the_cpu_path_writes_every_section(tmp_path):
    doc = tmp_path / "gpu-benchmarks.md"
    doc.write_text(f"# GPU benchmarks\n\nHow to read it.\n\n{MARKER}\n\nan older run\n")
    assert check.main(["--cpu", "--write", str(doc)]) == 0
    text = doc.read_text()
    assert text.startswith("# GPU benchmarks\n\nHow to read it.") and "an older run" not in text
    assert "**GPU figures: unmeasured.**" in text
    for section in check.SECTIONS:
        assert f"### {section.title}" in text
    assert text.count("Section status: ok") == len(check.SECTIONS)
    assert "| joint self-attention 720p/121 |" in text and "| _native_math |" in text
    assert "End-to-end pipeline (48x32x9, 2 steps" in text  # the bench's smoke run
    assert "| gloo | 1 |" in text and "| pageable (host to host: no CUDA) |" in text
    assert text.rstrip().endswith("Result: all checks passed")


@pytest.mark.slow
def test_a_section_that_hangs_or_fails_is_reported_and_the_next_one_runs(tmp_path):
    doc = tmp_path / "report.md"
    sections = [
        check.Section("machine", "Machine", 0.2),  # cannot even import torch in time
        check.Section("no_such_section", "Nothing", 30),  # the child exits with an error
        check.Section("host_to_device", "Host to device", 60),
    ]
    results = check.run_all(cpu=True, write=doc, sections=sections)
    assert results["machine"]["status"] == "timed out after 0 s"
    assert results["no_such_section"]["status"].startswith("failed: exit status 2")
    assert results["host_to_device"]["status"] == "ok"
    assert check.problems(results)[:2] == [
        "machine: timed out after 0 s",
        "no_such_section: failed: exit status 2",
    ]
    text = doc.read_text()
    assert "Section status: timed out" in text and "| pageable (host to host: no CUDA) |" in text


def test_the_wheel_bundles_are_exact_locks_that_leave_torch_to_the_machine():
    from gpu.tools import wheels

    pure, fa4 = (wheels.pins(bundle.requirements) for bundle in wheels.BUNDLES)
    assert "torch" not in pure and "torch" not in fa4 and "triton" not in fa4
    # The GPU code's own pins (requirements/gpu.txt) and the Modal image's FlashAttention 4.
    gpu_pins = {
        wheels.normalise(line.split("==")[0]): line.split("==")[1].strip()
        for line in (wheels.ROOT / "requirements" / "gpu.txt").read_text().splitlines()
        if "==" in line and not line.startswith("#")
    }
    for name in ("diffusers", "transformers", "tokenizers", "ftfy"):
        assert pure[name] == gpu_pins[name]
    assert {"pydantic", "pydantic-core", "wcwidth", "huggingface-hub"} <= set(pure)
    modal_app = (wheels.ROOT / "gpu" / "service" / "modal_app.py").read_text()
    assert f'"flash-attn-4[cu13]=={fa4["flash-attn-4"]}"' in modal_app
    assert {"nvidia-cutlass-dsl", "nvidia-cutlass-dsl-libs-cu13", "quack-kernels"} <= set(fa4)


def test_install_takes_only_the_pins_missing_at_their_version(monkeypatch, tmp_path):
    from gpu.tools import wheels

    lock = tmp_path / "lock.txt"
    lock.write_text("# a lock\ndiffusers==0.42.1\nftfy==6.3.1  # text cleaning\npydantic_core==2.46.5\n")
    bundle = wheels.Bundle("test", lock, required=True)
    monkeypatch.setattr(
        wheels, "installed", lambda paths=None: {"diffusers": "0.35.0", "ftfy": "6.3.1"} if not paths else {}
    )
    assert wheels.missing(bundle, tmp_path / "site") == ["diffusers==0.42.1", "pydantic-core==2.46.5"]
    lock.write_text("diffusers>=0.42\n")
    with pytest.raises(ValueError, match="not an exact pin"):
        wheels.pins(lock)
