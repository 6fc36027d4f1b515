"""Result reuse: a job equal to an earlier succeeded one gets that job's result, with no GPU run.

Equal means: the same media bytes, the same generation settings and the same *explicit* seed.

- Key: SHA-256 over a canonical JSON of `KEY_VERSION`, the settings (seed included) and a SHA-256
  of each medium. S3 media are hashed by streaming the object in 1 MiB chunks (never a whole video
  in memory), pinned to the ETag ingest checked; decoded `data:` media from their bytes.
- Never reused: jobs whose sidecar has no seed (a random seed is drawn: the user asked for a new
  video), sidecars with `reuse: false`, and jobs with an `https://` medium: we never read those
  bytes (the GPU fetches them) and the content behind a URL can change, so neither the URL nor a
  download in ingest would be a sound key.
- Store: one item per key in the jobs table, `job_id = "reuse#<key hex>"` (no job id can look like
  it). Lookup is one GetItem; the item names the earlier job and its output keys. Writes are
  conditional: the first success for a key is kept, unless its entry was marked stale because the
  earlier output had been deleted. Attribute names all start with `reuse_` so the item never enters
  a job index (it has no `state`, `backend` or `dispatched_at`). It expires like a job record.
- Copy: the earlier video (and poster/preview, when present) is copied server-side into the new
  job's folder; its `metadata.json` is rewritten for the new job with `reused_from`, by the same
  builder as every stored result (`vap_shared.results`). A missing earlier output is a miss: the
  entry is marked stale and the job runs.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from boto3.dynamodb.types import TypeDeserializer, TypeSerializer
from botocore.exceptions import ClientError

from . import results, s3io
from .results import StoredResult

if TYPE_CHECKING:
    from .media import MediaRef  # a type only: the store function builds no media references

KEY_VERSION: Final = 1  # bump to stop reusing results made before a change of the model or pipeline
CHUNK_BYTES: Final = 1024 * 1024
# Hashing streams the object through the ingest Lambda; larger media are not worth the time.
MAX_HASH_BYTES: Final = 256 * 1024 * 1024
ITEM_PREFIX: Final = "reuse#"

_SERIALIZER = TypeSerializer()
_DESERIALIZER = TypeDeserializer()


class NotReusable(Exception):
    """Why a job gets no reuse key (logged; the job simply runs)."""


# ---------------------------------------------------------------------------------------------- key


def digest_bytes(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _missing(exc: ClientError) -> bool:
    code = str(exc.response.get("Error", {}).get("Code", ""))
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return code in ("404", "NoSuchKey", "NotFound", "PreconditionFailed", "412") or status in (404, 412)


def digest_s3_object(
    s3: Any,
    bucket: str,
    key: str,
    etag: str | None = None,
    *,
    max_bytes: int = MAX_HASH_BYTES,
    chunk_bytes: int = CHUNK_BYTES,
    deadline: float | None = None,
) -> str:
    """SHA-256 of an S3 object, streamed in chunks; `etag` pins the version ingest validated.

    Raises `NotReusable` when the object is gone or changed, larger than `max_bytes`, or the
    `deadline` (time.monotonic()) passes while reading.
    """
    kwargs: dict[str, Any] = {"Bucket": bucket, "Key": key}
    if etag:
        kwargs["IfMatch"] = etag if etag.startswith('"') else f'"{etag}"'
    try:
        response = s3.get_object(**kwargs)
    except ClientError as exc:
        if _missing(exc):
            raise NotReusable(f"s3://{bucket}/{key} is gone or changed") from None
        raise
    body = response["Body"]
    try:
        if int(response.get("ContentLength", 0)) > max_bytes:
            raise NotReusable(f"s3://{bucket}/{key} is larger than {max_bytes:,} bytes")
        digest = hashlib.sha256()
        while chunk := body.read(chunk_bytes):
            digest.update(chunk)
            if deadline is not None and time.monotonic() > deadline:
                raise NotReusable(f"hashing s3://{bucket}/{key} took too long")
        return "sha256:" + digest.hexdigest()
    finally:
        body.close()


def media_digest(s3: Any, ref: MediaRef, etag: str | None = None, deadline: float | None = None) -> str:
    """The content hash of one resolved medium; `NotReusable` for https pass-through media."""
    if ref.data is not None:
        return digest_bytes(ref.data)
    if ref.kind == "s3" and ref.bucket and ref.key:
        return digest_s3_object(s3, ref.bucket, ref.key, etag, deadline=deadline)
    raise NotReusable(f"`{ref.field}` is an https:// URL; jobs with URL media are never reused")


def reuse_key(settings: Mapping[str, Any], media: Mapping[str, str]) -> str:
    """The key (hex) of settings (with their explicit seed) and media digests (field -> digest)."""
    if settings.get("seed") is None:
        raise NotReusable("the sidecar has no seed")
    material = json.dumps(
        {"v": KEY_VERSION, "settings": dict(settings), "media": dict(media)},
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    )
    return hashlib.sha256(material.encode("utf-8")).hexdigest()


def key_for_job(
    s3: Any,
    settings: Mapping[str, Any],
    refs: Mapping[str, MediaRef],
    *,
    explicit_seed: bool,
    reuse_requested: bool = True,
    etags: Mapping[str, str] | None = None,
    time_left_s: Callable[[], float] | None = None,
    reserve_s: float = 15.0,
) -> str:
    """The reuse key of a validated job, or `NotReusable` with the reason.

    `explicit_seed`: the sidecar named a seed (a drawn one does not count). `refs` are the resolved
    media (`data:` ones still holding their bytes); `etags` the ETags ingest saw for S3 media.
    Hashing stops (no reuse) once `time_left_s()` is down to `reserve_s`, the time the caller keeps
    for the dispatch itself.
    """
    if not reuse_requested:
        raise NotReusable("the sidecar says reuse: false")
    if not explicit_seed:
        raise NotReusable("the sidecar has no seed")
    for ref in refs.values():
        if ref.kind == "https":
            media_digest(s3, ref)  # raises with the reason
    deadline = time.monotonic() + max(0.0, time_left_s() - reserve_s) if time_left_s else None
    digests = {
        field: media_digest(s3, ref, (etags or {}).get(field), deadline)
        for field, ref in sorted(refs.items())
    }
    return reuse_key(settings, digests)


# ---------------------------------------------------------------------------------------------- store


@dataclass(frozen=True)
class ReuseEntry:
    key: str
    job_id: str  # the earlier job
    output_key: str
    metadata_key: str
    bytes: int
    backend: str | None
    created_at: str
    files: tuple[str, ...] = ()  # preview files (results.PREVIEW_FILES) the earlier job had


def _item_id(key: str) -> str:
    return ITEM_PREFIX + key


def _wire(values: Mapping[str, Any]) -> dict[str, Any]:
    return {k: _SERIALIZER.serialize(v) for k, v in values.items() if v is not None}


def _conditional_failed(exc: ClientError) -> bool:
    return exc.response.get("Error", {}).get("Code") == "ConditionalCheckFailedException"


class ReuseStore:
    """Reuse entries in the jobs table (low-level client: thread-safe, like JobStore)."""

    def __init__(self, client: Any, table_name: str) -> None:
        self._client = client
        self._table = table_name

    def lookup(self, key: str) -> ReuseEntry | None:
        """One GetItem; None when there is no entry or it was marked stale."""
        item = self._client.get_item(
            TableName=self._table, Key=_wire({"job_id": _item_id(key)}), ConsistentRead=True
        ).get("Item")
        if not item:
            return None
        values = {k: _DESERIALIZER.deserialize(v) for k, v in item.items()}
        if "reuse_stale_at" in values:
            return None
        return ReuseEntry(
            key=key,
            job_id=str(values["reuse_job_id"]),
            output_key=str(values["reuse_output_key"]),
            metadata_key=str(values["reuse_metadata_key"]),
            bytes=int(values.get("reuse_bytes", 0)),
            backend=values.get("reuse_backend"),
            created_at=str(values.get("reuse_created_at", "")),
            files=tuple(values.get("reuse_files") or ()),
        )

    def record(self, entry: ReuseEntry, expires_at: int) -> bool:
        """Remember a succeeded job's result; False when a live entry exists (the first one stays)."""
        item = {
            "job_id": _item_id(entry.key),
            "reuse_job_id": entry.job_id,
            "reuse_output_key": entry.output_key,
            "reuse_metadata_key": entry.metadata_key,
            "reuse_bytes": entry.bytes,
            "reuse_backend": entry.backend,
            "reuse_created_at": entry.created_at,
            "reuse_files": list(entry.files) or None,
            "expires_at": expires_at,
        }
        try:
            self._client.put_item(
                TableName=self._table,
                Item=_wire(item),
                ConditionExpression="attribute_not_exists(job_id) OR attribute_exists(reuse_stale_at)",
            )
        except ClientError as exc:
            if _conditional_failed(exc):
                return False
            raise
        return True

    def mark_stale(self, entry: ReuseEntry, now_iso: str) -> bool:
        """The earlier output is gone: the next success for this key may replace the entry."""
        try:
            self._client.update_item(
                TableName=self._table,
                Key=_wire({"job_id": _item_id(entry.key)}),
                UpdateExpression="SET reuse_stale_at = :now",
                ConditionExpression="reuse_job_id = :job",
                ExpressionAttributeValues=_wire({":now": now_iso, ":job": entry.job_id}),
            )
        except ClientError as exc:
            if _conditional_failed(exc):
                return False
            raise
        return True


# ---------------------------------------------------------------------------------------------- copy


@dataclass(frozen=True)
class Target:
    """The new job the result is copied to."""

    job_id: str
    name: str
    sidecar_bucket: str
    sidecar_key: str
    output_prefix: str


def _get_json(s3: Any, bucket: str, key: str) -> dict[str, Any] | None:
    try:
        raw = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
    except ClientError as exc:
        if _missing(exc):
            return None
        raise
    value = json.loads(raw)
    return value if isinstance(value, dict) else None


def _copy(s3: Any, bucket: str, source: str, dest: str, content_type: str) -> bool:
    """False when the source is gone."""
    try:
        s3io.copy(s3, bucket, source, dest, content_type)
    except ClientError as exc:
        if _missing(exc):
            return False
        raise
    return True


def copy_result(
    s3: Any,
    bucket: str,
    entry: ReuseEntry,
    target: Target,
    *,
    timings: Mapping[str, Any] | None = None,
    cost: Mapping[str, Any] | None = None,
    video_url: str | None = None,
) -> StoredResult | None:
    """Copy the earlier result into `target`'s folder; None when the earlier output is gone.

    Order: the earlier metadata is read first (a miss costs nothing), then the video is copied, then
    posters/previews, then the new metadata.json is written last, as every result is stored
    (`vap_shared.results`). What was generated and how (`inputs`, `seed`, `backend`, `result`) stays
    the earlier job's; identity, keys, `timings` (the earlier's when None) and `cost` are this job's,
    and `reused_from` names the earlier one. A retry simply copies again (same keys). `video_url`: a
    presigned GET of the new video, for the metadata's fal-shaped `video` object.
    """
    earlier = _get_json(s3, bucket, entry.metadata_key)
    if earlier is None:
        return None
    output_key = target.output_prefix + "video.mp4"
    if not _copy(s3, bucket, entry.output_key, output_key, "video/mp4"):
        return None
    source_prefix = entry.output_key.rsplit("/", 1)[0] + "/"
    extra = {name: source_prefix + name for name in entry.files if name in results.PREVIEW_FILES}
    files = results.copy_files(s3, bucket, extra, target.output_prefix)
    return results.write_metadata(
        s3,
        bucket,
        target,
        results.Generation.of_metadata(earlier),
        size=entry.bytes,
        timings=timings if timings is not None else earlier.get("timings") or {},
        video_url=video_url,
        files=files,
        cost=cost,
        # The inputs are byte-equal to the earlier job's: its copies are named, not copied again
        # (this runs in ingest, whose time is short).
        input_copies=earlier.get("input_copies") or None,
        reused_from=entry.job_id,
    )


def reuse_or_none(
    s3: Any, store: ReuseStore, bucket: str, key: str, target: Target, now_iso: str, **copy_kwargs: Any
) -> tuple[ReuseEntry, StoredResult] | None:
    """Lookup + copy: the earlier entry and the copied result, or None (no entry / output gone).

    A deleted earlier output marks the entry stale, so this job's own success replaces it.
    """
    entry = store.lookup(key)
    if entry is None or entry.job_id == target.job_id:
        return None
    copied = copy_result(s3, bucket, entry, target, **copy_kwargs)
    if copied is None:
        store.mark_stale(entry, now_iso)
        return None
    return entry, copied
