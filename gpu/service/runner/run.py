"""One generation job end to end: download → check → generate → check → encode → upload → callback.

The Modal class and the local GPU server both call `run_job`; `run_bytes` is the same generation
from media bytes, with nothing sent anywhere. The network I/O is `transport`'s (every URL checked,
every request pinned to the checked address), the callbacks and the per-step hook `callbacks`'.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import httpx
import numpy as np
from vap_shared.gpu_contract import ErrorCode, GenerationSettings, GpuJobRequest, GpuResult

from gpu.service.engines.single import Checkpoints, Engine
from gpu.service.generation import GenerationSpec, build_spec
from gpu.service.media import (
    MediaError,
    decode_sampled_frames,
    encode_mp4,
    fit_image,
    load_image,
    poster_jpeg,
    preview_webp,
)
from gpu.service.runner.callbacks import JobCancelled, Progress, ProgressHook, refresh_urls, send_callback
from gpu.service.runner.config import JobFailed, MiB, RunnerConfig, about, fail
from gpu.service.runner.transport import UnsafeUrl, check_url, download, fetch_optional, upload
from gpu.service.safety import SafetyClassifier, SafetyViolation, check_image, check_output

log = logging.getLogger(__name__)
STATE_TYPE = "application/octet-stream"  # vap_shared.naming.RESUME_STATE's content type


@dataclass
class Outputs:
    """What one generation produced, ready to upload (or to hand back, `gpu.service.modal_app`'s trial)."""

    video: bytes
    poster: bytes | None
    preview: bytes | None
    timings: dict[str, float]


def _previews(frames: np.ndarray, fps: int, poster: bool, preview: bool) -> tuple[bytes | None, bytes | None]:
    return (poster_jpeg(frames) if poster else None, preview_webp(frames, fps) if preview else None)


def produce(
    spec: GenerationSpec,
    image_bytes: bytes,
    video_bytes: bytes,
    engine: Engine,
    safety: SafetyClassifier | None,
    hook: Progress,
    *,
    poster: bool = False,
    preview: bool = False,
    checkpoints: Checkpoints | None = None,
) -> Outputs:
    """Decode → safety-check the image → generate → safety-check the frames → encode the MP4, and
    (asked for) the poster and animated preview from the same frames while ffmpeg encodes."""
    mark = time.monotonic()
    try:
        image = fit_image(load_image(image_bytes), spec.width, spec.height)
    except MediaError as exc:
        raise fail("input", str(exc), field="image_url") from exc
    try:
        ref_frames = decode_sampled_frames(video_bytes, spec.num_frames, spec.width, spec.height)
    except MediaError as exc:
        raise fail("input", str(exc), field="video_url") from exc
    timings = {"decode_s": time.monotonic() - mark}

    mark = time.monotonic()
    if spec.safety and safety is not None:
        check_image(safety, image)
    safety_s = time.monotonic() - mark
    hook.check()

    mark = time.monotonic()
    frames = engine.generate(spec, image, ref_frames, hook, checkpoints)
    timings["generate_s"] = time.monotonic() - mark
    if checkpoints is not None and checkpoints.resumed_at:
        timings["resumed_at_step"] = checkpoints.resumed_at
    _check_frames(frames, spec)

    mark = time.monotonic()
    if spec.safety and safety is not None:
        check_output(safety, frames)
    timings["safety_s"] = safety_s + time.monotonic() - mark
    hook.check()

    mark = time.monotonic()
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="vap-preview") as pool:
        # ffmpeg encodes in its own process; PIL's encoders release the GIL: both run at once.
        pending = None
        if poster or preview:
            pending = pool.submit(_timed, _previews, frames, spec.fps, poster, preview)
        video = encode_mp4(frames, spec.fps)
        timings["encode_s"] = time.monotonic() - mark
        poster_data, preview_data = None, None
        if pending is not None:
            (poster_data, preview_data), timings["preview_s"] = pending.result()
    return Outputs(video, poster_data, preview_data, timings)


def _timed(fn: Callable[..., Any], *args: Any) -> tuple[Any, float]:
    mark = time.monotonic()
    return fn(*args), time.monotonic() - mark


def run_job(
    request: GpuJobRequest,
    engine: Engine,
    http: httpx.Client,
    *,
    call_id: str = "local",
    config: RunnerConfig | None = None,
    safety: SafetyClassifier | None = None,
    cancel: threading.Event | None = None,
    on_progress: ProgressHook | None = None,
    attempt: int = 1,
) -> GpuResult:
    """Run one job and POST its signed callbacks. Returns the result or raises `JobFailed`.

    The failure callback is sent before `JobFailed` propagates (not when the service answered a
    URL refresh with 409: it no longer wants this run); on a safety failure nothing is uploaded.
    `attempt` is which execution of the call this is (Modal runs a preempted input again with the
    same call id): every callback and URL refresh says it, and a re-run resumes from the denoising
    state the run before it saved (the URL refresh hands out where it lives).
    """
    config = config or RunnerConfig()
    started = time.monotonic()
    try:
        check_url(request.callback_url, config)
    except UnsafeUrl as exc:
        # Nowhere safe to report to: fail without a callback.
        raise fail("input", f"callback_url refused: {exc}") from exc
    state = SavedState(http, config)
    try:
        result = _run(
            request, engine, http, call_id, config, safety, cancel, on_progress, started, attempt, state
        )
    except JobFailed as exc:
        failure = exc
    except JobCancelled:
        failure = fail("cancelled", "the job was cancelled")
    except SafetyViolation as exc:
        failure = fail("safety", str(exc))
    except Exception as exc:  # anything else is our bug or the GPU's: report it, don't hang the job
        log.exception("job %s failed", request.job_id)
        failure = fail("internal", f"internal error: {type(exc).__name__}: {str(exc)[:300]}", True)
    else:
        state.clear()
        send_callback(http, request, call_id, "succeeded", config, result=result, attempt=attempt)
        return result
    state.clear()
    if failure.notify:
        send_callback(http, request, call_id, "failed", config, error=failure.error, attempt=attempt)
    raise failure


def _run(
    request: GpuJobRequest,
    engine: Engine,
    http: httpx.Client,
    call_id: str,
    config: RunnerConfig,
    safety: SafetyClassifier | None,
    cancel: threading.Event | None,
    on_progress: ProgressHook | None,
    started: float,
    attempt: int,
    state: SavedState,
) -> GpuResult:
    # The limit counts from now (after Modal's queue and cold start): what is left of the run's
    # allowance and of the job's deadline. A job that starts too late never downloads anything.
    limit_s = config.run_limit_s(time.time(), request.deadline_unix)
    if limit_s is not None and limit_s <= 0:
        raise fail("timeout", "the job started too late to finish before its deadline", True)
    request, fresh = refresh_urls(http, request, call_id, "start", config, attempt=attempt)
    if fresh is not None:
        state.locate(fresh.resume_get_url, fresh.resume_put_url)
    service = set(request.service_urls)
    for name in ("video_url", "image_url", "output_put_url"):
        try:
            check_url(getattr(request, name), config)
        except UnsafeUrl as exc:
            code: ErrorCode = "internal" if name in service else "input"
            raise fail(code, f"{name} refused: {exc}", field=name) from exc
    try:
        # Without a seed in the sidecar, the job's id picks it: every attempt draws the same noise,
        # so a re-run after a preemption can continue the saved state.
        spec = build_spec(
            request.settings, request.num_inference_steps, config.default_steps, seed_from=request.job_id
        )
    except ValueError as exc:
        raise fail("input", str(exc)) from exc
    if spec.safety and safety is None:
        raise fail("internal", "the safety checker is enabled but not loaded on this server")
    hook = Progress(http, request, call_id, config, cancel, on_progress, started, limit_s, attempt)
    hook.check()

    mark = time.monotonic()
    with about("image_url"):
        image_bytes = download(
            http, request.image_url, "image", config.max_image_bytes, config, service="image_url" in service
        )
    with about("video_url"):
        video_bytes = download(
            http, request.video_url, "reference video", config.max_video_bytes, config,
            service="video_url" in service,
        )  # fmt: skip
    download_s = time.monotonic() - mark

    outputs = produce(
        spec, image_bytes, video_bytes, engine, safety, hook,
        poster=request.poster_put_url is not None, preview=request.preview_put_url is not None,
        checkpoints=state.checkpoints(request.job_id, config.checkpoint_interval_s()),
    )  # fmt: skip
    timings = {"download_s": download_s, **outputs.timings}

    # Presigned PUTs may have expired while the job queued and ran: fresh ones first.
    request, _ = refresh_urls(http, request, call_id, "upload", config, attempt=attempt)
    mark = time.monotonic()
    upload(http, request.output_put_url, outputs.video, config)
    timings["upload_s"] = time.monotonic() - mark
    sizes = _upload_previews(http, request, outputs, config, timings)
    timings["total_s"] = time.monotonic() - started
    return _result(spec, engine, len(outputs.video), timings, sizes.get("poster"), sizes.get("preview"))


class SavedState:
    """The job's saved denoising state in its own storage (presigned GET/PUT from the URL
    refresh): read once when the run starts, replaced by each save, emptied when the run ends
    (a finished job needs none; an empty object reads as none). Every failure here costs only
    resumability: it is logged, never the job's."""

    MAX_BYTES = 512 * MiB  # a 720p/121-frame state is ~115 MB (4 latent-sized float32 tensors)

    def __init__(self, http: httpx.Client, config: RunnerConfig) -> None:
        self.http, self.config = http, config
        self.get_url: str | None = None
        self.put_url: str | None = None
        self.dirty = False  # something (ours or an earlier attempt's) is stored there

    def locate(self, get_url: str | None, put_url: str | None) -> None:
        self.get_url, self.put_url = get_url, put_url

    def checkpoints(self, job_id: str, every_s: float) -> Checkpoints | None:
        if self.put_url is None:
            return None
        saved = None
        if self.get_url is not None:
            what = "saved denoising state"
            saved = fetch_optional(self.http, self.get_url, what, self.MAX_BYTES, self.config) or None
        self.dirty = saved is not None
        return Checkpoints(key=job_id, save=self._save, saved=saved, every_s=every_s)

    def _save(self, data: bytes) -> None:
        assert self.put_url is not None
        self.dirty = True
        upload(self.http, self.put_url, data, self.config, content_type=STATE_TYPE, what="denoising state")

    def clear(self) -> None:
        if self.put_url is None or not self.dirty:
            return
        try:
            upload(self.http, self.put_url, b"", self.config, content_type=STATE_TYPE, what="denoising state")
        except JobFailed as exc:
            log.warning("the saved denoising state was not cleared: %s", exc.error.message)


def _result(
    spec: GenerationSpec,
    engine: Engine,
    video_bytes: int,
    timings: dict[str, float],
    poster_bytes: int | None,
    preview_bytes: int | None,
) -> GpuResult:
    return GpuResult(
        seed=spec.seed,
        width=spec.width,
        height=spec.height,
        num_frames=spec.num_frames,
        fps=spec.fps,
        bytes=video_bytes,
        steps=spec.steps,
        gpu=engine.device_name,
        # What ran it (routing may give a job more GPUs than its sidecar asked for): the cost's basis.
        gpu_count=getattr(engine, "gpu_count", 1),
        timings={k: round(v, 3) for k, v in timings.items()},
        poster_bytes=poster_bytes,
        preview_bytes=preview_bytes,
    )


def run_bytes(
    settings: GenerationSettings,
    image_bytes: bytes,
    video_bytes: bytes,
    engine: Engine,
    *,
    steps: int | None = None,
    config: RunnerConfig | None = None,
    safety: SafetyClassifier | None = None,
) -> tuple[GpuResult, Outputs]:
    """One generation from media bytes, nothing sent anywhere (`modal run gpu/service/modal_app.py`'s
    trial): the MP4, poster and preview come back to the caller. Raises `JobFailed`."""
    config = config or RunnerConfig()
    started = time.monotonic()
    try:
        spec = build_spec(settings, steps, config.default_steps)
    except ValueError as exc:
        raise fail("input", str(exc)) from exc
    if spec.safety and safety is None:
        raise fail("internal", "the safety checker is enabled but not loaded on this server")
    hook = Progress(None, None, "trial", config, None, None, started, config.run_limit_s(time.time(), None))
    try:
        outputs = produce(spec, image_bytes, video_bytes, engine, safety, hook, poster=True, preview=True)
    except SafetyViolation as exc:
        raise fail("safety", str(exc)) from exc
    outputs.timings["total_s"] = time.monotonic() - started
    result = _result(
        spec,
        engine,
        len(outputs.video),
        outputs.timings,
        len(outputs.poster) if outputs.poster is not None else None,
        len(outputs.preview) if outputs.preview is not None else None,
    )
    return result, outputs


def _upload_previews(
    http: httpx.Client,
    request: GpuJobRequest,
    outputs: Outputs,
    config: RunnerConfig,
    timings: dict[str, float],
) -> dict[str, int]:
    """Upload the poster and the preview; they are extras: a failed upload is logged, reported
    as missing (no size), and never fails the job whose video is already stored."""
    sizes: dict[str, int] = {}
    mark = time.monotonic()
    for name, url, data, content_type in (
        ("poster", request.poster_put_url, outputs.poster, "image/jpeg"),
        ("preview", request.preview_put_url, outputs.preview, "image/webp"),
    ):
        if url is None or data is None:
            continue
        try:
            upload(http, url, data, config, content_type=content_type, what=name)
        except JobFailed as exc:
            log.warning("job %s: %s not stored: %s", request.job_id, name, exc.error.message)
            continue
        sizes[name] = len(data)
    if sizes:
        timings["preview_upload_s"] = time.monotonic() - mark
    return sizes


def _check_frames(frames: np.ndarray, spec: GenerationSpec) -> None:
    expected = (spec.num_frames, spec.height, spec.width, 3)
    if frames.dtype != np.uint8 or frames.shape != expected:
        raise RuntimeError(f"engine returned {frames.dtype} {frames.shape}, expected uint8 {expected}")
