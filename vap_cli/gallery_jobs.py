"""`vap gallery`, gathering: which jobs, and what each one was asked, made, cost or failed with.

Everything comes from the outputs folder, like `vap list`/`get`: `status.json` (every job; it also
names the inputs since status objects carry `inputs`), `metadata.json` (succeeded: the result,
the GPU, and the inputs of jobs stored before that) and `error.json` (failed, when the status
object has no errors). No DynamoDB.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from .config import StackInfo
from .costs import cost_of, job_time
from .jobs import job_id_of, read_json, status_keys

# Reads in flight at once (S3 answers each GET in tens of milliseconds from a laptop).
READERS = 8

# The generation settings a card lists, in this order (the sidecar's fields; prompt and video
# description are shown as text above them).
SETTING_ORDER = (
    "seed",
    "num_frames",
    "fps",
    "aspect_ratio",
    "resolution",
    "guidance_scale",
    "enable_safety_checker",
)


@dataclass(frozen=True)
class MediaSource:
    """Where one medium lives: an S3 object of the stack's bucket or a user's https URL."""

    kind: Literal["s3", "https"]
    bucket: str = ""
    key: str = ""
    url: str = ""

    @property
    def ref(self) -> str:
        return f"s3://{self.bucket}/{self.key}" if self.kind == "s3" else self.url


@dataclass(frozen=True)
class Filters:
    prefix: str = ""  # a name prefix: `balloon/` or `balloon/horse`
    since: datetime | None = None
    states: tuple[str, ...] = ()
    limit: int = 100


@dataclass
class GalleryJob:
    status: dict[str, Any]
    metadata: dict[str, Any] | None = None
    errors: list[str] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    # "reference" (video), "target" (image), "output" (video), "poster" (image).
    media: dict[str, MediaSource] = field(default_factory=dict)
    cost: dict[str, Any] | None = None

    @property
    def job_id(self) -> str:
        return str(self.status.get("job_id") or "")

    @property
    def name(self) -> str:
        return str(self.status.get("name") or "")

    @property
    def state(self) -> str:
        return str(self.status.get("state") or "")

    @property
    def uploaded_at(self) -> datetime | None:
        return job_time(self.job_id)

    @property
    def duration_s(self) -> float | None:
        value = (self.status.get("timings") or {}).get("total_s")
        return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None

    @property
    def cost_total(self) -> float | None:
        value = (self.cost or {}).get("total")
        return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None

    @property
    def device(self) -> str | None:
        """The GPU device the result names (`NVIDIA H100 80GB HBM3`, `cpu` locally)."""
        result = (self.metadata or {}).get("result") or {}
        return str(result["gpu"]) if isinstance(result, dict) and result.get("gpu") else None


def _candidate_keys(stack: StackInfo, filters: Filters) -> list[str]:
    """Status keys under the name prefix, uploaded since `since` (the job id says when), newest first."""
    keys = []
    for key in status_keys(stack, stack.outputs_prefix + filters.prefix.lstrip("/")):
        if filters.since is not None:
            moment = job_time(job_id_of(key))
            if moment is None or moment < filters.since:
                continue
        keys.append(key)
    return sorted(keys, key=job_id_of, reverse=True)


def _wanted(status: dict[str, Any] | None, states: tuple[str, ...]) -> bool:
    if status is None:
        return False
    return not states or status.get("state") in states or status.get("phase") in states


def _chunks(items: list[str], size: int) -> Iterator[list[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def select(
    stack: StackInfo, filters: Filters, on_read: Callable[[int, int], None] | None = None
) -> list[dict[str, Any]]:
    """The newest `limit` status objects that pass the filters. Reads status.json in parallel
    batches, newest first, and stops once `limit` jobs passed (on_read(read, candidates))."""
    keys = _candidate_keys(stack, filters)  # also makes the S3 client the reader threads share
    found: list[dict[str, Any]] = []
    read = 0
    with ThreadPoolExecutor(READERS) as pool:
        for batch in _chunks(keys, READERS * 2):
            for status in pool.map(lambda k: read_json(stack, k), batch):
                read += 1
                if _wanted(status, filters.states) and len(found) < filters.limit:
                    assert status is not None
                    found.append(status)
            if on_read:
                on_read(read, len(keys))
            if len(found) >= filters.limit:
                break
    return found


def _source(record: Any) -> MediaSource | None:
    """A job record's `inputs` entry (`{"kind": "s3", "bucket", "key"}` / `{"kind": "https", "url"}`)."""
    if not isinstance(record, dict):
        return None
    if record.get("kind") == "https" and record.get("url"):
        return MediaSource("https", url=str(record["url"]))
    if record.get("kind") == "s3" and record.get("bucket") and record.get("key"):
        return MediaSource("s3", bucket=str(record["bucket"]), key=str(record["key"]))
    return None


def _error_messages(errors: Any) -> list[str]:
    messages = []
    for error in errors or []:
        if isinstance(error, dict):
            where = f"{error['field']}: " if error.get("field") else ""
            messages.append(f"{where}{error.get('message')}")
    return messages


def _cost(status: dict[str, Any], metadata: dict[str, Any]) -> dict[str, Any] | None:
    for found in (status.get("cost"), metadata.get("cost")):
        if isinstance(found, dict):
            return found
    return None


def describe(stack: StackInfo, status: dict[str, Any]) -> GalleryJob:
    """One job's card content: its status object plus metadata.json / error.json."""
    job = GalleryJob(status=status)
    state = job.state
    if state == "succeeded" and status.get("metadata_key"):
        job.metadata = read_json(stack, str(status["metadata_key"]))
    job.errors = _error_messages(status.get("errors"))
    if state == "failed" and not job.errors and status.get("error_report_key"):
        report = read_json(stack, str(status["error_report_key"])) or {}
        job.errors = _error_messages(report.get("errors"))
    if state in ("failed", "cancelled") and not job.errors:
        job.errors = [f"The job {state} without a recorded reason."]
    # The status object's `inputs` (what ingest recorded), else metadata.json's: a reused result
    # records no media of its own (its metadata.json has the earlier job's), older status objects
    # none at all.
    recorded = status.get("inputs") or {}
    stored = (job.metadata or {}).get("inputs") or {}
    job.settings = dict(recorded.get("settings") or stored.get("settings") or {})
    if job.settings.get("seed") is None and status.get("seed") is not None:
        job.settings["seed"] = status["seed"]
    media = recorded.get("media") or stored.get("media") or {}
    # A stored result's copies of its inputs (next to the video, readable like it) come first; the
    # uploads themselves need read access to inbox/ and expire with it.
    copies = status.get("input_copies") or (job.metadata or {}).get("input_copies") or {}
    for slot, field_name in (("reference", "video_url"), ("target", "image_url")):
        copy = copies.get(field_name)
        source = (
            MediaSource("s3", bucket=stack.bucket, key=str(copy)) if copy else _source(media.get(field_name))
        )
        if source is not None:
            job.media[slot] = source
    if state == "succeeded":
        for slot, key_field in (("output", "output_key"), ("poster", "poster_key")):
            if status.get(key_field):
                job.media[slot] = MediaSource("s3", bucket=stack.bucket, key=str(status[key_field]))
    # `vap list`'s rule (status.json's cost, else metadata.json's), without reading metadata twice.
    job.cost = cost_of(stack, status) if job.metadata is None else _cost(status, job.metadata)
    return job


def gather(
    stack: StackInfo,
    filters: Filters,
    on_read: Callable[[int, int], None] | None = None,
    on_described: Callable[[int, int], None] | None = None,
) -> list[GalleryJob]:
    """The selected jobs, newest first, each with what its card shows."""
    statuses = select(stack, filters, on_read)
    jobs: list[GalleryJob] = []
    with ThreadPoolExecutor(READERS) as pool:
        for job in pool.map(lambda s: describe(stack, s), statuses):
            jobs.append(job)
            if on_described:
                on_described(len(jobs), len(statuses))
    return jobs
