"""Cold start per Lambda handler: import + client construction in fresh python3.13 interpreters.

Packages are built like `sam build` would, with `pip install --target` into a temporary folder:
the layer (`shared/requirements.txt` + `vap_shared`) for the Lambda platform (arm64, for the sizes)
and for this machine (to import it here), boto3 separately (the runtime provides it on Lambda; it
must be on the path here). Each interpreter gets the Lambda path order: function code, layer,
boto3. Modes run round-robin, one warm-up each (discarded), so disk cache and bytecode are warm,
as on a Lambda host that has pulled the package.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.common import ROOT, SHARED, dir_size, median, python313
from vap_cli import layer as lambda_layer

CHILD = Path(__file__).resolve().parent / "cold_child.py"
FUNCTION_DIRS = {
    name: ROOT / "functions" / name
    for name in ("ingest", "webhook", "store", "sweeper")
    if (ROOT / "functions" / name / f"{name}.py").exists()
}
MODES = ("floor", "floor_clients", *FUNCTION_DIRS)
# cryptography and what only it pulls in (top-level names in the layer, dist-info included).
CRYPTOGRAPHY_DISTS = ("cryptography", "cffi", "_cffi_backend", "pycparser")
# The same wheels `make layer` / `make deploy` ship (vap_cli.layer), so the sizes are that layer's.
LAMBDA_PLATFORM = [
    *(arg for platform in lambda_layer.PLATFORMS for arg in ("--platform", platform)),
    "--implementation",
    "cp",
    "--python-version",
    ".".join(map(str, lambda_layer.PYTHON_VERSION)),
]

# What the template gives the functions (values are placeholders: nothing is called at cold start).
FUNCTION_ENV = {
    "BUCKET_NAME": "vap-bench-123456789012-us-east-1",
    "INBOX_PREFIX": "inbox/",
    "OUTPUTS_PREFIX": "outputs/",
    "WORK_PREFIX": "work/",
    "JOBS_TABLE": "vap-bench-JobsTable",
    "TOPIC_ARN": "arn:aws:sns:us-east-1:123456789012:vap-bench-topic",
    "DEFAULT_BACKEND": "auto",
    "MODAL_ENDPOINT_URL": "https://example--vap-gpu-api.modal.run",
    "FAL_ENDPOINT_ID": "fal-ai/video-as-prompt",
    "FAL_QUEUE_URL": "https://queue.fal.run",
    "FAL_JWKS_URL": "https://rest.alpha.fal.ai/.well-known/jwks.json",
    "FAL_MEDIA_HOSTS": "fal.media,*.fal.media",
    "ALLOWED_MEDIA_HOSTS": "storage.googleapis.com,fal.media,*.fal.media",
    "WEBHOOK_BASE_URL": "https://abc.lambda-url.us-east-1.on.aws",
    "SIGNING_SECRET_ARN": "arn:aws:secretsmanager:us-east-1:123456789012:secret:vap-bench/signing-secret",
    "FAL_KEY_SECRET_ARN": "arn:aws:secretsmanager:us-east-1:123456789012:secret:vap-bench/fal-key",
    "MODAL_TOKEN_SECRET_ARN": "arn:aws:secretsmanager:us-east-1:123456789012:secret:vap-bench/modal-token",
    "AWS_REGION": "us-east-1",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_ACCESS_KEY_ID": "bench",
    "AWS_SECRET_ACCESS_KEY": "bench",
    "AWS_SESSION_TOKEN": "bench",
}


@dataclass
class Packages:
    """Where the built pieces are; `runtime` is None when boto3 comes from the interpreter itself."""

    layer: Path
    runtime: Path | None
    layer_lambda_bytes: int | None = None  # arm64 layer (deps + vap_shared), no boto3, no .pyc
    layer_lambda_pyc_bytes: int | None = None  # its __pycache__ folders, as pip writes them
    boto3_lambda_bytes: int | None = None
    function_bytes: dict[str, int] = field(default_factory=dict)
    top_level: dict[str, int] = field(default_factory=dict)  # biggest layer entries (no .pyc)


@dataclass
class ModeResult:
    mode: str
    runs: int
    median_ms: float
    median_import_ms: float
    median_clients_ms: float
    min_ms: float
    max_ms: float
    median_process_ms: float  # interpreter start to exit, as seen from outside
    maxrss_mb: float
    modules: int
    import_by_package_ms: dict[str, float] = field(default_factory=dict)  # one -X importtime run
    # What the first request then builds on first use (clients created lazily), not in median_ms.
    median_first_use_ms: float = 0.0


@dataclass
class ColdStartResult:
    python: str
    modes: dict[str, ModeResult]
    layer_mb: float | None
    layer_pyc_mb: float | None
    boto3_mb: float | None
    layer_top_mb: dict[str, float]
    function_kb: dict[str, float]
    build_s: float
    layer_without_cryptography_mb: float | None = None


def _top_level(layer: Path) -> dict[str, int]:
    sizes = {p.name: dir_size(p, bytecode=False) if p.is_dir() else p.stat().st_size for p in layer.iterdir()}
    return dict(sorted(sizes.items(), key=lambda kv: -kv[1]))


def _pip(python: str, target: Path, args: list[str]) -> None:
    command = [python, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-input"]
    command += ["--target", str(target), *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)  # noqa: S603
    if done.returncode != 0:
        raise RuntimeError(f"pip failed ({' '.join(command)}):\n{done.stderr[-3000:]}")


def _with_code(target: Path) -> None:
    shutil.copytree(
        SHARED / "vap_shared", target / "vap_shared", ignore=shutil.ignore_patterns("__pycache__")
    )


def build_packages(python: str, workdir: Path, lambda_sizes: bool = True) -> Packages:
    """pip install the layer for this machine (to import) and for Lambda arm64 (to size)."""
    requirements = ["-r", str(SHARED / "requirements.txt")]
    layer = workdir / "host" / "python"
    runtime = workdir / "host-runtime"
    _pip(python, layer, requirements)
    _with_code(layer)
    _pip(python, runtime, ["boto3"])
    # Bytecode for our own code too (pip compiled the dependencies), as after a first import.
    subprocess.run(  # noqa: S603
        [python, "-m", "compileall", "-q", str(layer / "vap_shared"), *map(str, FUNCTION_DIRS.values())],
        check=True,
        capture_output=True,
        timeout=300,
    )
    packages = Packages(layer=layer, runtime=runtime)
    if lambda_sizes:
        lam = workdir / "arm64" / "python"
        lam_runtime = workdir / "arm64-runtime"
        _pip(python, lam, [*LAMBDA_PLATFORM, "--only-binary=:all:", *requirements])
        _with_code(lam)
        _pip(python, lam_runtime, [*LAMBDA_PLATFORM, "--only-binary=:all:", "boto3"])
        packages.layer_lambda_bytes = dir_size(lam, bytecode=False)
        packages.layer_lambda_pyc_bytes = dir_size(lam) - packages.layer_lambda_bytes
        packages.boto3_lambda_bytes = dir_size(lam_runtime, bytecode=False)
        packages.top_level = _top_level(lam)
    packages.function_bytes = {
        name: sum(p.stat().st_size for p in path.glob("*.py")) for name, path in FUNCTION_DIRS.items()
    }
    return packages


def _paths(mode: str, packages: Packages) -> list[str]:
    paths = []
    if mode in FUNCTION_DIRS:
        paths += [str(FUNCTION_DIRS[mode]), str(packages.layer)]
    if packages.runtime is not None:
        paths.append(str(packages.runtime))
    return paths


def _child_env(mode: str) -> dict[str, str]:
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "LANG": "C.UTF-8",
        "HOME": tempfile.gettempdir(),
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        **FUNCTION_ENV,
    }
    if mode in FUNCTION_DIRS:
        env["POWERTOOLS_SERVICE_NAME"] = f"vap-{mode}"
        env["AWS_LAMBDA_FUNCTION_NAME"] = f"vap-bench-{mode}"
    return env


def run_child(python: str, mode: str, packages: Packages) -> dict[str, Any]:
    env = _child_env(mode)
    started = time.perf_counter()
    done = subprocess.run(  # noqa: S603 - fixed interpreter and script
        [python, "-I", str(CHILD), mode, *_paths(mode, packages)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tempfile.gettempdir(),
        timeout=120,
        check=False,
    )
    elapsed = (time.perf_counter() - started) * 1000
    if done.returncode != 0:
        raise RuntimeError(f"cold start {mode} failed:\n{done.stderr[-3000:]}")
    data: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    data["process_ms"] = elapsed
    return data


def import_breakdown(python: str, mode: str, packages: Packages, top: int = 6) -> dict[str, float]:
    """Milliseconds of import time by top-level package (`-X importtime` self times, summed)."""
    env = _child_env(mode)
    done = subprocess.run(  # noqa: S603 - fixed interpreter and script
        [python, "-I", "-X", "importtime", str(CHILD), mode, *_paths(mode, packages)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tempfile.gettempdir(),
        timeout=120,
        check=False,
    )
    totals: dict[str, float] = {}
    for line in done.stderr.splitlines():
        if not line.startswith("import time:") or "|" not in line:
            continue
        parts = line[len("import time:") :].split("|")
        if len(parts) != 3 or not parts[0].strip().isdigit():
            continue
        root = parts[2].strip().split(".")[0]
        totals[root] = totals.get(root, 0.0) + int(parts[0]) / 1000
    return dict(sorted(totals.items(), key=lambda kv: -kv[1])[:top])


def measure(
    python: str, packages: Packages, runs: int = 10, modes: tuple[str, ...] = MODES
) -> dict[str, ModeResult]:
    samples: dict[str, list[dict[str, Any]]] = {mode: [] for mode in modes}
    for mode in modes:  # warm-up: page cache, bytecode
        run_child(python, mode, packages)
    for _ in range(runs):
        for mode in modes:
            samples[mode].append(run_child(python, mode, packages))
    results = {}
    for mode, rows in samples.items():
        totals = [r["total_ms"] for r in rows]
        results[mode] = ModeResult(
            mode=mode,
            runs=len(rows),
            median_ms=median(totals),
            median_import_ms=median([r["import_ms"] for r in rows]),
            median_clients_ms=median([r["clients_ms"] for r in rows]),
            median_first_use_ms=median([r.get("first_use_ms", 0.0) for r in rows]),
            min_ms=min(totals),
            max_ms=max(totals),
            median_process_ms=median([r["process_ms"] for r in rows]),
            maxrss_mb=max(r["maxrss_kb"] for r in rows) / 1024,
            modules=int(median([r["modules"] for r in rows])),
            import_by_package_ms=import_breakdown(python, mode, packages),
        )
    return results


def run(
    runs: int = 10, python: str | None = None, build: bool = True, lambda_sizes: bool = True
) -> ColdStartResult:
    """`build=False` imports from `python`'s own environment (tests: the venv, no network)."""
    interpreter = python or python313()
    if interpreter is None:
        raise RuntimeError("python3.13 not found: set VAP_BENCH_PYTHON313 or install it with pyenv")
    if os.sep in interpreter:
        interpreter = os.path.abspath(interpreter)  # children run elsewhere; keep venv symlinks
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="vap-bench-cold-") as tmp:
        if build:
            packages = build_packages(interpreter, Path(tmp), lambda_sizes=lambda_sizes)
        else:
            packages = Packages(layer=SHARED, runtime=None)
            packages.function_bytes = {
                name: sum(p.stat().st_size for p in path.glob("*.py")) for name, path in FUNCTION_DIRS.items()
            }
        build_s = time.perf_counter() - started
        modes = measure(interpreter, packages, runs)
    return ColdStartResult(
        python=interpreter,
        modes=modes,
        layer_mb=packages.layer_lambda_bytes / 1e6 if packages.layer_lambda_bytes is not None else None,
        layer_pyc_mb=(
            packages.layer_lambda_pyc_bytes / 1e6 if packages.layer_lambda_pyc_bytes is not None else None
        ),
        layer_top_mb={k: v / 1e6 for k, v in list(packages.top_level.items())[:5]},
        layer_without_cryptography_mb=(
            sum(v for k, v in packages.top_level.items() if not k.startswith(CRYPTOGRAPHY_DISTS)) / 1e6
            if packages.top_level
            else None
        ),
        boto3_mb=packages.boto3_lambda_bytes / 1e6 if packages.boto3_lambda_bytes is not None else None,
        function_kb={k: v / 1e3 for k, v in packages.function_bytes.items()},
        build_s=build_s,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--python", default=None, help="interpreter (default: python3.13 via pyenv)")
    parser.add_argument("--no-build", action="store_true", help="import from the interpreter's environment")
    args = parser.parse_args(argv)
    result = run(args.runs, args.python, build=not args.no_build)
    print(json.dumps(asdict(result), indent=2))


if __name__ == "__main__":
    main()
