"""A fal webhook delivery's body, typed: what fal reports about one request.

`{"request_id", "gateway_request_id", "status": "OK"|"ERROR", "payload", "payload_error", "error"}`
(fal's webhook documentation, "Webhook delivery"). The webhook parses deliveries into it; the sweeper
builds one from fal's status and result when a delivery never came, so both read a finished request
the same way.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

from . import metrics
from .errors import FieldError, field_error


class FalDelivery(BaseModel):
    # fal may add fields; only these are read.
    model_config = ConfigDict(extra="ignore", frozen=True)

    request_id: str | None = None
    gateway_request_id: str | None = None
    status: str | None = None
    payload: Any = None
    payload_error: Any = None
    error: Any = None

    @property
    def output(self) -> dict[str, Any]:
        """The model's output (`{"video": File, ...}`), or {} when there is none."""
        return self.payload if isinstance(self.payload, dict) else {}

    @property
    def video_url(self) -> str | None:
        """The result's CDN URL when the request succeeded with a video."""
        video = self.output.get("video")
        url = video.get("url") if isinstance(video, dict) else None
        return url if self.status == "OK" and isinstance(url, str) and url else None

    @property
    def rejected(self) -> bool:
        """fal's validation answer (a 422 `detail`): the request's fault, not the service's."""
        return self.output.get("detail") is not None

    def failure_kind(self) -> metrics.ErrorKind:
        return "input" if self.rejected else "internal"

    def failure_errors(self) -> list[FieldError]:
        if self.rejected:
            from .backends.fal import fal_detail_errors  # fal's rejection format; rare: loaded here

            return fal_detail_errors(self.output["detail"])
        if self.payload_error:
            return [field_error(None, f"fal.ai could not return the result: {self.payload_error}")]
        if self.error:
            return [field_error(None, f"Generation failed on fal.ai: {self.error}")]
        if self.status == "OK":
            return [field_error(None, "fal.ai finished without a video URL.")]
        return [field_error(None, "Generation failed on fal.ai without a reason.")]
