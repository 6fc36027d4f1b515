"""The Lambda layer (arm64, python3.13) is built and checked on every run, on any machine: pip's
cross-platform install of shared/requirements.txt + vap_shared, then what Lambda would load (CI
covers what a fresh machine can). Needs PyPI, as `make venv` does."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from vap_cli import layer

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return layer.build(tmp_path_factory.mktemp("layer") / "out")


def _copy(built: Path, tmp_path: Path) -> Path:
    out = tmp_path / "copy"
    shutil.copytree(built, out)
    return out


def test_the_layer_builds_for_lambda_arm64_and_passes_every_check(built: Path) -> None:
    report = layer.check(built)
    assert report.ok, report.text()
    python = built / "python"
    assert (python / "vap_shared" / "config.py").is_file()
    assert not (python / "bin").exists()  # console scripts name this machine's interpreter
    # The compiled dependencies are there, for aarch64 / cp313 or the stable ABI.
    assert list(python.glob("pydantic_core/*.cpython-313-aarch64-linux-gnu.so"))
    assert list(python.glob("nacl/*.abi3.so"))
    assert all(layer.elf_machine(python / rel) == layer.EM_AARCH64 for rel in report.compiled)
    # The handlers' Powertools modules were really imported from the layer.
    assert "aws_lambda_powertools.utilities.batch" in report.imported and "httpx" in report.imported
    assert 1e6 < report.unzipped_bytes < layer.UNZIPPED_LIMIT_BYTES
    assert 0 < report.zipped_bytes < report.unzipped_bytes
    assert set(report.function_bytes) >= {"ingest", "webhook", "sweeper"}


def test_the_pip_command_asks_for_lambda_wheels_only(tmp_path: Path) -> None:
    command = layer.pip_command(tmp_path, ROOT / "shared" / "requirements.txt")
    assert "--only-binary=:all:" in command and "--no-compile" in command
    assert command[command.index("--python-version") + 1] == "3.13"
    assert command[command.index("--implementation") + 1] == "cp"
    platforms = [command[i + 1] for i, arg in enumerate(command) if arg == "--platform"]
    assert platforms and all(p.endswith("_aarch64") for p in platforms)


@pytest.mark.parametrize(
    ("tag", "ok"),
    [
        ("py3-none-any", True),
        ("cp313-cp313-manylinux_2_17_aarch64", True),
        ("cp313-cp313-manylinux2014_aarch64", True),
        ("cp38-abi3-manylinux_2_34_aarch64", True),
        ("cp313-cp313-manylinux_2_17_x86_64", False),
        ("cp312-cp312-manylinux_2_17_aarch64", False),
        ("cp313-cp313-manylinux_2_39_aarch64", False),  # newer glibc than Amazon Linux 2023's
        ("cp314-abi3-manylinux_2_17_aarch64", False),
        ("cp313-cp313-musllinux_1_2_aarch64", False),
    ],
)
def test_wheel_tags(tag: str, ok: bool) -> None:
    assert layer._tag_ok(tag) is ok


def test_an_extension_for_this_machine_is_caught(built: Path, tmp_path: Path) -> None:
    out = _copy(built, tmp_path)
    import pydantic_core

    host = next(Path(pydantic_core.__file__ or "").parent.glob("_pydantic_core*.so"))
    shutil.copy(host, out / "python" / "pydantic_core" / host.name)
    problems = layer.check(out).problems
    assert any(host.name in p and "aarch64" in p for p in problems), problems


def test_a_missing_dependency_is_caught(built: Path, tmp_path: Path) -> None:
    out = _copy(built, tmp_path)
    shutil.rmtree(out / "python" / "httpcore")
    for info in (out / "python").glob("httpcore-*.dist-info"):
        shutil.rmtree(info)
    problems = layer.check(out).problems
    assert any("httpx needs ['httpcore']" in p for p in problems), problems


def test_an_import_the_layer_cannot_satisfy_is_caught(built: Path, tmp_path: Path) -> None:
    out = _copy(built, tmp_path)
    module = out / "python" / "vap_shared" / "uses_missing.py"
    module.write_text("import yaml\nfrom typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import moto\n")
    problems = layer.check(out).problems
    assert problems == ["vap_shared/uses_missing.py:1: `import yaml` does not resolve in Lambda"]


def test_a_broken_pure_module_is_caught(built: Path, tmp_path: Path) -> None:
    out = _copy(built, tmp_path)
    (out / "python" / "h11" / "__init__.py").write_text("raise RuntimeError('broken')\n")
    problems = layer.check(out).problems
    assert any(p.startswith("cannot import h11: RuntimeError") for p in problems), problems
