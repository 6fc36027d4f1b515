"""`python -m gpu.tools.resume_cost` measures what a save of the denoising state costs and writes the
table into docs/gpu.md (the figures there come from it, never by hand)."""

from __future__ import annotations

from pathlib import Path

from gpu.tools import resume_cost

DOC = Path(__file__).resolve().parents[2] / "docs" / "gpu.md"


def test_the_cost_is_measured_on_the_real_state_and_written_between_the_markers(tmp_path):
    costs = resume_cost.measure(sizes=[("small", 64, 32, 9)])
    tiny, small = costs
    assert tiny.state_bytes > 0 and tiny.blocked_ms >= 0 and tiny.background_ms >= 0
    # Four latent-sized float32 tensors (latents, last sample, two model outputs) and a header.
    assert small.latent_shape == (1, 16, 3, 4, 8)
    latent_bytes = 16 * 3 * 4 * 8 * 4
    assert 4 * latent_bytes < small.state_bytes < 4 * latent_bytes + 4096
    doc = tmp_path / "doc.md"
    doc.write_text(f"before\n{resume_cost.BEGIN}\nold figures\n{resume_cost.END}\nafter\n")
    resume_cost.write(doc, resume_cost.report(costs))
    text = doc.read_text()
    assert "old figures" not in text and "| small | 1×16×3×4×8 |" in text
    assert text.startswith("before\n") and text.endswith(f"{resume_cost.END}\nafter\n")


def test_docs_hold_the_generated_table():
    text = DOC.read_text(encoding="utf-8")
    block = text[text.index(resume_cost.BEGIN) : text.index(resume_cost.END)]
    assert "| 720p, 121 frames | 1×16×31×90×160 | 114,279,934" in block
