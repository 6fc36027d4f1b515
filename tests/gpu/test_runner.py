import io
import socket
import threading
import time

import httpx
import pytest
from gpu_service_helpers import StubServices
from PIL import Image
from vap_shared import routes
from vap_shared.budget import RUNNER_MARGIN_S, UPLOAD_MARGIN_S, Budget

from gpu.service import media
from gpu.service.engines.single import FakeEngine
from gpu.service.runner.config import JobFailed, RunnerConfig
from gpu.service.runner.run import run_job
from gpu.service.runner.transport import UnsafeUrl, check_url


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


def _clip() -> bytes:
    return media.synth_clip_mp4(num_frames=20, width=64, height=48, fps=10)


@pytest.mark.parametrize(
    ("name", "data", "field", "reason"),
    [
        ("ref.mp4", b"garbage" * 100, "video_url", "Invalid data found when processing input"),
        ("ref.mp4", "truncated", "video_url", "partial file"),
        ("ref.mp4", "headless", "video_url", "no readable video stream"),
        ("image.png", b"\x89PNG\r\n\x1a\n" + b"x" * 50, "image_url", "cannot decode the image"),
    ],
    ids=["garbage-video", "truncated-video", "video-without-its-stream", "broken-image"],
)
def test_media_the_gpu_cannot_decode_is_an_input_error_on_its_field_in_one_line(
    stub, http, name, data, field, reason
):
    clip = _clip()
    stub.media[name] = {"truncated": clip[: len(clip) // 2], "headless": clip[:200]}.get(data, data)
    with pytest.raises(JobFailed) as info:
        run_job(stub.request(steps=2), FakeEngine(), http, config=config(), safety=Flags())
    error = info.value.error
    assert (error.code, error.field) == ("input", field) and reason in error.message
    assert "\n" not in error.message and len(error.message) <= 200  # not ffmpeg's whole output
    assert "ffmpeg version" not in error.message and "/tmp/" not in error.message
    (callback,) = stub.recorded.callbacks
    assert callback.error == error  # the webhook gets the field too


def test_an_unreachable_input_names_its_field(stub, http):
    request = stub.request(steps=2).model_copy(update={"image_url": f"{stub.base}/media/missing.png"})
    with pytest.raises(JobFailed) as info:
        run_job(request, FakeEngine(), http, config=config(), safety=Flags())
    assert (info.value.error.code, info.value.error.field) == ("input", "image_url")


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


# --- the job budget: deadline_unix and the run's limit ----------------------------------------


def test_a_job_that_starts_after_its_deadline_fails_with_timeout_before_downloading(stub, http):
    request = stub.request(steps=2).model_copy(update={"deadline_unix": int(time.time()) - 10})
    engine = FakeEngine()
    with pytest.raises(JobFailed) as info:
        run_job(request, engine, http, config=config(), safety=Flags())
    assert info.value.error.code == "timeout" and "deadline" in info.value.error.message
    assert stub.recorded.downloads == [] and engine.calls == [] and not stub.recorded.uploads
    assert stub.events() == ["failed"] and stub.recorded.callbacks[-1].error.code == "timeout"


def test_a_job_too_close_to_its_deadline_stops_during_generation(stub, http):
    # Less than a second left once the upload margin is kept; 40 steps take 2 s.
    deadline = int(time.time()) + UPLOAD_MARGIN_S + 1
    request = stub.request(steps=40).model_copy(update={"deadline_unix": deadline})
    with pytest.raises(JobFailed) as info:
        run_job(request, FakeEngine(step_delay_s=0.05), http, config=config(), safety=Flags())
    assert info.value.error.code == "timeout" and len(stub.recorded.downloads) == 2
    assert not stub.recorded.uploads


def test_run_limit_comes_from_the_budget_and_the_deadline():
    budget = Budget(job_s=9000)
    limited = RunnerConfig(budget=budget)
    assert limited.run_limit_s(1000.0, None) == budget.run_s - RUNNER_MARGIN_S == 2940
    assert (
        limited.run_limit_s(1000.0, 1000 + 500)
        == budget.runner_limit_s(1000.0, 1500)
        == 500 - UPLOAD_MARGIN_S
    )
    assert RunnerConfig().run_limit_s(1000.0, None) is None
    assert RunnerConfig().run_limit_s(1000.0, 1500) == 500 - UPLOAD_MARGIN_S
    assert RunnerConfig(job_timeout_s=5, budget=budget).run_limit_s(1000.0, None) == 5


# --- service URLs: an expired presigned URL is never the user's fault --------------------------


@pytest.mark.parametrize("expired", ["/media/image.png", "/media/ref.mp4"])
def test_expired_service_url_is_internal_and_retryable_not_an_input_error(stub, http, expired):
    stub.expired = {expired}
    request = stub.request(steps=2).model_copy(
        update={"service_urls": ("video_url", "image_url", "output_put_url")}
    )
    with pytest.raises(JobFailed) as info:
        run_job(request, FakeEngine(), http, config=config(), safety=Flags())
    error = info.value.error
    assert (error.code, error.retryable) == ("internal", True)
    assert "403" in error.message and "not a problem with the request" in error.message
    assert stub.recorded.callbacks[-1].error == error


def test_a_users_own_url_refused_is_still_an_input_error(stub, http):
    stub.expired = {"/media/image.png"}  # a pass-through https URL of the user's: their problem
    request = stub.request(steps=2).model_copy(update={"service_urls": ("output_put_url",)})
    with pytest.raises(JobFailed) as info:
        run_job(request, FakeEngine(), http, config=config(), safety=Flags())
    assert (info.value.error.code, info.value.error.retryable) == ("input", False)


def test_expired_output_url_is_retryable(stub, http):
    stub.expired = {"/upload/job-1.mp4"}
    with pytest.raises(JobFailed) as info:
        run_job(stub.request(steps=2), FakeEngine(), http, config=config(), safety=Flags())
    assert (info.value.error.code, info.value.error.retryable) == ("internal", True)


# --- URL refresh (signed POST to refresh_url at start and before upload) ----------------------


def with_refresh(stub, request, **update):
    return request.model_copy(update={"refresh_url": routes.url(stub.base, "urls", request.job_id), **update})


def test_refresh_at_start_and_before_upload_replaces_the_urls(stub, http):
    # The URLs sent at dispatch have expired while the job waited; the refresh answers fresh ones.
    stub.expired = {"/media/old-ref.mp4", "/upload/old.mp4"}
    request = with_refresh(
        stub,
        stub.request(steps=2),
        video_url=f"{stub.base}/media/old-ref.mp4",
        output_put_url=f"{stub.base}/upload/old.mp4",
        service_urls=("video_url", "image_url", "output_put_url"),
    )
    stub.refresh_answers = [
        (200, {"video_url": f"{stub.base}/media/ref.mp4", "image_url": None, "expires_at": 1}),
        (200, {"output_put_url": f"{stub.base}/upload/fresh.mp4", "expires_at": 2}),
    ]
    result = run_job(request, FakeEngine(), http, call_id="fc-9", config=config(), safety=Flags())
    assert [(r.purpose, r.call_id, r.job_id) for r in stub.recorded.refreshes] == [
        ("start", "fc-9", "job-1"),
        ("upload", "fc-9", "job-1"),
    ]
    assert all(stub.recorded.refresh_signatures_ok)  # signed with the job's key, like callbacks
    assert "/media/old-ref.mp4" not in stub.recorded.downloads
    assert set(stub.recorded.downloads) == {"/media/ref.mp4", "/media/image.png"}  # image URL kept
    assert list(stub.recorded.uploads) == ["/upload/fresh.mp4"] and result.bytes > 0
    assert stub.events()[-1] == "succeeded"


@pytest.mark.parametrize("answer", [(500, None), (404, {"detail": "unknown job"}), (200, {"bogus": 1})])
def test_refresh_that_fails_keeps_the_urls_we_have(stub, http, answer):
    stub.refresh_answers = [answer]
    run_job(with_refresh(stub, stub.request(steps=2)), FakeEngine(), http, config=config(), safety=Flags())
    assert len(stub.recorded.refreshes) >= 2 and list(stub.recorded.uploads) == ["/upload/job-1.mp4"]


def test_refresh_endpoint_unreachable_keeps_the_urls_we_have(stub, http):
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        closed = routes.url(f"http://127.0.0.1:{sock.getsockname()[1]}", "urls", "job-1")
    request = stub.request(steps=2).model_copy(update={"refresh_url": closed})
    result = run_job(request, FakeEngine(), http, config=config(), safety=Flags())
    assert result.bytes > 0 and list(stub.recorded.uploads) == ["/upload/job-1.mp4"]


def test_refresh_409_at_start_stops_at_once_as_superseded(stub, http):
    stub.refresh_answers = [(409, {"detail": "job fell back to fal"})]
    engine = FakeEngine()
    with pytest.raises(JobFailed) as info:
        run_job(with_refresh(stub, stub.request(steps=2)), engine, http, config=config(), safety=Flags())
    assert (info.value.error.code, info.value.error.message) == ("cancelled", "superseded")
    # Nothing downloaded, generated, uploaded; no callback: the service no longer wants this run.
    assert stub.recorded.downloads == [] and engine.calls == [] and stub.recorded.callbacks == []


def test_refresh_409_before_upload_uploads_nothing(stub, http):
    stub.refresh_answers = [(200, {"expires_at": 1}), (409, None)]
    with pytest.raises(JobFailed) as info:
        run_job(
            with_refresh(stub, stub.request(steps=2)), FakeEngine(), http, config=config(), safety=Flags()
        )
    assert info.value.error.message == "superseded" and not stub.recorded.uploads
    assert "succeeded" not in stub.events() and "failed" not in stub.events()


# --- previews next to the video ---------------------------------------------------------------


def test_poster_and_preview_uploaded_next_to_the_video(stub, http):
    request = stub.request(num_frames=17, fps=8, steps=2).model_copy(
        update={
            "poster_put_url": f"{stub.base}/upload/poster.jpg",
            "preview_put_url": f"{stub.base}/upload/preview.webp",
        }
    )
    result = run_job(request, FakeEngine(), http, config=config(), safety=Flags())
    poster_type, poster = stub.recorded.uploads["/upload/poster.jpg"]
    preview_type, preview = stub.recorded.uploads["/upload/preview.webp"]
    assert (poster_type, preview_type) == ("image/jpeg", "image/webp")
    assert (result.poster_bytes, result.preview_bytes) == (len(poster), len(preview))
    assert Image.open(io.BytesIO(poster)).size == (result.width, result.height)
    animation = Image.open(io.BytesIO(preview))
    assert animation.is_animated and animation.n_frames == 16
    assert {"preview_s", "preview_upload_s"} <= set(result.timings)
    assert stub.recorded.callbacks[-1].result.poster_bytes == len(poster)


def test_previews_are_optional_and_their_failure_does_not_fail_the_job(stub, http):
    plain = run_job(stub.request(steps=2), FakeEngine(), http, config=config(), safety=Flags())
    assert (plain.poster_bytes, plain.preview_bytes) == (None, None) and "preview_s" not in plain.timings
    stub.expired = {"/upload/poster.jpg"}
    request = stub.request(job_id="job-2", steps=2).model_copy(
        update={
            "poster_put_url": f"{stub.base}/upload/poster.jpg",
            "preview_put_url": f"{stub.base}/upload/preview.webp",
        }
    )
    result = run_job(request, FakeEngine(), http, config=config(), safety=Flags())
    assert result.poster_bytes is None and result.preview_bytes is not None
    assert "/upload/job-2.mp4" in stub.recorded.uploads


def test_the_result_says_how_many_gpus_ran_it(stub, http):
    class EightGpus(FakeEngine):
        gpu_count = 8  # a sequence-parallel engine over a whole H100:8 container

    one = run_job(stub.request(seed=1, steps=2), FakeEngine(), http, config=config(), safety=Flags())
    eight = run_job(stub.request(seed=1, steps=2), EightGpus(), http, config=config(), safety=Flags())
    assert (one.gpu_count, eight.gpu_count) == (1, 8)
