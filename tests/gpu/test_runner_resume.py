"""A run Modal preempts and runs again (same call id, a fresh container) resumes from the denoising
state the first attempt saved in the job's own storage; every callback says which attempt sent it."""

from __future__ import annotations

from typing import Any

import httpx
import numpy as np
import pytest
from gpu_service_helpers import StubServices
from vap_shared import routes

from gpu.service.engines.single import Checkpoints, DownscaledEngine, FakeEngine, VideoEngine
from gpu.service.runner.config import RunnerConfig
from gpu.service.runner.run import run_job

STATE = "state.bin"


class Preempted(BaseException):
    """The container goes away: nothing after it runs (no failure callback), like a real stop."""


def config(**overrides: Any) -> RunnerConfig:
    base: dict[str, Any] = {
        "allow_http_loopback": True,
        "backoff_s": 0.01,
        "progress_min_interval_s": 0.0,
        "progress_every_steps": 1,
        "checkpoint_every_s": 1e-6,  # save after every step
    }
    base.update(overrides)
    return RunnerConfig(**base)


@pytest.fixture
def stub():
    with StubServices() as services:
        services.serve_uploads = True
        yield services


@pytest.fixture
def http():
    with httpx.Client() as client:
        yield client


def _request(stub: StubServices, steps: int = 6, job_id: str = "job-1", **settings: Any) -> Any:
    request = stub.request(job_id=job_id, steps=steps, enable_safety_checker=False, **settings)
    stub.refresh_answers = [
        (
            200,
            {
                "resume_get_url": f"{stub.base}/media/{STATE}",
                "resume_put_url": f"{stub.base}/upload/{STATE}",
                "expires_at": 1,
            },
        )
    ]
    return request.model_copy(update={"refresh_url": routes.url(stub.base, "urls", job_id)})


def _stored_state(stub: StubServices) -> bytes | None:
    """What the last PUT stored (the stub serves it to the next GET, as S3 would)."""
    found = stub.recorded.uploads.get(f"/upload/{STATE}")
    if found is None:
        return None
    content_type, body = found
    assert content_type == "application/octet-stream" and stub.media[STATE] == body
    return body


def _preempt_at(step: int):
    def on_progress(done: int, total: int) -> None:
        if done == step:
            raise Preempted

    return on_progress


def test_a_re_run_resumes_where_the_preempted_run_saved(stub, http):
    request = _request(stub)
    with pytest.raises(Preempted):
        run_job(request, FakeEngine(), http, call_id="fc-1", config=config(), on_progress=_preempt_at(4))
    # Preempted after step 4 was reported, before its save: steps 1..3 are saved. No failure
    # callback: the container was gone.
    assert stub.events() == ["progress"] * 3
    assert b'"done": 3' in (_stored_state(stub) or b"")

    engine = FakeEngine()
    steps: list[int] = []
    result = run_job(
        request, engine, http, call_id="fc-1", config=config(), attempt=2,
        on_progress=lambda done, total: steps.append(done),
    )  # fmt: skip
    assert steps == [4, 5, 6] and result.timings["resumed_at_step"] == 3
    callbacks = stub.recorded.callbacks
    assert [c.attempt for c in callbacks] == [1, 1, 1, 2, 2, 2]  # progress 4, 5 + succeeded
    assert [c.event for c in callbacks[3:]] == ["progress", "progress", "succeeded"]
    assert [r.attempt for r in stub.recorded.refreshes] == [1, 2, 2]  # start, start, upload
    # A finished job needs no state: it is emptied (an empty object reads as none).
    assert stub.recorded.uploads[f"/upload/{STATE}"] == ("application/octet-stream", b"")


def test_the_state_of_another_job_or_a_damaged_one_is_not_resumed(stub, http):
    stub.media[STATE] = FakeEngine.STATE_MAGIC + b'{"key": "job-2", "seed": 1, "total": 6, "done": 5}'
    seen: list[int] = []
    run_job(
        _request(stub),
        FakeEngine(),
        http,
        call_id="fc-1",
        config=config(),
        on_progress=lambda d, t: seen.append(d),
    )
    assert seen == [1, 2, 3, 4, 5, 6] and stub.events()[-1] == "succeeded"


@pytest.mark.parametrize("missing", ["absent", "expired"])
def test_a_run_without_a_readable_state_starts_from_the_first_step(stub, http, missing):
    if missing == "expired":
        stub.expired = {f"/media/{STATE}"}
    seen: list[int] = []
    run_job(
        _request(stub),
        FakeEngine(),
        http,
        call_id="fc-1",
        config=config(),
        on_progress=lambda d, t: seen.append(d),
    )
    assert seen == [1, 2, 3, 4, 5, 6] and stub.events()[-1] == "succeeded"


def test_a_run_without_resume_urls_saves_nothing(stub, http):
    request = stub.request(steps=3, enable_safety_checker=False)  # no refresh URL: nothing to save to
    result = run_job(request, FakeEngine(), http, call_id="fc-1", config=config())
    assert list(stub.recorded.uploads) == ["/upload/job-1.mp4"] and result.bytes > 0
    assert [c.attempt for c in stub.recorded.callbacks] == [1, 1, 1]


def test_a_job_without_a_seed_draws_the_same_one_on_every_attempt(stub, http):
    request = _request(stub, steps=2, seed=None)
    first = run_job(request, FakeEngine(), http, call_id="fc-1", config=config())
    again = run_job(request, FakeEngine(), http, call_id="fc-1", config=config(), attempt=2)
    other = run_job(_request(stub, steps=2, job_id="job-2", seed=None), FakeEngine(), http, call_id="fc-2",
                    config=config())  # fmt: skip
    assert first.seed == again.seed != other.seed


class Recording:
    """Wraps an engine and keeps what each generation returned and resumed from."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.device_name = inner.device_name
        self.frames: list[np.ndarray] = []
        self.resumed: list[int] = []

    def generate(self, spec, image, ref_frames, on_step, checkpoints: Checkpoints | None = None):
        frames = self.inner.generate(spec, image, ref_frames, on_step, checkpoints)
        self.frames.append(frames)
        self.resumed.append(checkpoints.resumed_at if checkpoints else -1)
        return frames


def _tiny() -> DownscaledEngine:
    from gpu.vap.tiny import build_tiny_pipeline

    return DownscaledEngine(VideoEngine(build_tiny_pipeline(seed=0), "cpu", weights="tiny-0"), max_side=48)


@pytest.mark.slow
def test_the_tiny_model_preempted_and_resumed_on_a_fresh_engine_gives_the_same_frames(stub, http):
    steps = 5
    never = Recording(_tiny())
    plain = stub.request(job_id="job-1", steps=steps, enable_safety_checker=False)
    run_job(plain, never, http, call_id="fc-0", config=config())

    request = _request(stub, steps=steps)
    with pytest.raises(Preempted):
        run_job(request, _tiny(), http, call_id="fc-1", config=config(), on_progress=_preempt_at(3))
    assert _stored_state(stub)
    resumed = Recording(_tiny())  # a fresh worker: new pipeline, new scheduler
    run_job(request, resumed, http, call_id="fc-1", config=config(), attempt=2)
    assert resumed.resumed == [2]
    assert np.array_equal(resumed.frames[0], never.frames[0])


def test_the_service_saves_as_often_as_the_model_does_by_default():
    from gpu.service.engines.single import DEFAULT_CHECKPOINT_EVERY_S
    from gpu.vap.resume import DEFAULT_EVERY_S, MAX_EVERY_S

    assert DEFAULT_CHECKPOINT_EVERY_S == DEFAULT_EVERY_S <= MAX_EVERY_S
    assert RunnerConfig().checkpoint_interval_s() == DEFAULT_EVERY_S
