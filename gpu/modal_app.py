"""The Modal app: VAP on one H100 behind the GPU HTTP API (docs/gpu.md has the deploy steps).

    modal run gpu/modal_app.py::download_weights   # once: fill the weights volume
    modal deploy gpu/modal_app.py                  # the API URL is printed; use it as ModalEndpointUrl

Builds offline without a token (tests import it); only deploy/run/spawn talk to Modal. Limits are
read from the environment at deploy time (see `_int_env` uses below).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

try:  # `modal deploy gpu/modal_app.py` imports this file by path: make `gpu` and `vap_shared` importable
    import gpu  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
try:
    import vap_shared  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "shared"))

import modal


def _int_env(name: str, default: int) -> int:
    return int(os.environ.get(name, "") or default)


APP_NAME = os.environ.get("VAP_MODAL_APP", "vap-gpu")
GPU = os.environ.get("VAP_MODAL_GPU", "H100!")  # "!" pins H100 (plain "H100" may be upgraded)
MAX_CONTAINERS = _int_env("VAP_MODAL_MAX_CONTAINERS", 2)  # GPUs at once: caps spend and parallel jobs
MIN_CONTAINERS = _int_env("VAP_MODAL_MIN_CONTAINERS", 0)  # >0 keeps warm GPUs (billed while idle)
SCALEDOWN_S = _int_env("VAP_MODAL_SCALEDOWN_S", 300)  # idle GPU kept this long for the next job
# Per job: 480p/49 frames/50 steps is minutes; 720p/121 frames can take most of an hour.
TIMEOUT_S = _int_env("VAP_MODAL_TIMEOUT_S", 3600)
# Cold start: ~66 GB of weights from the volume onto the GPU.
STARTUP_TIMEOUT_S = _int_env("VAP_MODAL_STARTUP_TIMEOUT_S", 1200)
DEFAULT_STEPS = _int_env("VAP_DEFAULT_STEPS", 50)
# Regional torch.compile of the transformer blocks: faster steps, slower cold start.
COMPILE_BLOCKS = os.environ.get("VAP_MODAL_COMPILE", "0") == "1"

MODELS_DIR = "/models"
HF_CACHE_DIR = f"{MODELS_DIR}/hf"
weights = modal.Volume.from_name(os.environ.get("VAP_MODAL_VOLUME", "vap-weights"), create_if_missing=True)
# Optional, e.g. a secret with HF_TOKEN for faster/rate-limit-free downloads: VAP_MODAL_SECRETS=huggingface
SECRETS = [modal.Secret.from_name(n) for n in os.environ.get("VAP_MODAL_SECRETS", "").split(",") if n.strip()]

# Pinned versions (the CPU venv pins the same in requirements/gpu.txt). The PyPI torch wheel for
# Linux x86-64 is the CUDA build.
_COMMON = [
    "numpy==2.4.6",
    "pillow==13.0.0",
    "imageio-ffmpeg==0.8.1",
    "httpx==0.28.1",
    "pydantic==2.13.5",
    "fastapi==0.163.2",
]
gpu_image = (
    modal.Image.debian_slim(python_version="3.12")
    .uv_pip_install(
        "torch==2.13.0",
        "diffusers==0.42.1",
        "transformers==5.23.0",
        "accelerate==1.15.0",
        "tokenizers==0.23.3",
        "safetensors==0.8.0",
        "sentencepiece==0.2.3",
        "ftfy==6.3.1",
        "huggingface-hub==2.4.0",
        "hf-xet==1.8.0",
        *_COMMON,
    )
    .env({"HF_HUB_CACHE": HF_CACHE_DIR, "TOKENIZERS_PARALLELISM": "false"})
    .add_local_python_source("gpu", "vap_shared")
)
# The API container only forwards calls: no torch, so it starts in a second or two.
web_image = (
    modal.Image.debian_slim(python_version="3.12")
    .uv_pip_install(*_COMMON)
    .add_local_python_source("gpu", "vap_shared")
)

app = modal.App(APP_NAME)


# The VAP commit actually downloaded is recorded here, and serving loads exactly that commit: even
# while `VAP_REVISION` names a branch, every container of a deployment runs the same weights.
REVISION_RECORD = f"{MODELS_DIR}/vap-revision.json"
# Read at deploy time and handed to the containers (their environment is not the deployer's).
REVISION_ENV: dict[str, str | None] = {"VAP_REVISION": os.environ.get("VAP_REVISION", "")}


@app.function(
    image=gpu_image, volumes={MODELS_DIR: weights}, secrets=SECRETS, env=REVISION_ENV, timeout=4 * 3600
)
def download_weights() -> None:
    """Fill the volume with the pinned VAP checkpoint and safety checker (run once per revision)."""
    import json

    from huggingface_hub import HfApi, snapshot_download

    from gpu.safety import SAFETY_CHECKER_REPO, SAFETY_CHECKER_REVISION
    from gpu.vap.loading import VAP_REPO_ID, VAP_REVISION

    requested = os.environ.get("VAP_REVISION") or VAP_REVISION
    commit = HfApi().model_info(VAP_REPO_ID, revision=requested).sha or requested
    for repo, revision in ((VAP_REPO_ID, commit), (SAFETY_CHECKER_REPO, SAFETY_CHECKER_REVISION)):
        path = snapshot_download(repo, revision=revision, cache_dir=HF_CACHE_DIR)
        print(f"{repo}@{revision} -> {path}")
    record = {"repo": VAP_REPO_ID, "requested": requested, "commit": commit}
    Path(REVISION_RECORD).write_text(json.dumps(record))
    print(f"recorded {VAP_REPO_ID}@{commit} in {REVISION_RECORD}; pin it with VAP_REVISION={commit}")
    weights.commit()


def recorded_revision(default: str) -> str:
    """The commit `download_weights` fetched (the volume is the source of truth when serving)."""
    import json

    try:
        return str(json.loads(Path(REVISION_RECORD).read_text())["commit"])
    except (OSError, ValueError, KeyError):
        return default


@app.cls(
    image=gpu_image,
    gpu=GPU,
    volumes={MODELS_DIR: weights},
    secrets=SECRETS,
    # Serving reads only the volume: no hub access (a missing file is a deploy error, not a download).
    env={"HF_HUB_OFFLINE": "1", "VAP_DEFAULT_STEPS": str(DEFAULT_STEPS), **REVISION_ENV},
    timeout=TIMEOUT_S,
    startup_timeout=STARTUP_TIMEOUT_S,
    scaledown_window=SCALEDOWN_S,
    min_containers=MIN_CONTAINERS,
    max_containers=MAX_CONTAINERS,
    retries=0,  # no blind re-run: callbacks of a failed attempt are already out; the caller decides
)
class VapGenerator:
    @modal.enter()
    def load(self) -> None:
        """Once per container: the pipeline and the safety checker onto the GPU."""
        import httpx
        import torch

        from gpu.engine import VideoEngine
        from gpu.runner import RunnerConfig
        from gpu.safety import DiffusersSafetyClassifier
        from gpu.vap.loading import VAP_REPO_ID, VAP_REVISION, load_pipeline

        device = "cuda" if torch.cuda.is_available() else "cpu"
        revision = recorded_revision(os.environ.get("VAP_REVISION") or VAP_REVISION)
        pipeline = load_pipeline(VAP_REPO_ID, device=device, revision=revision, compile_blocks=COMPILE_BLOCKS)
        self.engine = VideoEngine(pipeline, device)
        self.safety = DiffusersSafetyClassifier.from_pretrained(device=device, dtype=torch.float16)
        # Stop a minute before Modal's hard timeout so the "timeout" failure callback still goes out.
        self.config = RunnerConfig(default_steps=DEFAULT_STEPS, job_timeout_s=max(60, TIMEOUT_S - 60))
        self.http = httpx.Client()

    @modal.method()
    def generate(self, payload: dict[str, Any]) -> dict[str, Any]:
        """Run one `GpuJobRequest`; returns {"result": GpuResult} or {"error": GpuError} (as JSON)."""
        from vap_shared.gpu_contract import GpuError, GpuJobRequest

        from gpu.runner import JobFailed, run_job, send_callback

        request = GpuJobRequest.model_validate(payload)
        call_id = modal.current_function_call_id() or ""
        try:
            result = run_job(
                request, self.engine, self.http, call_id=call_id, config=self.config, safety=self.safety
            )
        except JobFailed as exc:
            return {"result": None, "error": exc.error.model_dump(mode="json")}
        except modal.exception.InputCancellation:
            # Cancelled from the API: Modal interrupts the input; tell the webhook before going.
            cancelled = GpuError(code="cancelled", message="the job was cancelled")
            send_callback(self.http, request, call_id, "failed", self.config, error=cancelled)
            raise
        return {"result": result.model_dump(mode="json"), "error": None}


@app.function(image=web_image, timeout=60, scaledown_window=SCALEDOWN_S)
@modal.concurrent(max_inputs=100)
@modal.asgi_app(requires_proxy_auth=True)  # Modal's proxy checks Modal-Key/Modal-Secret
def api() -> Any:
    from gpu.api import ModalExecutor, create_app

    return create_app(ModalExecutor(VapGenerator().generate.spawn))
