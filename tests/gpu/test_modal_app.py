"""The Modal app builds offline (no token, no network) with the real modal SDK: one class per GPU
choice, settings that reach the containers, methods that run `run_job`, and the `modal run` trial."""

import contextlib
import dataclasses
import io
import json
import os
import subprocess
import sys
import time
import types
import warnings
from pathlib import Path

import pytest
from click.testing import CliRunner
from gpu_service_helpers import FakeDict, StubServices
from modal._utils.async_utils import synchronizer
from PIL import Image
from vap_shared.budget import Budget
from vap_shared.settings_parser import SettingsError

from gpu.service import media, modal_settings, routing
from gpu.service.engines.single import FakeEngine
from gpu.service.modal_settings import read_settings

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def modal_app():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import gpu.service.modal_app as module

        functions = dict(module.app.registered_functions)
        web = list(module.app.registered_web_endpoints)
    return module, functions, web


def test_app_registers_one_class_per_gpu_choice(modal_app):
    module, functions, web = modal_app
    assert module.app.name == "vap-gpu"
    classes = {
        "VapGeneratorH100.*": "H100!",
        "VapGeneratorH200.*": "H200",
        "VapGeneratorH100x2.*": "H100:2",
        "VapGeneratorH100x4.*": "H100:4",
        "VapGeneratorH100x8.*": "H100:8",
    }
    assert set(functions) == {"download_weights", "api", *classes}
    for name, gpu in classes.items():
        spec = functions[name]._spec_
        assert spec.gpus == gpu and list(spec.volumes) == ["/models"]
        # A container finds its class as a module global of that name.
        assert getattr(module, name.removesuffix(".*")) is module.GENERATORS[gpu]
    assert functions["api"]._spec_.gpus is None and web == ["api"]  # the API itself needs no GPU
    assert list(functions["download_weights"]._spec_.volumes) == ["/models"]
    # Modal's limits come from the job budget (B = 9000 s): run (9000 - 2 * 1200 - 600) // 2, startup 1200.
    assert (module.SETTINGS.timeout_s, module.SETTINGS.startup_timeout_s) == (3000, 1200)
    assert module.SETTINGS.budget == Budget(job_s=9000, modal_containers=2)


# --- deploy-time settings reach the containers -----------------------------------------------

# What a deployer might export. Unrelated variables must not leak into the containers.
DEPLOYER_ENV = {
    "VAP_MODAL_APP": "vap-gpu-staging",
    "VAP_MODAL_GPUS": "H100!,H200,H100:8",
    "VAP_MODAL_MAX_CONTAINERS": "3",
    "VAP_MODAL_MIN_CONTAINERS": "1",
    "VAP_MODAL_SCALEDOWN_S": "120",
    "VAP_JOB_BUDGET_S": "5400",
    "VAP_DEFAULT_STEPS": "30",
    "VAP_MODAL_COMPILE": "1",
    "VAP_REVISION": "0123456789abcdef0123456789abcdef01234567",
    "VAP_MODAL_VOLUME": "vap-weights-staging",
    "VAP_MODAL_SECRETS": "huggingface",
    "VAP_MODAL_CALLS_DICT": "vap-calls-staging",
    "VAP_ATTENTION_BACKEND": "_native_cudnn",  # read only inside the GPU containers (gpu.vap.attention)
    "AWS_PROFILE": "deployer",
    "UNRELATED_SETTING": "x",
}

# Imports the app module as a container would, and prints what it built: every module-level
# setting of a plain type (whatever the module calls them), and per function the real modal
# objects' GPU and the environment their `env=`/secrets forward (`modal.secret._local_secret_env`,
# the dict the SDK sends as the function's secret sources).
_PROBE = r"""
import dataclasses, json, warnings
warnings.simplefilter("ignore")
import gpu.service.modal_app as m
from modal.secret import _local_secret_env

def plain(value):
    if dataclasses.is_dataclass(value):
        return plain(dataclasses.asdict(value))
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return None

settings = {
    name: plain(value) for name, value in vars(m).items()
    if name.isupper() and not callable(value) and plain(value) is not None
}
functions = {
    name: {"gpu": f._spec_.gpus, "env": _local_secret_env(f._spec_.secrets)}
    for name, f in m.app.registered_functions.items()
}
print(json.dumps({"app": m.app.name, "settings": settings, "functions": functions}))
"""


def probe(env):
    """Import gpu/service/modal_app.py in a fresh interpreter that sees only `env` (plus the import path,
    which Modal's image provides through add_local_python_source)."""
    base = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'shared'}"}
    done = subprocess.run(
        [sys.executable, "-c", _PROBE], env={**base, **env}, cwd=REPO, capture_output=True, text=True,
        timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_every_deploy_setting_reaches_every_container():
    deployed = probe(DEPLOYER_ENV)
    assert deployed["app"] == "vap-gpu-staging"
    assert deployed["settings"]["SETTINGS"]["compile_blocks"] is True  # the deployer's values were read
    functions = deployed["functions"]
    assert {f["gpu"] for f in functions.values()} == {None, "H100!", "H200", "H100:8"}
    # Each container re-imports the module with only what its function forwards. Compare what it
    # builds there with what the deployer built, for every function's forwarded environment.
    seen = set()
    for name, function in functions.items():
        forwarded = function["env"]
        assert "AWS_PROFILE" not in forwarded and "UNRELATED_SETTING" not in forwarded, name
        # A setting only the model code reads is invisible to the module's own settings: check it.
        assert forwarded["VAP_ATTENTION_BACKEND"] == "_native_cudnn", name
        if function["gpu"] is not None:
            assert forwarded["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True", name
        key = json.dumps(forwarded, sort_keys=True)
        if key in seen:
            continue
        seen.add(key)
        in_container = probe(forwarded)
        assert in_container["app"] == deployed["app"], name
        assert in_container["settings"] == deployed["settings"], name
        assert in_container["functions"] == functions, name


def test_warm_containers_are_kept_only_for_the_default_jobs_gpu(modal_app, monkeypatch):
    # One warm container per class would bill 1 + 1 + 2 + 4 + 8 idle GPUs with the default choices.
    module = modal_app[0]
    monkeypatch.setattr(module, "SETTINGS", dataclasses.replace(module.SETTINGS, min_containers=1))
    warm = {g.modal_gpu: module.warm_containers(g) for g in module.SETTINGS.gpus}
    assert warm == {"H100!": 1, "H200": 0, "H100:2": 0, "H100:4": 0, "H100:8": 0}


def test_the_attention_backend_setting_is_the_name_the_model_reads():
    from gpu.vap.attention import BACKEND_ENV

    assert modal_settings.ATTENTION_BACKEND == BACKEND_ENV
    assert BACKEND_ENV in modal_settings.SETTING_NAMES


def test_removed_and_invalid_settings_are_refused():
    with pytest.raises(SettingsError, match="VAP_MODAL_TIMEOUT_S"):
        read_settings({"VAP_MODAL_TIMEOUT_S": "3600"})
    with pytest.raises(SettingsError, match="VAP_MODAL_GPU "):
        read_settings({"VAP_MODAL_GPU": "H100"})
    with pytest.raises(SettingsError, match="asks for 3 GPUs; one job uses one of 1, 2, 4, 8"):
        read_settings({"VAP_MODAL_GPUS": "H100:3"})
    with pytest.raises(SettingsError, match="twice"):
        read_settings({"VAP_MODAL_GPUS": "H100!,H100"})
    with pytest.raises(SettingsError, match="VAP_JOB_BUDGET_S must be a whole number from 4800 to 86400"):
        read_settings({"VAP_JOB_BUDGET_S": "1800"})  # below startup + 2 x 600
    with pytest.raises(SettingsError, match="VAP_MODAL_COMPILE must be 0 or 1, got 'yes'"):
        read_settings({"VAP_MODAL_COMPILE": "yes"})
    for moving in ("main", "v1", "f0d6ab47"):  # a branch, a tag, a short hash: none pins the weights
        with pytest.raises(SettingsError, match="VAP_REVISION must be a commit"):
            read_settings({"VAP_REVISION": moving})
    assert modal_settings.forwarded_env({"VAP_DEFAULT_STEPS": "20", "HOME": "/x", "VAP_REVISION": ""}) == {
        "VAP_DEFAULT_STEPS": "20"
    }


# --- the GPU class's methods, run with `.local()` (Modal runs @modal.enter first) ---------------


# `.local()` warns that the weights volume is not mounted here: expected, the engine is a fake.
@pytest.fixture
def local_generator(modal_app, monkeypatch):
    module, _, _ = modal_app
    import gpu.service.safety

    monkeypatch.setattr(module, "load_engine", lambda gpu_class, device: FakeEngine())
    monkeypatch.setattr(module, "gpu_device", lambda count: "cpu")  # no CUDA on this machine
    monkeypatch.setattr(module, "calls", FakeDict())  # the calls Dict (attempts) without Modal
    monkeypatch.setattr(
        gpu.service.safety.DiffusersSafetyClassifier,
        "from_pretrained",
        classmethod(lambda cls, **_: lambda images: [False] * len(images)),
    )
    monkeypatch.setenv("VAP_ALLOW_HTTP_LOOPBACK", "1")  # the stand-in services are on 127.0.0.1
    return module.GENERATORS["H100!"]()


@pytest.mark.filterwarnings("ignore:The VapGeneratorH100")
def test_generate_method_returns_result_or_error(local_generator):
    with StubServices() as stub:
        outcome = local_generator.generate.local(stub.request(seed=9, steps=2).model_dump(mode="json"))
        assert outcome["error"] is None and outcome["result"]["seed"] == 9
        bad = stub.request(steps=2).model_copy(update={"image_url": f"{stub.base}/media/missing.png"})
        outcome = local_generator.generate.local(bad.model_dump(mode="json"))
        assert outcome["result"] is None and outcome["error"]["code"] == "input"
        assert [e for e in stub.events() if e != "progress"] == ["succeeded", "failed"]


@pytest.mark.filterwarnings("ignore:The VapGeneratorH100")
def test_generate_method_honours_the_deadline_with_the_budgets_limits(local_generator, modal_app):
    module, _, _ = modal_app
    with StubServices() as stub:
        late = stub.request(steps=2).model_copy(update={"deadline_unix": int(time.time()) - 1})
        outcome = local_generator.generate.local(late.model_dump(mode="json"))
        assert outcome["error"]["code"] == "timeout" and stub.recorded.downloads == []
    # What @modal.enter built: the budget's limits, the deployment's default steps.
    instance = synchronizer._translate_in(local_generator)._cached_user_cls_instance()  # what .local() used
    config = instance.config
    assert config.budget == module.SETTINGS.budget and config.default_steps == 50


@pytest.mark.filterwarnings("ignore:The VapGeneratorH100")
def test_trial_method_returns_the_files(local_generator):
    from vap_shared.gpu_contract import GenerationSettings

    settings = GenerationSettings(prompt="a cat", video_description="a man", num_frames=9, fps=8, seed=3)
    payload = {
        "video": media.synth_clip_mp4(num_frames=12, width=64, height=48),
        "image": media.synth_image_png(64, 48),
        "settings": settings.model_dump(mode="json"),
        "steps": 2,
    }
    answer = local_generator.trial.local(payload)
    info = media.probe_mp4(answer["video"])
    assert (info.width, info.height, info.num_frames) == (480, 832, 9)
    assert answer["result"]["seed"] == 3 and answer["result"]["bytes"] == len(answer["video"])
    assert Image.open(io.BytesIO(answer["poster"])).size == (480, 832)
    assert Image.open(io.BytesIO(answer["preview"])).is_animated
    assert answer["result"]["preview_bytes"] == len(answer["preview"])


def test_api_executor_spawns_on_every_offered_class(modal_app):
    module, _, _ = modal_app
    executor = module.build_executor()
    assert (
        set(executor._spawners) == set(module.GENERATORS) == {"H100!", "H200", "H100:2", "H100:4", "H100:8"}
    )
    assert executor._registry is module.calls


# --- `modal run gpu/service/modal_app.py --video … --image … --prompt …` (the real modal CLI) ------------


class Choice(types.SimpleNamespace):
    pass


def stand_in_plan():
    """A stand-in for the plan's choice (`gpu.service.routing.choose_gpu`, `DoesNotFit`): 720p
    long jobs on an H200."""
    plan = types.SimpleNamespace()

    class DoesNotFit(Exception):
        pass

    def choose_gpu(width, height, num_frames, gpus=1):
        if gpus > 1:
            return Choice(modal_gpu=f"H100:{gpus}")
        return Choice(modal_gpu="H200" if max(width, height) == 1280 and num_frames > 81 else "H100!")

    plan.DoesNotFit, plan.choose_gpu = DoesNotFit, choose_gpu
    return plan


@pytest.fixture
def modal_run(tmp_path, monkeypatch):
    """Runs the real `modal run` command line in-process. Modal's `run_app` (which would start the
    app on Modal) is replaced by a no-op, and the module's `remote_trial` seam by a recorder."""
    import modal.cli.run

    calls = []

    def fake_remote_trial(modal_gpu, payload):
        calls.append((modal_gpu, payload))
        frames = media.synth_frames(9, 48, 64)
        result = {"seed": 11, "width": 48, "height": 64, "num_frames": 9, "fps": 8, "bytes": 3, "steps": 2,
                  "gpu": "NVIDIA H200", "timings": {"generate_s": 1.5, "total_s": 2.0}}  # fmt: skip
        return {
            "result": result,
            "video": b"mp4",
            "poster": media.poster_jpeg(frames),
            "preview": media.preview_webp(frames, 8),
        }

    @contextlib.contextmanager
    def fake_run_app(app, **_):
        # `modal run` imported the file by path as the module "modal_app": patch that one.
        monkeypatch.setattr(sys.modules["modal_app"], "remote_trial", fake_remote_trial)
        yield app

    monkeypatch.setattr(modal.cli.run, "run_app", fake_run_app)
    plan = stand_in_plan()
    monkeypatch.setattr(routing, "choose_gpu", plan.choose_gpu)
    monkeypatch.setattr(routing, "DoesNotFit", plan.DoesNotFit)
    monkeypatch.setattr(sys, "path", list(sys.path))  # `modal run` prepends the script's folder
    monkeypatch.delitem(sys.modules, "modal_app", raising=False)
    (tmp_path / "clip.mp4").write_bytes(b"video-bytes")
    (tmp_path / "img.jpg").write_bytes(b"image-bytes")

    def run(*args):
        from modal.cli.entry_point import entrypoint_cli

        argv = ["run", str(REPO / "gpu" / "service" / "modal_app.py"), "--video", str(tmp_path / "clip.mp4"),
                "--image", str(tmp_path / "img.jpg"), *args]  # fmt: skip
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            outcome = CliRunner().invoke(entrypoint_cli, argv, catch_exceptions=True)
        return outcome, calls

    return run


def test_modal_run_trial_sends_local_files_and_saves_the_results(modal_run, tmp_path):
    out = tmp_path / "out"
    outcome, calls = modal_run(
        "--prompt", "a cat dancing", "--video-description", "a man dancing", "--resolution", "720p",
        "--num-frames", "121", "--seed", "42", "--steps", "8", "--out", str(out),
    )  # fmt: skip
    assert outcome.exit_code == 0, outcome.output + repr(outcome.exception)
    [(modal_gpu, payload)] = calls
    assert modal_gpu == "H200"  # the plan's choice for 720p x 121 frames
    assert (payload["video"], payload["image"], payload["steps"]) == (b"video-bytes", b"image-bytes", 8)
    assert payload["settings"] == {
        "prompt": "a cat dancing", "video_description": "a man dancing", "seed": 42, "num_frames": 121,
        "fps": 16, "enable_safety_checker": True, "aspect_ratio": "9:16", "resolution": "720p",
        "guidance_scale": 5.0,
    }  # fmt: skip
    assert (out / "video.mp4").read_bytes() == b"mp4"
    saved = json.loads((out / "result.json").read_text())
    assert saved["gpu_choice"] == "H200" and saved["timings"] == {"generate_s": 1.5, "total_s": 2.0}
    assert Image.open(out / "poster.jpg").format == "JPEG" and Image.open(out / "preview.webp").is_animated
    assert "seed 11" in outcome.output and "video.mp4" in outcome.output


def test_modal_run_trial_options(modal_run, tmp_path):
    outcome, calls = modal_run(
        "--prompt", "p", "--video-description", "d", "--gpus", "8", "--aspect-ratio", "16:9",
        "--no-safety-checker", "--out", str(tmp_path / "o"),
    )  # fmt: skip
    assert outcome.exit_code == 0, outcome.output + repr(outcome.exception)
    modal_gpu, payload = calls[-1]
    assert modal_gpu == "H100:8" and payload["steps"] is None  # None: the deployment's default
    assert (
        payload["settings"]["aspect_ratio"] == "16:9"
        and payload["settings"]["enable_safety_checker"] is False
    )
    outcome, calls = modal_run(
        "--prompt", "p", "--video-description", "d", "--gpu", "H200", "--out", str(tmp_path)
    )
    assert outcome.exit_code == 0 and calls[-1][0] == "H200"  # an explicit class wins over the plan
    outcome, _ = modal_run("--prompt", "p", "--video-description", "d", "--gpus", "3")
    assert outcome.exit_code != 0  # 1, 2, 4 or 8 only, refused while parsing
    outcome, _ = modal_run("--prompt", "p")
    assert outcome.exit_code != 0 and "video-description" in outcome.output


# --- multi-GPU classes: the sequence-parallel engine and an engine that fell out of step ---------


def test_multi_gpu_classes_build_the_sequence_parallel_engine(modal_app, monkeypatch):
    module, _, _ = modal_app
    import gpu.service.engines.sequence_parallel

    built: list[tuple[object, int, dict[str, object]]] = []

    class Recorder:
        def __init__(self, pipeline_loader: object, world_size: int, **kwargs: object) -> None:
            built.append((pipeline_loader, world_size, kwargs))

    monkeypatch.setattr(gpu.service.engines.sequence_parallel, "SequenceParallelEngine", Recorder)
    monkeypatch.setattr(module, "recorded_revision", lambda: "0123456789abcdef0123456789abcdef01234567")
    engine = module.load_engine(modal_settings.parse_gpu("H100:8"), "cuda")
    assert isinstance(engine, Recorder)
    loader, world_size, kwargs = built[0]
    assert world_size == 8
    assert loader.keywords["offload_encoders"] is False  # 8 GPUs: room for the encoders on rank 0
    # Spawned ranks receive the loaders by pickle: they must survive it.
    import pickle

    pickle.loads(pickle.dumps(loader))
    pickle.loads(pickle.dumps(kwargs["transformer_loader"]))


class _FlakyEngine(FakeEngine):
    """A multi-GPU engine stand-in whose ranks fall out of step when told to."""

    healthy = True


@pytest.mark.filterwarnings("ignore:The VapGeneratorH100")
def test_an_engine_out_of_step_retires_its_container(modal_app, local_generator, monkeypatch):
    module, _, _ = modal_app
    engine = _FlakyEngine()
    monkeypatch.setattr(module, "load_engine", lambda gpu_class, device: engine)
    generator = module.GENERATORS["H100!"]()
    stopped: list[bool] = []
    monkeypatch.setattr("modal.experimental.stop_fetching_inputs", lambda: stopped.append(True))
    with StubServices() as stub:
        generator.generate.local(stub.request(seed=1, steps=2).model_dump(mode="json"))
        assert stopped == []  # a healthy engine keeps serving
        engine.healthy = False
        generator.generate.local(stub.request(seed=1, steps=2).model_dump(mode="json"))
    assert stopped == [True]


def test_gpu_classes_follow_the_plans_encoder_policy(modal_app, monkeypatch):
    """One H100 keeps UMT5 + CLIP in pinned host memory (the memory plan): that class loads with
    `offload_encoders=True` and asks Modal for the host memory; the others keep them on the GPU."""
    module, functions, _ = modal_app
    import gpu.service.engines.single
    import gpu.vap.loading

    assert routing.offload_encoders("H100", 1) and not routing.offload_encoders("H200", 1)
    memory = {spec.gpus: spec.memory for spec in (f._spec_ for f in functions.values())}
    assert memory["H100!"] == module.OFFLOAD_HOST_MEMORY_MIB
    assert memory["H200"] == memory["H100:8"] == module.HOST_HEADROOM_MIB

    loads: list[dict[str, object]] = []
    monkeypatch.setattr(gpu.vap.loading, "load_pipeline", lambda *args, **kwargs: loads.append(kwargs))
    monkeypatch.setattr(gpu.service.engines.single, "VideoEngine", lambda pipeline, device, **kw: "engine")
    monkeypatch.setattr(module, "recorded_revision", lambda: "0123456789abcdef0123456789abcdef01234567")
    for modal_gpu in ("H100!", "H200"):
        assert module.load_engine(modal_settings.parse_gpu(modal_gpu), "cuda") == "engine"
    assert [kwargs["offload_encoders"] for kwargs in loads] == [True, False]


# --- first contact with a GPU: what a container asks for and refuses ---------------------------


@pytest.mark.filterwarnings("ignore:The VapGeneratorH100")
def test_a_container_without_cuda_fails_its_start_before_loading_anything(modal_app, monkeypatch):
    module, _, _ = modal_app
    loaded: list[object] = []
    monkeypatch.setattr(module, "load_engine", lambda gpu_class, device: loaded.append(device))
    with pytest.raises(RuntimeError, match="CUDA failed to initialise"):
        module.gpu_device(1)  # this machine's torch has no CUDA: as a container whose driver failed
    with StubServices() as stub, pytest.raises(RuntimeError, match="CUDA failed to initialise"):
        # `.local()` runs the class's @modal.enter first, as a container start does.
        module.GENERATORS["H100!"]().generate.local(stub.request(steps=2).model_dump(mode="json"))
    assert loaded == [] and stub.recorded.callbacks == []  # never a 14B model on the CPU


@pytest.mark.filterwarnings("ignore:The VapGeneratorH100")
def test_a_re_run_of_a_call_reports_the_next_attempt(local_generator, monkeypatch):
    monkeypatch.setattr("modal.current_function_call_id", lambda: "fc-77")
    with StubServices() as stub:
        for _ in range(2):  # Modal runs the preempted input again with the same call id
            local_generator.generate.local(stub.request(seed=1, steps=2).model_dump(mode="json"))
        finals = [c for c in stub.recorded.callbacks if c.event == "succeeded"]
    assert [c.attempt for c in finals] == [1, 2] and {c.call_id for c in finals} == {"fc-77"}


def test_min_containers_warm_the_default_jobs_class_however_it_is_spelled(modal_app):
    module, _, _ = modal_app
    # "H100" (upgradable) serves the plan's "H100!" just as well: the setting must not vanish.
    settings = read_settings({"VAP_MODAL_GPUS": "H100,H200", "VAP_MODAL_MIN_CONTAINERS": "1"})
    warm = {g.modal_gpu: module.warm_containers(g, settings) for g in settings.gpus}
    assert warm == {"H100": 1, "H200": 0}
    no_home = read_settings({"VAP_MODAL_GPUS": "H200", "VAP_MODAL_MIN_CONTAINERS": "1"})
    with pytest.raises(SettingsError, match="does not offer it"):
        module.warm_containers(no_home.gpus[0], no_home)
    quiet = read_settings({"VAP_MODAL_GPUS": "H200"})
    assert module.warm_containers(quiet.gpus[0], quiet) == 0  # nothing asked: nothing to refuse


def test_every_gpu_class_asks_for_cpus_and_memory(modal_app):
    module, functions, _ = modal_app
    specs = {f._spec_.gpus: f._spec_ for f in functions.values() if f._spec_.gpus}
    assert {gpu: spec.cpu for gpu, spec in specs.items()} == {
        "H100!": 8.0, "H200": 8.0, "H100:2": 8.0, "H100:4": 16.0, "H100:8": 32.0,
    }  # fmt: skip
    assert all(spec.memory and spec.memory >= module.HOST_HEADROOM_MIB for spec in specs.values())


def test_the_offload_class_asks_for_what_the_encoders_really_pin(modal_app):
    # Pinned blocks are powers of two: 13.9 GB of UMT5-XXL + CLIP weights pin 18.3 GB.
    from gpu.vap.offload import pinned_nbytes
    from gpu.vap.released import build_components

    module, functions, _ = modal_app
    parts = build_components(with_transformer=False, with_safety=False)
    pinned = pinned_nbytes(parts.text_encoder) + pinned_nbytes(parts.image_encoder)
    assert pinned == module.PINNED_ENCODERS_BYTES
    (offload,) = [f._spec_ for f in functions.values() if f._spec_.gpus == "H100!"]
    assert offload.memory * 1024 * 1024 >= pinned + module.HOST_HEADROOM_MIB * 1024 * 1024


def test_the_weights_are_downloaded_and_served_only_at_a_pinned_commit(modal_app, monkeypatch, tmp_path):
    module, _, _ = modal_app
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: pytest.fail("downloaded"))
    with pytest.raises(SettingsError, match="no pinned commit"):
        module.pinned_revision(modal_settings.ModalSettings())  # gpu.vap.loading knows no commit yet
    commit = "0123456789abcdef0123456789abcdef01234567"
    assert module.pinned_revision(modal_settings.ModalSettings(revision=commit)) == commit
    record = tmp_path / "vap-revision.json"
    monkeypatch.setattr(module, "REVISION_RECORD", str(record))
    with pytest.raises(RuntimeError, match="records no"):
        module.recorded_revision()
    record.write_text(json.dumps({"commit": "main"}))  # what an unpinned download used to record
    with pytest.raises(RuntimeError, match="unpinned"):
        module.recorded_revision()
    record.write_text(json.dumps({"commit": commit}))
    assert module.recorded_revision() == commit


def test_every_checkpoint_pin_is_a_commit():
    from gpu.service.safety import SAFETY_CHECKER_REVISION
    from gpu.vap.loading import VAP_REVISION, is_commit

    assert is_commit(SAFETY_CHECKER_REVISION)
    assert VAP_REVISION is None or is_commit(VAP_REVISION)  # None: the deploy must name one
