"""The Modal app: VAP on the GPU each job needs, behind the GPU HTTP API (docs/gpu.md: deploy steps).

    modal run gpu/service/modal_app.py::download_weights   # once: fill the weights volume
    modal deploy gpu/service/modal_app.py   # the API URL is printed; use it as ModalEndpointUrl
    modal run gpu/service/modal_app.py --video clip.mp4 --image img.jpg --prompt "…" --video-description "…"
                                            # one video from local files, no AWS (saved locally)

Builds offline without a token (tests import it); only deploy/run/spawn talk to Modal. Settings are
read from the deployer's environment (`gpu.service.modal_settings`) and forwarded to every function, since
Modal re-imports this file in each container with only what is forwarded.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

# `modal deploy gpu/service/modal_app.py` imports this file by path: make `gpu` and `vap_shared` importable.
try:
    import gpu  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
try:
    import vap_shared  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "shared"))

import modal
from vap_shared.contract import (
    DEFAULT_ASPECT_RATIO,
    DEFAULT_FPS,
    DEFAULT_GPUS,
    DEFAULT_GUIDANCE_SCALE,
    DEFAULT_NUM_FRAMES,
    DEFAULT_RESOLUTION,
    DEFAULT_SAFETY_CHECKER,
    AspectRatio,
    GpuCount,
    Resolution,
)
from vap_shared.gpu_contract import GenerationSettings
from vap_shared.settings_parser import SettingsError

from gpu.service import routing
from gpu.service.generation import target_size
from gpu.service.modal_settings import (
    GpuClass,
    ModalSettings,
    forwarded_env,
    offered_class,
    read_settings,
)

SETTINGS = read_settings()
# Every setting the deployer set, handed to every function: a container re-imports this module
# and must build the same app (same classes, limits, steps, compile flag, revision).
FORWARDED_ENV: dict[str, str | None] = dict(forwarded_env())

MODELS_DIR = "/models"
HF_CACHE_DIR = f"{MODELS_DIR}/hf"
weights = modal.Volume.from_name(SETTINGS.volume, create_if_missing=True)
# Job id -> call id (idempotent submit) and cancel records, shared by every API container.
calls = modal.Dict.from_name(SETTINGS.calls_dict, create_if_missing=True)
# Optional, e.g. a secret with HF_TOKEN for faster/rate-limit-free downloads: VAP_MODAL_SECRETS=huggingface
SECRETS = [modal.Secret.from_name(n) for n in SETTINGS.secrets]

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
        # FlashAttention 4 (gpu.vap.attention's `flash_4`; the load-time probe keeps it off where it
        # fails). Metadata checked against this torch pin: flash-attn-4, quack-kernels and the
        # CUTLASS DSL bound no torch version; `cu13` because the torch 2.13.0 wheel is CUDA 13.
        "flash-attn-4[cu13]==4.0.0b36",
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

app = modal.App(SETTINGS.app_name)


# The VAP commit downloaded is recorded here, and serving loads exactly that commit.
REVISION_RECORD = f"{MODELS_DIR}/vap-revision.json"


def pinned_revision(settings: ModalSettings) -> str:
    """The VAP weights' commit this deployment downloads: `VAP_REVISION` (read_settings refuses a
    branch there), else `gpu.vap.loading.VAP_REVISION`; without either, a download is refused
    (a branch can move between two containers of one deployment)."""
    from gpu.vap.loading import VAP_REPO_ID, VAP_REVISION, is_commit

    revision = settings.revision or VAP_REVISION
    if not is_commit(revision):
        raise SettingsError(
            f"no pinned commit of {VAP_REPO_ID}: set VAP_REVISION to its 40-hex commit id (the hub's "
            "'Files and versions' page, or huggingface_hub.HfApi().model_info(repo).sha)"
        )
    assert revision is not None
    return revision


@app.function(
    image=gpu_image, volumes={MODELS_DIR: weights}, secrets=SECRETS, env=FORWARDED_ENV, timeout=4 * 3600
)
def download_weights() -> None:
    """Fill the volume with the pinned VAP checkpoint and safety checker (run once per revision)."""
    from gpu.service.safety import SAFETY_CHECKER_REPO, SAFETY_CHECKER_REVISION
    from gpu.vap.loading import VAP_REPO_ID

    commit = pinned_revision(SETTINGS)  # before any download: nothing unpinned enters the volume
    from huggingface_hub import snapshot_download

    for repo, revision in ((VAP_REPO_ID, commit), (SAFETY_CHECKER_REPO, SAFETY_CHECKER_REVISION)):
        path = snapshot_download(repo, revision=revision, cache_dir=HF_CACHE_DIR)
        print(f"{repo}@{revision} -> {path}")
    Path(REVISION_RECORD).write_text(json.dumps({"repo": VAP_REPO_ID, "commit": commit}))
    print(f"recorded {VAP_REPO_ID}@{commit} in {REVISION_RECORD}")
    weights.commit()


def recorded_revision() -> str:
    """The commit `download_weights` fetched (the volume is the source of truth when serving); a
    volume without a pinned commit recorded fails the container's start."""
    from gpu.vap.loading import is_commit

    try:
        commit = json.loads(Path(REVISION_RECORD).read_text())["commit"]
    except (OSError, ValueError, KeyError) as exc:
        raise RuntimeError(
            f"the weights volume records no downloaded commit ({exc}): run download_weights"
        ) from None
    if not is_commit(commit):
        raise RuntimeError(
            f"the weights volume holds an unpinned download ({commit!r}): run download_weights again"
        )
    return str(commit)


def load_engine(gpu_class: GpuClass, device: str) -> Any:
    """The engine for one container: the pipeline on one GPU, or the sequence-parallel engine of
    `gpu.parallel` over all of the container's GPUs."""
    from gpu.service.engines.single import VideoEngine
    from gpu.vap.loading import VAP_REPO_ID, load_pipeline

    revision = recorded_revision()
    # UMT5 + CLIP in host memory where the plan needs their room on the GPU (one H100).
    offload = routing.offload_encoders(gpu_class.gpu_type, gpu_class.count)
    if gpu_class.count == 1:
        pipeline = load_pipeline(
            VAP_REPO_ID,
            device=device,
            revision=revision,
            compile_blocks=SETTINGS.compile_blocks,
            offload_encoders=offload,
        )
        return VideoEngine(pipeline, device, weights=revision)
    # One job over all of the container's GPUs: rank 0 (this process) runs the encoders, the VAE
    # and I/O; the engine spawns one follower per other GPU holding only the transformer. Compile
    # stays off here until a GPU run has checked it with the all-to-all attention.
    from functools import partial

    from gpu.service.engines.loaders import ReleasedTransformer
    from gpu.service.engines.sequence_parallel import SequenceParallelEngine

    return SequenceParallelEngine(
        partial(load_pipeline, VAP_REPO_ID, revision=revision, offload_encoders=offload),
        gpu_class.count,
        transformer_loader=ReleasedTransformer(VAP_REPO_ID, revision),
        startup_timeout_s=SETTINGS.budget.startup_s,
        weights=revision,
    )


def gpu_device(count: int) -> str:
    """ "cuda" once CUDA has initialised and shows the class's `count` GPUs. Anything else raises:
    the container's start fails and Modal replaces it, rather than loading 14B parameters on the
    CPU and failing every job slowly."""
    import torch

    try:
        torch.cuda.init()
        visible = torch.cuda.device_count()
    except Exception as exc:  # CUDA not built in, no driver, a broken device: all fatal here
        raise RuntimeError(f"CUDA failed to initialise: {type(exc).__name__}: {exc}") from exc
    if visible < count:
        raise RuntimeError(f"this container sees {visible} GPU(s); its class needs {count}")
    return "cuda"


def count_attempt(call_id: str) -> int:
    """Which execution of `call_id` this is (1 on the first; a preempted input's re-run counts on),
    from put-if-absent keys in the calls Dict. When the Dict cannot be reached the run still goes
    ahead as attempt 1: the count orders callbacks, it never gates the work."""
    from gpu.service.api.executors import claim_attempt

    if not call_id:
        return 1
    try:
        return claim_attempt(calls, call_id)
    except Exception as exc:
        print(f"attempt of {call_id} not counted ({type(exc).__name__}: {exc}); reporting 1", file=sys.stderr)
        return 1


class VapGeneratorBase:
    """What every GPU class runs; one subclass per offered GPU choice (see `GENERATORS`)."""

    gpu_class: GpuClass

    @modal.enter()
    def load(self) -> None:
        """Once per container: the engine and the safety checker onto the GPU(s)."""
        import httpx
        import torch

        from gpu.service.runner.config import RunnerConfig
        from gpu.service.safety import DiffusersSafetyClassifier

        # Fails the container's start when CUDA is not usable: never a 14B model on the CPU.
        device = gpu_device(self.gpu_class.count)
        self.engine = load_engine(self.gpu_class, device)
        self.safety = DiffusersSafetyClassifier.from_pretrained(device=device, dtype=torch.float16)
        # The run's limit: Modal's timeout less a minute (the "timeout" callback still goes out),
        # and never past the job's deadline (`Budget.runner_limit_s`).
        self.config = RunnerConfig(default_steps=SETTINGS.default_steps, budget=SETTINGS.budget)
        self.http = httpx.Client()

    @modal.method()
    def generate(self, payload: dict[str, Any]) -> dict[str, Any]:
        """Run one `GpuJobRequest`; returns {"result": GpuResult} or {"error": GpuError} (as JSON)."""
        from vap_shared.gpu_contract import GpuError, GpuJobRequest

        from gpu.service.runner.callbacks import send_callback
        from gpu.service.runner.config import JobFailed
        from gpu.service.runner.run import run_job

        request = GpuJobRequest.model_validate(payload)
        call_id = modal.current_function_call_id() or ""
        attempt = count_attempt(call_id)  # 2, 3, ...: Modal runs a preempted input again
        try:
            result = run_job(
                request, self.engine, self.http, call_id=call_id, config=self.config, safety=self.safety,
                attempt=attempt,
            )  # fmt: skip
        except JobFailed as exc:
            return {"result": None, "error": exc.error.model_dump(mode="json")}
        except modal.exception.InputCancellation:
            # Cancelled from the API: Modal interrupts the input; tell the webhook before going.
            cancelled = GpuError(code="cancelled", message="the job was cancelled")
            send_callback(
                self.http, request, call_id, "failed", self.config, error=cancelled, attempt=attempt
            )
            raise
        finally:
            self._retire_if_unhealthy()
        return {"result": result.model_dump(mode="json"), "error": None}

    def _retire_if_unhealthy(self) -> None:
        """An engine that cannot run another job (a multi-GPU engine whose ranks fell out of step,
        a GPU left unusable by a sticky CUDA error): let Modal replace the container."""
        if getattr(self.engine, "healthy", True) is False:
            modal.experimental.stop_fetching_inputs()

    @modal.exit()
    def unload(self) -> None:
        close = getattr(self.engine, "close", None)
        if callable(close):
            close()  # stops the follower processes of a multi-GPU engine

    @modal.method()
    def trial(self, payload: dict[str, Any]) -> dict[str, Any]:
        """One video from media bytes (`modal run gpu/service/modal_app.py …`): no URLs, no callbacks; the
        MP4, poster and preview come back in the answer."""
        from vap_shared.gpu_contract import GenerationSettings

        from gpu.service.runner.config import JobFailed
        from gpu.service.runner.run import run_bytes

        settings = GenerationSettings.model_validate(payload["settings"])
        try:
            result, outputs = run_bytes(
                settings, payload["image"], payload["video"], self.engine,
                steps=payload.get("steps"), config=self.config, safety=self.safety,
            )  # fmt: skip
        except JobFailed as exc:
            return {"error": exc.error.model_dump(mode="json")}
        return {
            "result": result.model_dump(mode="json"),
            "video": outputs.video,
            "poster": outputs.poster,
            "preview": outputs.preview,
        }


MiB = 1024 * 1024
# What keeping UMT5-XXL and CLIP in pinned host memory really takes: the caching host allocator
# rounds each tensor up to a power of two, so 13.9 GB of weights pin this much
# (`gpu.vap.offload.pinned_nbytes` of the released encoders; a test recomputes it).
PINNED_ENCODERS_BYTES = 18_263_855_104
# Host memory every GPU container needs besides pinned weights: the Python process with torch and
# the CUDA libraries, decoded media (121 frames at 720p are 335 MB per copy), ffmpeg, the saved
# denoising state in flight (<= 115 MB, twice) and the loaders' buffers.
HOST_HEADROOM_MIB = 16 * 1024
# Host memory (MiB) requested by a class that keeps the encoders in pinned host memory.
OFFLOAD_HOST_MEMORY_MIB = -(-PINNED_ENCODERS_BYTES // MiB) + HOST_HEADROOM_MIB
# CPU cores asked for per GPU (at least 8 a container): FlashAttention 4 compiles its kernels on
# first use, inductor compiles on start-up, ffmpeg decodes and encodes, PIL and the safety checker
# prepare frames. Modal's default request is a fraction of a core.
CPUS_PER_GPU = 4.0
MIN_CPUS = 8.0
# The caching allocator grows segments instead of stranding fragments: the plan's margin assumes it.
GPU_ENV = {"HF_HUB_OFFLINE": "1", "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}


def _default_job_gpu() -> str:
    """The GPU class a sidecar with every default setting runs on (today one H100)."""
    defaults = GenerationSettings(prompt="-", video_description="-")
    width, height = target_size(defaults.aspect_ratio, defaults.resolution)
    return routing.choose_gpu(width, height, defaults.num_frames).modal_gpu


def warm_containers(gpu_class: GpuClass, settings: ModalSettings | None = None) -> int:
    """`VAP_MODAL_MIN_CONTAINERS` for the class that serves the default job only: warm GPUs are
    billed while idle, and one per class would keep 1 + 1 + 2 + 4 + 8 GPUs warm with the default
    choices. The class is matched by GPU type and count ("H100" serves the plan's "H100!"); a
    setting that no offered class can take is an error, never silently dropped."""
    settings = settings or SETTINGS
    default = _default_job_gpu()
    warm = offered_class(default, [g.modal_gpu for g in settings.gpus])
    if warm is None and settings.min_containers > 0:
        raise SettingsError(
            f"VAP_MODAL_MIN_CONTAINERS={settings.min_containers} keeps the default job's class "
            f"({default}) warm, but VAP_MODAL_GPUS does not offer it"
        )
    return settings.min_containers if gpu_class.modal_gpu == warm else 0


def cpu_request(gpu_class: GpuClass) -> float:
    return max(MIN_CPUS, CPUS_PER_GPU * gpu_class.count)


def memory_request_mib(gpu_class: GpuClass) -> int:
    offload = routing.offload_encoders(gpu_class.gpu_type, gpu_class.count)
    return OFFLOAD_HOST_MEMORY_MIB if offload else HOST_HEADROOM_MIB


def _define_generator(gpu_class: GpuClass) -> Any:
    """Register the Modal class for one GPU choice. Its name must be a module global: a container
    finds the class it serves by that name (`getattr(module, name)`)."""
    namespace = {"gpu_class": gpu_class, "__module__": __name__}
    user_cls = type(gpu_class.class_name, (VapGeneratorBase,), namespace)
    return app.cls(
        image=gpu_image,
        gpu=gpu_class.modal_gpu,
        volumes={MODELS_DIR: weights},
        secrets=SECRETS,
        cpu=cpu_request(gpu_class),
        memory=memory_request_mib(gpu_class),
        # Serving reads only the volume: no hub access (a missing file is a deploy error, not a download).
        env={**GPU_ENV, **FORWARDED_ENV},
        timeout=SETTINGS.timeout_s,
        startup_timeout=SETTINGS.startup_timeout_s,
        scaledown_window=SETTINGS.scaledown_s,
        min_containers=warm_containers(gpu_class),
        max_containers=SETTINGS.max_containers,
        retries=0,  # no blind re-run: callbacks of a failed attempt are already out; the caller decides
    )(user_cls)


# Modal GPU string ("H100!", "H200", "H100:8") -> its class; one per offered choice.
GENERATORS: dict[str, Any] = {}
for _gpu_class in SETTINGS.gpus:
    GENERATORS[_gpu_class.modal_gpu] = globals()[_gpu_class.class_name] = _define_generator(_gpu_class)


def build_executor() -> Any:
    """The API's executor: submit spawns on the class `gpu.service.routing` names."""
    from gpu.service.api.executors import ModalExecutor

    spawners = {modal_gpu: cls().generate.spawn for modal_gpu, cls in GENERATORS.items()}
    budget = SETTINGS.budget
    # What one run leaves for generating: Modal's timeout less the runner's and the upload's margins.
    run_limit_s = budget.run_s - budget.runner_margin_s - budget.upload_margin_s
    return ModalExecutor(spawners, calls, default_steps=SETTINGS.default_steps, run_limit_s=run_limit_s)


@app.function(image=web_image, env=FORWARDED_ENV, timeout=60, scaledown_window=SETTINGS.scaledown_s)
@modal.concurrent(max_inputs=100)
@modal.asgi_app(requires_proxy_auth=True)  # Modal's proxy checks Modal-Key/Modal-Secret
def api() -> Any:
    from gpu.service.api.app import create_app

    return create_app(build_executor())


# --- trying the GPU side alone: `modal run gpu/service/modal_app.py --video … --image … --prompt …` -------


def remote_trial(modal_gpu: str, payload: dict[str, Any]) -> dict[str, Any]:
    """Run `trial` on the class for `modal_gpu` (the seam tests replace: it needs Modal)."""
    result: dict[str, Any] = GENERATORS[modal_gpu]().trial.remote(payload)
    return result


@app.local_entrypoint()
def main(
    video: str,
    image: str,
    prompt: str,
    video_description: str,
    out: str = "vap-trial",
    resolution: Resolution = DEFAULT_RESOLUTION,
    aspect_ratio: AspectRatio = DEFAULT_ASPECT_RATIO,
    num_frames: int = DEFAULT_NUM_FRAMES,
    fps: int = DEFAULT_FPS,
    seed: int | None = None,
    guidance_scale: float = DEFAULT_GUIDANCE_SCALE,
    steps: int | None = None,
    gpus: GpuCount = DEFAULT_GPUS,
    gpu: str = "",
    safety_checker: bool = DEFAULT_SAFETY_CHECKER,
) -> None:
    """Generate one video on Modal from local files (no AWS) and save video.mp4, poster.jpg,
    preview.webp and result.json (seed, size, timings) under --out."""
    settings = GenerationSettings(
        prompt=prompt, video_description=video_description, seed=seed, num_frames=num_frames, fps=fps,
        enable_safety_checker=safety_checker, aspect_ratio=aspect_ratio, resolution=resolution,
        guidance_scale=guidance_scale,
    )  # fmt: skip
    modal_gpu = gpu or routing.choose_class(settings, gpus, GENERATORS)
    if modal_gpu not in GENERATORS:
        raise SystemExit(f"--gpu {modal_gpu!r} is not offered; choose one of {', '.join(GENERATORS)}")
    payload = {
        "video": Path(video).read_bytes(),
        "image": Path(image).read_bytes(),
        "settings": settings.model_dump(mode="json"),
        "steps": steps,
    }
    print(f"generating on {modal_gpu} ({resolution} {aspect_ratio}, {num_frames} frames)…", flush=True)
    answer = remote_trial(modal_gpu, payload)
    if answer.get("error"):
        raise SystemExit(f"the job failed: {answer['error']['code']}: {answer['error']['message']}")
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    saved = [folder / "video.mp4", folder / "result.json"]
    saved[0].write_bytes(answer["video"])
    saved[1].write_text(json.dumps({"gpu_choice": modal_gpu, **answer["result"]}, indent=2) + "\n")
    for name, key in (("poster.jpg", "poster"), ("preview.webp", "preview")):
        if answer.get(key):
            (folder / name).write_bytes(answer[key])
            saved.append(folder / name)
    timings = answer["result"]["timings"]
    seed_used = answer["result"]["seed"]
    print(f"seed {seed_used}, generate {timings.get('generate_s')} s, total {timings.get('total_s')} s")
    print("saved " + ", ".join(str(p) for p in saved))
