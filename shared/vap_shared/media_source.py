"""Random access to the bytes of an input medium, for the structure checks at ingest.

A probe reads a few small ranges (a head, a box header near the end, a `moov` box), never the
whole file: `S3RangeSource` turns each read into a ranged GET pinned to the ETag ingest checked,
caches what it fetched, and stops after a fixed number of GETs and bytes so a probe's cost is
bounded whatever the file.
"""

from __future__ import annotations

from typing import Any, Protocol

from botocore.exceptions import ClientError

# One GET fetches at least this much: a head or a box header usually brings what follows with it.
READ_BLOCK = 64 * 1024
# What one probe may fetch of one object; past this the probe gives up (the medium is not judged).
MAX_PROBE_GETS = 8
MAX_PROBE_BYTES = 24 * 1024 * 1024


class MediaDamaged(ValueError):
    """The medium cannot be used as it is: the message says why, in words for the submitter."""


class ProbeBudgetExceeded(Exception):
    """Checking the medium would read more than a probe may: it is left to the GPU side."""


class SourceChanged(Exception):
    """The object was replaced while it was being checked (its ETag changed)."""


class ByteSource(Protocol):
    size: int

    def read(self, offset: int, length: int) -> bytes:
        """Up to `length` bytes at `offset` (fewer at the end of the file, none past it)."""
        ...


class BytesSource:
    """A medium already in memory (a `data:` URI's content)."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self.size = len(data)

    def read(self, offset: int, length: int) -> bytes:
        return self._data[offset : offset + max(0, length)]


class S3RangeSource:
    """An S3 object read by ranged GETs (`If-Match` its ETag), cached per fetched range."""

    def __init__(self, s3: Any, bucket: str, key: str, size: int, etag: str | None = None) -> None:
        self._s3 = s3
        self._bucket = bucket
        self._key = key
        self._etag = etag
        self.size = size
        self._chunks: list[tuple[int, bytes]] = []
        self.gets = 0
        self.fetched = 0

    def read(self, offset: int, length: int) -> bytes:
        end = min(self.size, offset + max(0, length))
        if offset >= end:
            return b""
        for start, data in self._chunks:
            if start <= offset and end <= start + len(data):
                return data[offset - start : end - start]
        # A read past the cached ranges: fetch it (at least a block, clipped to the file).
        stop = min(self.size, max(end, offset + READ_BLOCK))
        if self.gets >= MAX_PROBE_GETS or self.fetched + (stop - offset) > MAX_PROBE_BYTES:
            raise ProbeBudgetExceeded(f"{self.gets} reads, {self.fetched:,} bytes")
        kwargs: dict[str, Any] = {"Bucket": self._bucket, "Key": self._key}
        kwargs["Range"] = f"bytes={offset}-{stop - 1}"
        if self._etag:
            kwargs["IfMatch"] = self._etag
        try:
            response = self._s3.get_object(**kwargs)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("PreconditionFailed", "412"):
                raise SourceChanged(self._key) from None
            raise
        data = bytes(response["Body"].read())
        self.gets += 1
        self.fetched += len(data)
        self._chunks.append((offset, data))
        return data[: end - offset]
