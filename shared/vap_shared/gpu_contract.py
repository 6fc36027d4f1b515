"""Wire models of the GPU HTTP API and its signed callbacks (see docs/contracts.md).

Both sides import these: the Lambda's Modal backend builds a `GpuJobRequest`, the GPU app
parses it and answers with `GpuCallback`s. One definition keeps the two from drifting.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from .contract import (
    DEFAULT_ASPECT_RATIO,
    DEFAULT_FPS,
    DEFAULT_GPUS,
    DEFAULT_GUIDANCE_SCALE,
    DEFAULT_NUM_FRAMES,
    DEFAULT_RESOLUTION,
    DEFAULT_SAFETY_CHECKER,
    STEPS_MAX,
    AspectRatio,
    GpuCount,
    Resolution,
)

JobState = Literal["queued", "running", "succeeded", "failed", "cancelled"]
ErrorCode = Literal["input", "safety", "internal", "cancelled", "timeout"]
# Fields of a `GpuJobRequest` that may hold the service's own presigned S3 URLs.
ServiceUrlField = Literal["video_url", "image_url", "output_put_url", "poster_put_url", "preview_put_url"]


class _Wire(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class GenerationSettings(_Wire):
    """The generation fields of a sidecar, as fal's `fal-ai/video-as-prompt` names them."""

    prompt: str
    video_description: str
    seed: int | None = None
    num_frames: int = DEFAULT_NUM_FRAMES
    fps: int = DEFAULT_FPS
    enable_safety_checker: bool = DEFAULT_SAFETY_CHECKER
    aspect_ratio: AspectRatio = DEFAULT_ASPECT_RATIO
    resolution: Resolution = DEFAULT_RESOLUTION
    guidance_scale: float = DEFAULT_GUIDANCE_SCALE


class GpuJobRequest(_Wire):
    job_id: str = Field(min_length=1, max_length=128)
    video_url: str
    image_url: str
    output_put_url: str
    callback_url: str
    # Per-job HMAC key (hex of 32 bytes), derived from the stack secret by the caller.
    callback_key: str = Field(pattern=r"^[0-9a-f]{64}$")
    settings: GenerationSettings
    num_inference_steps: int | None = Field(default=None, ge=1, le=STEPS_MAX)
    # GPUs of one container for this job (sequence parallel); the sidecar's `gpus`, capped by the stack.
    gpus: GpuCount = DEFAULT_GPUS
    # Unix time by which the result must be stored (dispatch + the stack's job budget). The GPU side
    # never runs past it: a job that starts too late, or would end too late, fails with `timeout`.
    deadline_unix: int | None = None
    # Signed POST (same HMAC as callbacks) answering fresh presigned URLs (`UrlRefreshResponse`):
    # the GPU calls it when the job starts and before uploading, so URLs never expire in Modal's
    # queue; 409 means the service no longer wants this run (stop at once).
    refresh_url: str | None = None
    # Which URL fields are the service's own presigned S3 URLs: a 403/expiry on one of them is the
    # service's problem (`internal`, retryable), never the user's input error.
    service_urls: tuple[ServiceUrlField, ...] = ()
    # Optional previews uploaded next to the video: a middle frame and a small animation.
    poster_put_url: str | None = None
    preview_put_url: str | None = None


class UrlRefreshRequest(_Wire):
    """Body of the signed POST to `GpuJobRequest.refresh_url`."""

    job_id: str
    call_id: str
    purpose: Literal["start", "upload"]
    sent_at: int
    attempt: int = Field(default=1, ge=1)  # as `GpuCallback.attempt`


class UrlRefreshResponse(_Wire):
    """Fresh presigned URLs; a field is None when the request's URL stays valid as is (a user's
    pass-through https URL) or was not asked for."""

    video_url: str | None = None
    image_url: str | None = None
    output_put_url: str | None = None
    poster_put_url: str | None = None
    preview_put_url: str | None = None
    # The job's saved denoising state (work/<job_id>/resume.bin): GET it at the start (404: none
    # yet), PUT each new one. A re-run of a preempted call resumes from it.
    resume_get_url: str | None = None
    resume_put_url: str | None = None
    expires_at: int


class GpuProgress(_Wire):
    step: int = Field(ge=0)
    total: int = Field(ge=1)


class GpuResult(_Wire):
    seed: int
    width: int
    height: int
    num_frames: int
    fps: int
    bytes: int
    content_type: str = "video/mp4"
    steps: int
    gpu: str
    # GPUs the run really used (routing may give a job more than its sidecar's `gpus`); the cost is
    # priced on this. None from a GPU side that predates the field: the dispatched count then.
    gpu_count: GpuCount | None = None
    timings: dict[str, float] = Field(default_factory=dict)
    # Sizes of the previews stored next to the video; None = not asked for or not stored.
    poster_bytes: int | None = None
    preview_bytes: int | None = None


class GpuError(_Wire):
    code: ErrorCode
    message: str
    retryable: bool = False
    # The request field the error is about (e.g. "video_url" for a video the GPU cannot decode).
    field: str | None = None


class GpuCallback(_Wire):
    job_id: str
    call_id: str
    event: Literal["progress", "succeeded", "failed"]
    sent_at: int
    # Which execution of the call sent this: Modal runs a preempted input again (same call id) on a
    # fresh container; the re-run counts 2, 3, ... A callback from an attempt older than the newest
    # one the service has heard from is superseded (ignored).
    attempt: int = Field(default=1, ge=1)
    progress: GpuProgress | None = None
    result: GpuResult | None = None
    error: GpuError | None = None


class SubmitResponse(_Wire):
    call_id: str


class StatusResponse(_Wire):
    call_id: str
    state: JobState
    progress: GpuProgress | None = None
    result: GpuResult | None = None
    error: GpuError | None = None


class CancelResponse(_Wire):
    call_id: str
    cancelled: bool
