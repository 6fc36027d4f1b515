"""The Modal app builds offline (no token, no network) and its method runs `run_job` as documented."""

import warnings

import httpx
import pytest
from gpu_service_helpers import StubServices

from gpu.engine import FakeEngine
from gpu.runner import RunnerConfig


@pytest.fixture(scope="module")
def modal_app():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import gpu.modal_app as module

        functions = dict(module.app.registered_functions)
        web = list(module.app.registered_web_endpoints)
    return module, functions, web


def test_app_registers_functions_gpu_and_volume(modal_app):
    module, functions, web = modal_app
    assert module.app.name == "vap-gpu"
    assert set(functions) == {"download_weights", "VapGenerator.*", "api"}
    generator = functions["VapGenerator.*"]._spec_
    assert generator.gpus == "H100!"
    assert list(generator.volumes) == ["/models"]
    assert functions["api"]._spec_.gpus is None and web == ["api"]  # the API itself needs no GPU
    assert list(functions["download_weights"]._spec_.volumes) == ["/models"]
    assert module.TIMEOUT_S > 600 and module.STARTUP_TIMEOUT_S >= 600


def test_generate_method_returns_result_or_error(modal_app):
    module, _, _ = modal_app
    instance = module.VapGenerator._get_user_cls()()
    # What @modal.enter would load, with a fake engine (no weights here).
    instance.engine = FakeEngine()
    instance.safety = lambda images: [False] * len(images)
    instance.config = RunnerConfig(allow_http_loopback=True, backoff_s=0.01)
    with StubServices() as stub, httpx.Client() as http:
        instance.http = http
        outcome = instance.generate(stub.request(seed=9, steps=2).model_dump(mode="json"))
        assert outcome["error"] is None and outcome["result"]["seed"] == 9
        bad = stub.request(steps=2).model_copy(update={"image_url": f"{stub.base}/media/missing.png"})
        outcome = instance.generate(bad.model_dump(mode="json"))
        assert outcome["result"] is None and outcome["error"]["code"] == "input"
        assert [e for e in stub.events() if e != "progress"] == ["succeeded", "failed"]
