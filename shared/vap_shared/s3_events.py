"""S3 "object created" notifications as SQS delivers them, read with Powertools' event classes.

The data classes are lenient (the strict parser models reject moto's events, which lack
`userIdentity`, `requestParameters`, `responseElements` and `sequencer`); keys arrive URL-encoded
(`+` for a space; moto also encodes `/`) and are decoded here. Ingest and the sweeper's dead-letter
drain both read messages through `parse_sqs_body`, so they map a message to the same job.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import unquote_plus

from aws_lambda_powertools import Logger
from aws_lambda_powertools.utilities.data_classes.s3_event import S3Event, S3EventRecord

from .naming import parse_event_time

logger = Logger(child=True)


@dataclass(frozen=True)
class S3ObjectEvent:
    bucket: str
    key: str
    etag: str
    sequencer: str | None
    event_time: datetime
    event_name: str
    size: int | None


def parse_sqs_body(body: str) -> list[S3ObjectEvent]:
    """The `ObjectCreated` records in an SQS message body (real S3's or moto's shape, or wrapped in
    an SNS envelope). Test events and messages that are not S3 notifications give an empty list."""
    try:
        message = json.loads(body)
    except ValueError:
        logger.warning("skipping an SQS message that is not JSON")
        return []
    if not isinstance(message, dict):
        return []
    if message.get("Event") == "s3:TestEvent":
        logger.info("skipping s3:TestEvent")
        return []
    # An SNS envelope (if someone routes S3 -> SNS -> SQS without raw delivery).
    if message.get("Type") == "Notification" and isinstance(message.get("Message"), str):
        return parse_sqs_body(message["Message"])
    if not isinstance(message.get("Records"), list):
        return []
    events = [_object_event(r) for r in S3Event(message).records if _is_object_created(r)]
    return [e for e in events if e is not None]


def _is_object_created(record: S3EventRecord) -> bool:
    return (
        isinstance(record.raw_event, dict)
        and record.get("eventSource") == "aws:s3"
        and str(record.get("eventName", "")).startswith("ObjectCreated")
    )


def _object_event(record: S3EventRecord) -> S3ObjectEvent | None:
    s3: dict[str, Any] = record.get("s3") or {}
    if not isinstance(s3.get("bucket"), dict) or not isinstance(s3.get("object"), dict):
        return None
    message = record.s3
    bucket, obj = message.bucket, message.get_object
    raw_key = obj.get("key")
    if not bucket.get("name") or not raw_key:
        return None
    size = obj.get("size")
    sequencer = obj.get("sequencer")
    return S3ObjectEvent(
        bucket=str(bucket.name),
        key=unquote_plus(str(raw_key)),
        # Real S3 names it `eTag`; some producers write `etag`.
        etag=str(obj.etag or obj.get("etag") or "").strip('"'),
        sequencer=str(sequencer) if sequencer else None,
        event_time=parse_event_time(record.get("eventTime")),
        event_name=record.event_name,
        size=size if isinstance(size, int) and not isinstance(size, bool) else None,
    )
