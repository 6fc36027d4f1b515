"""Lambda's SQS event source mapping, run locally against the emulator's queue.

What it reproduces: long-polling; batches of up to BatchSize gathered for at most
MaximumBatchingWindowInSeconds (and 6 MB of payload, Lambda's invoke limit); at most
MaximumConcurrency invocations at once (one worker per concurrent execution); with
ReportBatchItemFailures only the reported messages stay on the queue. A failed invocation (the
handler raised, was killed at its timeout, its environment crashed, or it was throttled) or a
malformed response fails the whole batch: nothing of it is deleted, so every message comes back
after the visibility timeout with its receive count raised, and past maxReceiveCount the queue's
redrive moves it to the DLQ. Visibility, delays, receive counts and the redrive are the queue's
own (moto's).
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from local_stack.lambda_runtime import LambdaFunction

log = logging.getLogger("local_stack.sqs_poller")

# Lambda's synchronous invocation payload limit: a batch never carries more.
MAX_PAYLOAD_BYTES = 6 * 1024 * 1024


@dataclass
class PollerStats:
    batches: int = 0
    messages: int = 0
    deleted: int = 0
    failed: int = 0
    in_flight: int = 0
    max_in_flight: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)


def to_lambda_record(message: dict[str, Any], queue_arn: str, region: str) -> dict[str, Any]:
    """An SQS message as Lambda delivers it in `Records` (camelCase keys, string attributes)."""
    attributes = {k: str(v) for k, v in message.get("Attributes", {}).items()}
    message_attributes = {
        name: {
            "stringValue": attr.get("StringValue"),
            "binaryValue": attr.get("BinaryValue"),
            "stringListValues": [],
            "binaryListValues": [],
            "dataType": attr.get("DataType", "String"),
        }
        for name, attr in message.get("MessageAttributes", {}).items()
    }
    body = message.get("Body", "")
    return {
        "messageId": message["MessageId"],
        "receiptHandle": message["ReceiptHandle"],
        "body": body,
        "attributes": attributes,
        "messageAttributes": message_attributes,
        "md5OfBody": message.get("MD5OfBody")
        or hashlib.md5(body.encode(), usedforsecurity=False).hexdigest(),
        "eventSource": "aws:sqs",
        "eventSourceARN": queue_arn,
        "awsRegion": region,
    }


class SqsPoller:
    def __init__(
        self,
        sqs: Any,
        queue_url: str,
        queue_arn: str,
        region: str,
        function: LambdaFunction,
        batch_size: int,
        max_concurrency: int,
        report_batch_item_failures: bool = True,
        wait_seconds: int = 1,
        batching_window_s: float = 0.0,
    ) -> None:
        self._sqs = sqs
        self.queue_url = queue_url
        self.queue_arn = queue_arn
        self.region = region
        self.function = function
        self.batch_size = batch_size
        self.max_concurrency = max_concurrency
        self.report_batch_item_failures = report_batch_item_failures
        self.wait_seconds = wait_seconds
        self.batching_window_s = batching_window_s
        self.stats = PollerStats()
        # Bodies of every message received (tests re-send them to simulate duplicate deliveries).
        self.received_bodies: deque[str] = deque(maxlen=10_000)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        for index in range(self.max_concurrency):
            thread = threading.Thread(target=self._work, name=f"sqs-poller-{index}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            # A worker finishes its current receive (≤ wait_seconds) and invocation.
            thread.join(timeout=self.wait_seconds + self.function.timeout_s + 5)
        self._threads.clear()

    @property
    def busy(self) -> bool:
        return self.stats.in_flight > 0

    def _work(self) -> None:
        while not self._stop.is_set():
            try:
                messages = self._receive()
            except Exception:
                if self._stop.is_set():
                    return
                log.exception("receive failed")
                time.sleep(1)
                continue
            if messages:
                self._run_batch(messages)

    def _receive(self) -> list[dict[str, Any]]:
        """One batch: long-poll, then keep gathering until BatchSize, the batching window or the
        payload limit ends it."""
        batch: list[dict[str, Any]] = []
        size = 0
        window_end = time.monotonic() + self.batching_window_s
        while len(batch) < self.batch_size and not self._stop.is_set():
            left = window_end - time.monotonic()
            if batch and left <= 0:
                break
            wait = self.wait_seconds if not batch else max(0, min(self.wait_seconds, int(left)))
            response = self._sqs.receive_message(
                QueueUrl=self.queue_url,
                MaxNumberOfMessages=min(self.batch_size - len(batch), 10),
                WaitTimeSeconds=wait,
                AttributeNames=["All"],
                MessageAttributeNames=["All"],
            )
            messages = list(response.get("Messages", []))
            for message in messages:
                size += len(message.get("Body", "").encode())
                batch.append(message)
            if not messages and (not batch or self.batching_window_s <= 0):
                break
            if self.batching_window_s <= 0 or size >= MAX_PAYLOAD_BYTES:
                break
        self.received_bodies.extend(m.get("Body", "") for m in batch)
        return batch

    def _run_batch(self, messages: list[dict[str, Any]]) -> None:
        stats = self.stats
        with stats.lock:
            stats.in_flight += 1
            stats.max_in_flight = max(stats.max_in_flight, stats.in_flight)
            stats.batches += 1
            stats.messages += len(messages)
        try:
            event = {"Records": [to_lambda_record(m, self.queue_arn, self.region) for m in messages]}
            failed_ids = self._invoke(event, [m["MessageId"] for m in messages])
            done = [m for m in messages if m["MessageId"] not in failed_ids]
            self._delete(done)
            with stats.lock:
                stats.deleted += len(done)
                stats.failed += len(messages) - len(done)
        finally:
            with stats.lock:
                stats.in_flight -= 1

    def _invoke(self, event: dict[str, Any], ids: list[str]) -> set[str]:
        """The ids of the messages that must stay on the queue."""
        try:
            result = self.function.invoke(event)
        except Exception as exc:
            log.warning("%s batch of %d failed as a whole: %s", self.function.logical_id, len(ids), exc)
            return set(ids)
        if not self.report_batch_item_failures:
            return set()
        if result is None:
            return set()
        if not isinstance(result, dict):
            log.error("ingest returned %r: not a batch response, the whole batch fails", type(result))
            return set(ids)
        failures = result.get("batchItemFailures") or []
        failed: set[str] = set()
        for item in failures:
            identifier = item.get("itemIdentifier") if isinstance(item, dict) else None
            if not identifier or identifier not in ids:
                # Lambda treats an empty or unknown identifier as a failure of the whole batch.
                log.error("invalid batchItemFailures entry %r: the whole batch fails", item)
                return set(ids)
            failed.add(identifier)
        return failed

    def _delete(self, messages: list[dict[str, Any]]) -> None:
        for start in range(0, len(messages), 10):
            chunk = messages[start : start + 10]
            response = self._sqs.delete_message_batch(
                QueueUrl=self.queue_url,
                Entries=[{"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(chunk)],
            )
            for failed in response.get("Failed", []):
                # E.g. the message was received again meanwhile (at-least-once): it will come back.
                log.warning("could not delete a processed message: %s", failed.get("Message", failed))
