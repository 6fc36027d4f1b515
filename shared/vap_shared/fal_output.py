"""Our result in fal's output shape: `{"video": {url, content_type, file_name, file_size}}`.

fal-ai/video-as-prompt answers `{"video": File}` with File = `url` (required), `content_type`,
`file_name`, `file_size` (fal's API page for the endpoint, "Output" and "File").
The notification and `metadata.json` carry the same `video` object, so code written against fal's
result reads ours unchanged; `url` is the presigned `output_url` (it expires like it).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

VIDEO_CONTENT_TYPE = "video/mp4"


class FalFile(BaseModel):
    """fal's `File` type, field for field."""

    model_config = ConfigDict(extra="forbid")

    url: str = Field(min_length=1)
    content_type: str | None = None
    file_name: str | None = None
    file_size: int | None = Field(default=None, ge=0)


def download_name(name: str, job_id: str) -> str:
    """`balloon/horse` + job id -> `horse-<job_id>.mp4`, the name `vap get` saves it under too."""
    leaf = name.strip("/").rsplit("/", 1)[-1] or "video"
    return f"{leaf}-{job_id}.mp4"


def video_file(url: str, file_size: int, name: str, job_id: str) -> dict[str, Any]:
    """The `video` object for a stored MP4 of `file_size` bytes, downloadable at `url`."""
    return FalFile(
        url=url,
        content_type=VIDEO_CONTENT_TYPE,
        file_name=download_name(name, job_id),
        file_size=file_size,
    ).model_dump()
