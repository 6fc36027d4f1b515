"""Wire models of the GPU HTTP API and its signed callbacks (see docs/contracts.md).

Both sides import these: the Lambda's Modal backend builds a `GpuJobRequest`, the GPU app
parses it and answers with `GpuCallback`s. One definition keeps the two from drifting.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

AspectRatio = Literal["16:9", "9:16"]
Resolution = Literal["480p", "580p", "720p"]
JobState = Literal["queued", "running", "succeeded", "failed", "cancelled"]
ErrorCode = Literal["input", "safety", "internal", "cancelled", "timeout"]


class _Wire(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class GenerationSettings(_Wire):
    """The generation fields of a sidecar, as fal's `fal-ai/video-as-prompt` names them."""

    prompt: str
    video_description: str
    seed: int | None = None
    num_frames: int = 49
    fps: int = 16
    enable_safety_checker: bool = True
    aspect_ratio: AspectRatio = "9:16"
    resolution: Resolution = "480p"
    guidance_scale: float = 5.0


class GpuJobRequest(_Wire):
    job_id: str = Field(min_length=1, max_length=128)
    video_url: str
    image_url: str
    output_put_url: str
    callback_url: str
    # Per-job HMAC key (hex of 32 bytes), derived from the stack secret by the caller.
    callback_key: str = Field(pattern=r"^[0-9a-f]{64}$")
    settings: GenerationSettings
    num_inference_steps: int | None = Field(default=None, ge=1, le=200)


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
    timings: dict[str, float] = Field(default_factory=dict)


class GpuError(_Wire):
    code: ErrorCode
    message: str
    retryable: bool = False


class GpuCallback(_Wire):
    job_id: str
    call_id: str
    event: Literal["progress", "succeeded", "failed"]
    sent_at: int
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
