"""Reading the SNS notifications: an SQS queue subscribed to the topic, drained in the background."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("local_stack.notifications")


@dataclass
class Notification:
    subject: str
    attributes: dict[str, str]
    body: dict[str, Any]
    raw: dict[str, Any]


class NotificationReader:
    """Drains the SQS queue subscribed to the topic into a list, on a background thread.

    A correct consumer of an at-least-once topic: a delivery whose SNS MessageId was already read
    is kept in `delivered` but not added to `received` again, so two notifications in
    `received` mean the service published twice."""

    def __init__(self, sqs: Any, queue_url: str) -> None:
        self._sqs = sqs
        self.queue_url = queue_url
        self.received: list[Notification] = []
        self.delivered: list[Notification] = []  # every message read, repeated deliveries included
        self._seen: set[str] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="notifications", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                response = self._sqs.receive_message(
                    QueueUrl=self.queue_url, MaxNumberOfMessages=10, WaitTimeSeconds=1
                )
            except Exception:
                if not self._stop.wait(0.5):
                    log.exception("reading notifications failed")
                continue
            for message in response.get("Messages", []):
                envelope = json.loads(message["Body"])
                attributes = {k: v.get("Value", "") for k, v in envelope.get("MessageAttributes", {}).items()}
                try:
                    body = json.loads(envelope.get("Message", "null"))
                except ValueError:
                    body = {"unparsed": envelope.get("Message")}
                note = Notification(envelope.get("Subject", ""), attributes, body, envelope)
                with self._lock:
                    self.delivered.append(note)
                    message_id = str(envelope.get("MessageId", message["MessageId"]))
                    if message_id not in self._seen:
                        self._seen.add(message_id)
                        self.received.append(note)
                self._sqs.delete_message(QueueUrl=self.queue_url, ReceiptHandle=message["ReceiptHandle"])

    def matching(self, predicate: Callable[[Notification], bool]) -> list[Notification]:
        with self._lock:
            return [n for n in self.received if predicate(n)]

    def wait_for(
        self, predicate: Callable[[Notification], bool], count: int = 1, timeout_s: float = 120.0
    ) -> list[Notification]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            found = self.matching(predicate)
            if len(found) >= count:
                return found
            time.sleep(0.2)
        raise TimeoutError(f"{len(self.matching(predicate))} of {count} notifications after {timeout_s}s")
