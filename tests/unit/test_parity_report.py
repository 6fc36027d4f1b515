"""`make parity`: runnable from the project's own requirements, figures written by the check (never
copied by hand), and a clear failure when the reference code is not on the machine."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gpu.tools.parity import report

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "parity.md"


def test_the_reference_imports_are_installed_by_make_venv() -> None:
    # The reference's transformer imports einops; `make venv` installs requirements/dev.txt.
    assert re.search(r"^einops==", (ROOT / "requirements" / "dev.txt").read_text(), re.MULTILINE)
    assert importlib.util.find_spec("einops") is not None


def test_the_documented_result_is_exactly_what_the_check_wrote() -> None:
    text = DOC.read_text(encoding="utf-8")
    run = report.run_of(text)
    assert report.section(text) == report.render(run)  # nobody edited the table by hand
    assert run.ok and re.fullmatch(r"[0-9a-f]{40}", run.reference_commit)
    checks = " / ".join(r.check for r in run.rows)
    for needed in ("14B layout", "transformer fp32, batch 1", "CFG batch 2", "pipeline fp32", "control"):
        assert needed in checks
    assert "make parity" in report.section(text)
    assert {"python", "torch", "diffusers", "transformers", "einops"} <= set(run.versions)


def test_replacing_the_section_keeps_the_rest_of_the_document() -> None:
    run = report.Run("2026-01-01", "abc", {"python": "3.11"}, 1e-5, rows=[report.Row("x", "rel 1e-7", True)])
    document = f"intro\n{report.BEGIN}\nold figures\n{report.END}\noutro\n"
    replaced = report.replace_section(document, run)
    assert replaced.startswith("intro\n") and replaced.endswith("\noutro\n")
    assert "old figures" not in replaced and "| x | rel 1e-7 | PASS |" in replaced
    assert report.run_of(replaced) == run
    failed = report.Run("2026-01-01", "abc", {}, 1e-5, rows=[report.Row("x", "rel 1", False)])
    assert "**FAIL**" in report.render(failed) and "exited 1" in report.render(failed)
    with pytest.raises(ValueError):
        report.replace_section("no markers here", run)


def test_without_the_reference_it_says_so_and_writes_nothing(tmp_path: Path) -> None:
    doc = tmp_path / "parity.md"
    shutil.copy(DOC, doc)
    before = doc.read_text()
    env = {**os.environ, "VAP_REFERENCE": "", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "gpu.tools.parity.check_reference", "--reference", str(tmp_path / "absent"),
         "--write", str(doc)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr[-2000:]
    assert "downloads nothing" in done.stderr and "No figures were written" in done.stderr
    assert doc.read_text() == before


def _git(*args: str, cwd: Path) -> str:
    return subprocess.run(
        ["git", *args], cwd=cwd, capture_output=True, text=True, check=True, timeout=60
    ).stdout.strip()


def test_a_git_mirror_is_exported_with_its_commit(tmp_path: Path) -> None:
    from gpu.tools.parity.check_reference import ReferenceMissing, reference_tree

    work = tmp_path / "work"
    fork = work / "diffusers" / "src" / "diffusers"
    fork.mkdir(parents=True)
    (fork / "marker.py").write_text("VALUE = 1\n")
    (work / "README.md").write_text("not exported\n")
    _git("init", "-q", cwd=work)
    _git("add", ".", cwd=work)
    _git("-c", "user.name=t", "-c", "user.email=t@example.com", "commit", "-qm", "c", cwd=work)
    commit = _git("rev-parse", "HEAD", cwd=work)
    _git("clone", "-q", "--mirror", str(work), str(tmp_path / "mirror.git"), cwd=tmp_path)

    with reference_tree(tmp_path / "mirror.git") as (tree, got):
        assert got == commit
        assert (tree / "diffusers" / "src" / "diffusers" / "marker.py").read_text() == "VALUE = 1\n"
        exported = tree
    assert not exported.exists()  # a temporary export, removed afterwards
    with reference_tree(work) as (tree, got):  # a checkout is used in place
        assert (tree, got) == (work, commit)
    with pytest.raises(ReferenceMissing, match="downloads nothing"), reference_tree(tmp_path / "absent"):
        pass
