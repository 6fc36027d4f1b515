import threading

import httpx
import pytest
from gpu_service_helpers import StubServices

from gpu import media
from gpu.engine import FakeEngine
from gpu.runner import JobFailed, RunnerConfig, UnsafeUrl, check_url, run_job


class Flags:
    """Injected safety classifier: flags every image of the listed calls (0 = input image)."""

    def __init__(self, *flag_calls):
        self.flag_calls = set(flag_calls)
        self.count = 0

    def __call__(self, images):
        flagged = self.count in self.flag_calls
        self.count += 1
        return [flagged] * len(images)


def config(**overrides):
    base = {"allow_http_loopback": True, "backoff_s": 0.01, "progress_min_interval_s": 0.0}
    base.update(overrides)
    return RunnerConfig(**base)


@pytest.fixture
def stub():
    with StubServices() as services:
        yield services


@pytest.fixture
def http():
    with httpx.Client() as client:
        yield client


def test_success_uploads_mp4_and_posts_signed_callbacks(stub, http):
    request = stub.request(num_frames=10, fps=12, aspect_ratio="16:9", steps=10)
    result = run_job(request, FakeEngine(), http, call_id="fc-1", config=config(), safety=Flags())
    assert (result.width, result.height, result.num_frames, result.fps, result.steps) == (832, 480, 9, 12, 10)
    assert 0 <= result.seed < 2**32 and result.gpu == "fake"
    assert {"download_s", "generate_s", "encode_s", "upload_s", "total_s"} <= set(result.timings)

    content_type, video = stub.recorded.uploads["/upload/job-1.mp4"]
    assert content_type == "video/mp4" and len(video) == result.bytes
    info = media.probe_mp4(video)
    assert (info.codec, info.pix_fmt, info.width, info.height, info.num_frames, info.fps) == (
        "h264", "yuv420p", 832, 480, 9, 12.0,
    )  # fmt: skip
    assert info.faststart

    assert all(stub.recorded.signatures_ok)
    # Every min(5, 10 // 4) = 2 steps; step 10 is followed by success instead.
    assert stub.events() == ["progress"] * 4 + ["succeeded"]
    *progress, done = stub.recorded.callbacks
    assert [(p.progress.step, p.progress.total) for p in progress] == [(2, 10), (4, 10), (6, 10), (8, 10)]
    assert done.result == result and done.call_id == "fc-1" and done.job_id == "job-1"


def test_given_seed_is_used_and_reported(stub, http):
    engine = FakeEngine()
    result = run_job(stub.request(seed=1234, steps=2), engine, http, config=config(), safety=Flags())
    assert result.seed == 1234 and engine.calls[0].seed == 1234
    assert stub.recorded.callbacks[-1].result.seed == 1234


@pytest.mark.parametrize(("flag_call", "what"), [(0, "input image"), (1, "generated video")])
def test_safety_flag_fails_job_and_uploads_nothing(stub, http, flag_call, what):
    engine = FakeEngine()
    with pytest.raises(JobFailed) as info:
        run_job(stub.request(steps=2), engine, http, config=config(), safety=Flags(flag_call))
    assert info.value.error.code == "safety" and what in info.value.error.message
    assert not stub.recorded.uploads
    assert stub.events()[-1] == "failed" and "succeeded" not in stub.events()
    assert stub.recorded.callbacks[-1].error.code == "safety"
    assert len(engine.calls) == flag_call  # a flagged input never reaches the model


def test_safety_disabled_skips_classifier(stub, http):
    classifier = Flags(0, 1)
    run_job(
        stub.request(enable_safety_checker=False, steps=2),
        FakeEngine(),
        http,
        config=config(),
        safety=classifier,
    )
    assert classifier.count == 0


def test_safety_enabled_without_checker_is_an_internal_error(stub, http):
    with pytest.raises(JobFailed) as info:
        run_job(stub.request(steps=2), FakeEngine(), http, config=config(), safety=None)
    assert info.value.error.code == "internal"


def test_missing_input_is_an_input_error(stub, http):
    request = stub.request(steps=2).model_copy(update={"video_url": f"{stub.base}/media/missing.mp4"})
    with pytest.raises(JobFailed) as info:
        run_job(request, FakeEngine(), http, config=config(), safety=Flags())
    assert info.value.error.code == "input" and "404" in info.value.error.message
    assert stub.events() == ["failed"]


def test_oversized_and_corrupt_inputs(stub, http):
    with pytest.raises(JobFailed, match="larger than"):
        run_job(stub.request(steps=2), FakeEngine(), http, config=config(max_video_bytes=100), safety=Flags())
    stub.media["ref.mp4"] = b"garbage" * 100
    with pytest.raises(JobFailed) as info:
        run_job(stub.request(steps=2), FakeEngine(), http, config=config(), safety=Flags())
    assert info.value.error.code == "input"


def test_callback_retried_on_5xx(stub, http):
    stub.callback_failures = 3
    run_job(stub.request(steps=2), FakeEngine(), http, config=config(), safety=Flags())
    # The progress callback (step 1/2) gets one 503 and is dropped; "succeeded" is retried: 503, 503, 200.
    assert stub.events() == ["succeeded"] and stub.recorded.callback_attempts == 4


def test_cancel_event_stops_generation(stub, http):
    cancel = threading.Event()
    seen = []

    def on_progress(step, total):
        seen.append(step)
        if step == 3:
            cancel.set()

    with pytest.raises(JobFailed) as info:
        run_job(stub.request(steps=20), FakeEngine(), http, config=config(), safety=Flags(), cancel=cancel,
                on_progress=on_progress)  # fmt: skip
    assert info.value.error.code == "cancelled" and seen == [1, 2, 3]
    assert stub.events()[-1] == "failed" and not stub.recorded.uploads


def test_job_timeout(stub, http):
    with pytest.raises(JobFailed) as info:
        run_job(stub.request(steps=50), FakeEngine(step_delay_s=0.01), http, config=config(job_timeout_s=0.2),
                safety=Flags())  # fmt: skip
    assert info.value.error.code == "timeout" and info.value.error.retryable


def test_unsafe_callback_url_fails_without_callback(stub, http):
    request = stub.request(steps=2).model_copy(update={"callback_url": "https://169.254.169.254/latest"})
    with pytest.raises(JobFailed, match="callback_url"):
        run_job(request, FakeEngine(), http, config=config(), safety=Flags())
    assert stub.recorded.callback_attempts == 0


def test_loopback_http_refused_without_the_flag(stub, http):
    with pytest.raises(JobFailed, match="callback_url"):
        run_job(
            stub.request(steps=2),
            FakeEngine(),
            http,
            config=config(allow_http_loopback=False),
            safety=Flags(),
        )


def public(host, port):
    return ["127.0.0.1"] if host == "localhost" else ["93.184.215.14"]


@pytest.mark.parametrize(
    "url",
    [
        "http://example.com/x",  # plain http
        "ftp://example.com/x",
        "https://127.0.0.1/x",
        "https://localhost/x",
        "https://10.1.2.3/x",
        "https://192.168.0.1/x",
        "https://169.254.169.254/latest/meta-data",  # cloud metadata
        "https://[::1]/x",
        "https://[fd00:ec2::254]/x",  # AWS IPv6 metadata
        "https://[::ffff:10.0.0.1]/x",  # IPv4-mapped private
        "https://100.64.0.1/x",  # carrier-grade NAT
        "https://0.0.0.0/x",
        "https://user:pw@example.com/x",
        "https:///nohost",
    ],
)
def test_check_url_refuses(url):
    with pytest.raises(UnsafeUrl):
        check_url(url, RunnerConfig(allow_http_loopback=False, resolver=public))


def test_check_url_resolves_names_and_checks_every_address():
    def rebinding(host, port):
        return ["93.184.215.14", "10.0.0.5"]

    check_url("https://bucket.s3.amazonaws.com/k?X-Amz-Signature=1", RunnerConfig(resolver=public))
    with pytest.raises(UnsafeUrl, match="non-public"):
        check_url("https://evil.example/x", RunnerConfig(resolver=rebinding))

    def fails(host, port):
        raise OSError("nxdomain")

    with pytest.raises(UnsafeUrl, match="resolve"):
        check_url("https://nowhere.invalid/x", RunnerConfig(resolver=fails))


def test_check_url_loopback_flag_allows_only_loopback_hosts():
    allowed = RunnerConfig(allow_http_loopback=True, resolver=public)
    check_url("http://127.0.0.1:4566/bucket/key", allowed)
    check_url("http://localhost:9000/x", allowed)
    with pytest.raises(UnsafeUrl):
        check_url("http://10.0.0.1/x", allowed)
    with pytest.raises(UnsafeUrl):
        check_url("http://example.com/x", allowed)


def test_loopback_flag_read_from_env(monkeypatch):
    monkeypatch.setenv("VAP_ALLOW_HTTP_LOOPBACK", "1")
    assert RunnerConfig().allow_http_loopback
    monkeypatch.delenv("VAP_ALLOW_HTTP_LOOPBACK")
    assert not RunnerConfig().allow_http_loopback
