"""The wheels `make gpu-check` installs on a machine without network, and where they come from.

    python -m gpu.tools.wheels download               # make gpu-wheels: needs the package registry
    python -m gpu.tools.wheels install --target DIR   # make gpu-check: offline, only from .whl/

Two bundles, each a complete lock in `requirements/` (installed with `--no-deps`, so nothing is
resolved, fetched or built on the GPU machine):

- `pure` (`requirements/gpu-check.txt` → `.whl/pure/`): what the GPU code imports beyond torch
  (diffusers, transformers and the tokenizer/hub stack, ftfy, pydantic, their dependencies);
- `fa4` (`requirements/gpu-check-fa4.txt` → `.whl/fa4/`): FlashAttention 4 and its CUTLASS DSL
  libraries; optional (without it the attention falls back to cuDNN or torch SDPA).

`download` fetches wheels for the target machine (CPython 3.12, manylinux x86_64; override with
`--python-version` / `--platform`), whatever machine runs it. `install` puts into `--target` only
the pinned packages the running interpreter lacks at their pinned version, from `.whl/` alone
(`--no-index`); the machine's own environment (and its torch) is left as it is. Standard library
only: it runs before anything is installed.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
WHEELS = ROOT / ".whl"
PYTHON_VERSION = "3.12"
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "linux_x86_64")


@dataclass(frozen=True)
class Bundle:
    name: str
    requirements: Path
    required: bool  # the check cannot run without it

    @property
    def folder(self) -> Path:
        return WHEELS / self.name


BUNDLES = (
    Bundle("pure", ROOT / "requirements" / "gpu-check.txt", required=True),
    Bundle("fa4", ROOT / "requirements" / "gpu-check-fa4.txt", required=False),
)


def pins(requirements: Path) -> dict[str, str]:
    """`name==version` lines of a lock file (comments and blank lines skipped), by normalised name."""
    found: dict[str, str] = {}
    for raw in requirements.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;]+)", line)
        if match is None:
            raise ValueError(f"{requirements.name}: not an exact pin: {line!r}")
        found[normalise(match.group(1))] = match.group(2)
    return found


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def installed(paths: list[str] | None = None) -> dict[str, str]:
    """Distributions visible on `paths` (default: this interpreter's), by normalised name."""
    dists = importlib.metadata.distributions(path=paths) if paths else importlib.metadata.distributions()
    return {normalise(d.metadata["Name"]): d.version for d in dists if d.metadata["Name"]}


def missing(bundle: Bundle, target: Path) -> list[str]:
    """The bundle's pins that neither this interpreter nor `target` has at the pinned version."""
    have = installed()
    have.update(installed([str(target)]) if target.is_dir() else {})
    return [
        f"{name}=={version}"
        for name, version in pins(bundle.requirements).items()
        if have.get(name) != version
    ]


def _pip(*args: str) -> int:
    return subprocess.call([sys.executable, "-m", "pip", *args])  # noqa: S603 - this interpreter's pip


def download(python_version: str, platforms: list[str]) -> int:
    status = 0
    for bundle in BUNDLES:
        bundle.folder.mkdir(parents=True, exist_ok=True)
        platform_args = [arg for p in platforms for arg in ("--platform", p)]
        code = _pip(
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--python-version",
            python_version,
            "--implementation",
            "cp",
            "--abi",
            "cp" + python_version.replace(".", ""),
            *platform_args,
            "--dest",
            str(bundle.folder),
            "--requirement",
            str(bundle.requirements),
        )
        files = list(bundle.folder.glob("*.whl"))
        size = sum(f.stat().st_size for f in files)
        print(f"{bundle.name}: {len(files)} wheels, {size / 1e6:.1f} MB in {bundle.folder}")
        status = status or code
    return status


def install(target: Path) -> int:
    status = 0
    for bundle in BUNDLES:
        wanted = missing(bundle, target)
        if not wanted:
            print(f"{bundle.name}: every pinned package already installed")
            continue
        if not any(bundle.folder.glob("*.whl")):
            message = f"{bundle.name}: {len(wanted)} packages missing and no wheels in {bundle.folder}"
            if bundle.required:
                print(
                    f"{message}: run `make gpu-wheels` where the package registry is reachable",
                    file=sys.stderr,
                )
                status = 1
            else:
                print(f"{message} (optional: skipped)")
            continue
        print(f"{bundle.name}: installing {len(wanted)} packages into {target} from {bundle.folder}")
        code = _pip(
            "install",
            "--no-index",
            "--no-deps",
            "--find-links",
            str(bundle.folder),
            "--target",
            str(target),
            "--upgrade",
            "--quiet",
            *wanted,
        )
        if code and bundle.required:
            status = code
        elif code:
            print(f"{bundle.name}: not installed (optional: the check runs without it)")
    return status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    down = sub.add_parser("download", help="fetch the bundles' wheels into .whl/ (needs the registry)")
    down.add_argument("--python-version", default=PYTHON_VERSION)
    down.add_argument(
        "--platform", action="append", dest="platforms", help="repeatable; default manylinux x86_64"
    )
    inst = sub.add_parser("install", help="install what is missing from .whl/ only (offline)")
    inst.add_argument("--target", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.command == "download":
        return download(args.python_version, args.platforms or list(PLATFORMS))
    return install(args.target)


if __name__ == "__main__":
    raise SystemExit(main())
