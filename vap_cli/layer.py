"""The Lambda layer for arm64 / python3.13, built and checked on any machine.

`sam build` needs a real python3.13 (or Docker) to build the layer; this builds the same layer with
pip's cross-platform install (wheels only, for Lambda's platform) and checks what it produced, so
CI proves the packaging on a machine with neither. `make deploy` deploys exactly this layer.

    python -m vap_cli.layer [--out DIR]     # build + check, prints the report; exit 1 on a problem
"""

from __future__ import annotations

import argparse
import ast
import email.parser
import re
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED = REPO_ROOT / "shared"
FUNCTIONS = REPO_ROOT / "functions"

PYTHON_VERSION = (3, 13)
# Lambda's python3.13 runtime runs on Amazon Linux 2023 (glibc 2.34), here on arm64 (Graviton).
GLIBC_MAX = (2, 34)
PLATFORMS = ("manylinux2014_aarch64", "manylinux_2_28_aarch64", "manylinux_2_34_aarch64")
# Lambda's own limit: a function's code plus all its layers, unzipped.
UNZIPPED_LIMIT_BYTES = 262_144_000
# What the python3.13 runtime itself provides (boto3 and its dependencies).
RUNTIME_PROVIDED = frozenset({"boto3", "botocore", "s3transfer", "jmespath", "dateutil", "urllib3", "six"})
EM_AARCH64 = 183  # ELF e_machine


def pip_command(target: Path, requirements: Path) -> list[str]:
    """The pip install that fetches the layer's dependencies as Lambda arm64/python3.13 wheels."""
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    return [
        sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-input",
        "--no-warn-conflicts", "--no-compile", "--target", str(target), *platforms,
        "--implementation", "cp", "--python-version", ".".join(map(str, PYTHON_VERSION)),
        "--only-binary=:all:", "-r", str(requirements),
    ]  # fmt: skip


def build(out: Path) -> Path:
    """Build the layer under `out` (its zip root: `out/python/...`); returns `out`."""
    if out.exists():
        shutil.rmtree(out)
    target = out / "python"
    command = pip_command(target, SHARED / "requirements.txt")
    done = subprocess.run(command, capture_output=True, text=True, timeout=900, check=False)  # noqa: S603
    if done.returncode != 0:
        raise LayerError(f"pip could not build the layer for Lambda:\n{done.stderr[-4000:]}")
    # Console scripts carry this machine's interpreter path and are of no use in a layer.
    shutil.rmtree(target / "bin", ignore_errors=True)
    shutil.copytree(
        SHARED / "vap_shared", target / "vap_shared", ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
    )
    return out


class LayerError(RuntimeError):
    pass


# ---------------------------------------------------------------------------------------------- checks


@dataclass
class Report:
    layer: Path
    unzipped_bytes: int = 0
    zipped_bytes: int = 0
    function_bytes: dict[str, int] = field(default_factory=dict)
    compiled: list[str] = field(default_factory=list)
    imported: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def text(self) -> str:
        mb = 1e6
        lines = [
            f"layer {self.layer}: {self.unzipped_bytes / mb:.1f} MB unzipped, "
            f"{self.zipped_bytes / mb:.1f} MB zipped",
            *(
                f"  function {name}: {size / 1e3:.1f} kB code; with the layer "
                f"{(size + self.unzipped_bytes) / mb:.1f} MB of Lambda's {UNZIPPED_LIMIT_BYTES / mb:.0f} MB "
                "(250 MiB)"
                for name, size in self.function_bytes.items()
            ),
            f"  compiled files ({len(self.compiled)}): {', '.join(self.compiled) or 'none'}",
            f"  pure-Python modules imported from the layer ({len(self.imported)}): "
            + ", ".join(self.imported),
        ]
        lines += [f"  PROBLEM: {p}" for p in self.problems] or ["  OK"]
        return "\n".join(lines)


def _files(root: Path) -> Iterator[Path]:
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.is_symlink():
            yield path


def elf_machine(path: Path) -> int | None:
    """e_machine of an ELF file (None when it is not ELF)."""
    with path.open("rb") as handle:
        head = handle.read(20)
    if len(head) < 20 or head[:4] != b"\x7fELF":
        return None
    return int.from_bytes(head[18:20], "little" if head[5] == 1 else "big")


_EXT_TAG = re.compile(r"\.(cpython-(\d+)-([\w]+)-linux-gnu|abi3)\.so$")


def check_compiled(layer: Path, report: Report) -> None:
    for path in _files(layer):
        machine = elf_machine(path)
        if machine is None and not path.name.endswith((".so", ".pyd", ".dylib")) and ".so." not in path.name:
            continue
        rel = path.relative_to(layer).as_posix()
        report.compiled.append(rel)
        if machine != EM_AARCH64:
            report.problems.append(f"{rel} is not an aarch64 ELF file (e_machine {machine})")
        match = _EXT_TAG.search(path.name)
        cpython = "".join(map(str, PYTHON_VERSION))
        wrong = not match or match.group(2) != cpython or match.group(3) != "aarch64"
        if path.name.endswith(".so") and ".cpython-" in path.name and wrong:
            report.problems.append(f"{rel} is an extension module for another Python or platform")


def _tag_ok(tag: str) -> bool:
    python, abi, platform = tag.split("-")
    major, minor = PYTHON_VERSION
    if platform != "any":
        found = re.fullmatch(r"manylinux_(\d+)_(\d+)_aarch64", platform)
        if platform == "manylinux2014_aarch64":
            glibc = (2, 17)
        elif found:
            glibc = (int(found.group(1)), int(found.group(2)))
        else:
            return False
        if glibc > GLIBC_MAX:
            return False
    if abi == "none":
        return python.startswith("py3") or python == f"cp{major}{minor}" or python == "py2.py3"
    if abi == "abi3":
        found = re.fullmatch(r"cp3(\d+)", python)
        return bool(found) and int(found.group(1)) <= minor  # type: ignore[union-attr]
    return abi == f"cp{major}{minor}" and python == f"cp{major}{minor}"


@dataclass
class Distribution:
    name: str
    tags: list[str]
    top_level: set[str]
    compiled: bool
    requires: set[str]


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_applies(line: str) -> str | None:
    """The distribution a Requires-Dist line needs on python3.13/Linux without extras, or None."""
    name, _, marker = line.partition(";")
    marker = marker.strip()
    if "extra" in marker:
        return None
    if marker:
        # The markers the layer's dependencies use: python_version, platform/sys_platform, implementation.
        env = {
            "python_version": ".".join(map(str, PYTHON_VERSION)),
            "python_full_version": ".".join(map(str, PYTHON_VERSION)) + ".0",
            "sys_platform": "linux",
            "platform_system": "Linux",
            "platform_machine": "aarch64",
            "platform_python_implementation": "CPython",
            "implementation_name": "cpython",
            "os_name": "posix",
        }
        try:
            from packaging.markers import Marker

            if not Marker(marker).evaluate(env):
                return None
        except ImportError:  # pragma: no cover - packaging ships with pip's environments
            pass
    found = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", name)
    return _normal(found.group(1)) if found else None


def distributions(layer: Path) -> dict[str, Distribution]:
    dists: dict[str, Distribution] = {}
    for info in sorted(layer.glob("*.dist-info")):
        meta = email.parser.Parser().parsestr((info / "METADATA").read_text(encoding="utf-8"))
        wheel = email.parser.Parser().parsestr((info / "WHEEL").read_text(encoding="utf-8"))
        record = [
            line.split(",", 1)[0] for line in (info / "RECORD").read_text(encoding="utf-8").splitlines()
        ]
        tops = {
            r.split("/", 1)[0].removesuffix(".py")
            for r in record
            if r and not r.startswith(("../", "bin/")) and ".dist-info" not in r.split("/", 1)[0]
        }
        tops = {t.split(".", 1)[0] for t in tops if t and t != "__pycache__"}
        compiled = any(r.endswith(".so") or ".so." in r for r in record)
        requires = {r for r in map(_requirement_applies, meta.get_all("Requires-Dist") or []) if r}
        name = _normal(str(meta["Name"]))
        dists[name] = Distribution(name, list(wheel.get_all("Tag") or []), tops, compiled, requires)
    return dists


def check_wheels(dists: dict[str, Distribution], report: Report) -> None:
    for dist in dists.values():
        bad = [t for t in dist.tags if not _tag_ok(t)]
        if bad or not dist.tags:
            report.problems.append(
                f"{dist.name}: wheel tags {bad or 'missing'} do not run on Lambda arm64/3.13"
            )
        missing = {r for r in dist.requires if r not in dists and r not in RUNTIME_PROVIDED}
        if missing:
            report.problems.append(f"{dist.name} needs {sorted(missing)}, which the layer does not have")


def _needs_compiled(name: str, dists: dict[str, Distribution], seen: set[str] | None = None) -> bool:
    seen = seen if seen is not None else set()
    if name in seen or name not in dists:
        return False
    seen.add(name)
    dist = dists[name]
    return dist.compiled or any(_needs_compiled(r, dists, seen) for r in dist.requires)


def check_pure_imports(layer: Path, dists: dict[str, Distribution], report: Report) -> None:
    """Import every pure-Python distribution (and what it needs) from the layer alone: no site-packages,
    only the standard library. Compiled ones (and those needing them) cannot load on this machine; the
    wheel tags and ELF checks cover those."""
    pure = {
        top
        for name, dist in dists.items()
        if not _needs_compiled(name, dists)
        for top in dist.top_level
        if (layer / top).is_dir() or (layer / f"{top}.py").is_file()
    }
    # And the modules of those the handlers import (e.g. aws_lambda_powertools.utilities.batch).
    handlers = {module for path in sorted(FUNCTIONS.glob("*/*.py")) for module, _ in _imports(path)}
    modules = sorted(pure | {m for m in handlers if m.split(".", 1)[0] in pure})
    code = (
        "import importlib, sys\n"
        f"sys.path.insert(0, {str(layer)!r})\n"
        "failed = []\n"
        "for name in sys.argv[1:]:\n"
        "    try:\n"
        "        module = importlib.import_module(name)\n"
        f"        assert module.__file__.startswith({str(layer)!r}), module.__file__\n"
        "    except Exception as exc:\n"
        "        failed.append(f'{name}: {type(exc).__name__}: {exc}')\n"
        "print('\\n'.join(failed))\n"
    )
    done = subprocess.run(  # noqa: S603 - this interpreter, isolated and without site-packages
        [sys.executable, "-I", "-S", "-B", "-c", code, *modules],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        cwd=layer,
    )
    if done.returncode != 0:
        report.problems.append(f"importing the layer's modules crashed: {done.stderr[-2000:]}")
    report.problems += [f"cannot import {line}" for line in done.stdout.splitlines() if line.strip()]
    report.imported = modules


def _imports(path: Path) -> Iterator[tuple[str, int]]:
    """Absolute imports a module runs (not those under `if TYPE_CHECKING:`)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped |= {id(n) for child in node.body for n in ast.walk(child)}
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module, node.lineno


def _resolves(module: str, roots: Iterable[Path]) -> bool:
    top = module.split(".", 1)[0]
    if top in sys.stdlib_module_names or top in RUNTIME_PROVIDED:
        return True
    parts = module.split(".")
    for root in roots:
        # The deepest existing prefix must be a package or module: `a.b.c` where c is a name in b is fine.
        for depth in range(len(parts), 0, -1):
            base = root.joinpath(*parts[:depth])
            if base.with_suffix(".py").is_file() or (base / "__init__.py").is_file():
                return True
            if depth == 1 and any(root.glob(f"{parts[0]}.*.so")):
                return True
    return False


def check_handler_imports(layer: Path, report: Report) -> None:
    """Every import of the functions and of vap_shared resolves in Lambda: the standard library, the
    runtime's boto3, the layer, or the function's own folder."""
    sources: list[tuple[Path, Path | None]] = [(p, p.parent) for p in sorted(FUNCTIONS.glob("*/*.py"))]
    sources += [(p, None) for p in sorted((layer / "vap_shared").rglob("*.py"))]
    for path, own in sources:
        roots = [layer] + ([own] if own is not None else [])
        for module, line in _imports(path):
            if not _resolves(module, roots):
                where = path.relative_to(REPO_ROOT if own is not None else layer)
                report.problems.append(f"{where}:{line}: `import {module}` does not resolve in Lambda")


def _zipped_size(root: Path) -> int:
    import io

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in _files(root):
            archive.write(path, path.relative_to(root).as_posix())
    return len(buffer.getvalue())


def check(out: Path) -> Report:
    """Check a built layer (`out/python/...`) as Lambda would load it."""
    layer = out / "python"
    report = Report(layer=out)
    if not (layer / "vap_shared" / "__init__.py").is_file():
        report.problems.append(f"{layer} has no vap_shared package (not a built layer)")
        return report
    report.unzipped_bytes = sum(p.stat().st_size for p in _files(out))
    report.zipped_bytes = _zipped_size(out)
    for function in sorted(FUNCTIONS.iterdir()):
        if function.is_dir():
            size = sum(p.stat().st_size for p in _files(function) if "__pycache__" not in p.parts)
            report.function_bytes[function.name] = size
            if size + report.unzipped_bytes > UNZIPPED_LIMIT_BYTES:
                report.problems.append(f"{function.name}: code + layer exceed Lambda's 250 MB unzipped")
    if any(p.suffix == ".pyc" for p in _files(out)):
        report.problems.append("the layer holds bytecode compiled by this machine's interpreter")
    dists = distributions(layer)
    check_compiled(layer, report)
    check_wheels(dists, report)
    check_pure_imports(layer, dists, report)
    check_handler_imports(layer, report)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=REPO_ROOT / ".aws-sam" / "vap-layer")
    parser.add_argument("--check-only", action="store_true", help="check an already built layer")
    args = parser.parse_args(argv)
    try:
        if not args.check_only:
            build(args.out)
    except LayerError as exc:
        print(f"layer: {exc}", file=sys.stderr)
        return 1
    report = check(args.out)
    print(report.text())
    return 0 if report.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
