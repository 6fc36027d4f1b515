"""At-least-once delivery: S3 event notifications, SQS and SNS sometimes deliver a message twice.

AWS documents all three as at-least-once; moto delivers exactly once. `AtLeastOnce` makes moto
(running in this process) deliver some messages twice, each where AWS would:

- "s3": an event notification sent twice to its queue (the same body, so the same sequencer, eTag
  and event time; a new SQS message with its own MessageId);
- "sqs": a message stays visible after its first receive, so it is received again (the same
  MessageId, a new receipt handle, its receive count raised), possibly while the first copy is
  still being processed (only the first receive: a forced rate of 1 must not send every message to
  its dead-letter queue);
- "sns": a topic delivers a message twice to an SQS subscriber (the same SNS MessageId in both).

Whether a given message is duplicated is decided from a hash of the seed, the channel and the
message's identity, so the rate holds whatever order threads draw in, and a seed replays the same
choices for the same messages. `rates` may be changed at run time (tests force a channel to 1.0).
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

log = logging.getLogger("local_stack.at_least_once")

CHANNELS = ("s3", "sqs", "sns")


class AtLeastOnce:
    def __init__(self, rate: float, seed: int = 0) -> None:
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"duplicate rate must be within [0, 1], got {rate}")
        self.rates: dict[str, float] = dict.fromkeys(CHANNELS, rate)
        self.seed = seed
        self.decisions: Counter[str] = Counter()  # messages looked at, per channel
        self.duplicated: Counter[str] = Counter()  # messages delivered twice, per channel
        self._lock = threading.Lock()
        self._restore: list[Callable[[], None]] = []

    def chosen(self, channel: str, identity: str) -> bool:
        """Whether this delivery of this message is duplicated (counted)."""
        rate = self.rates.get(channel, 0.0)
        digest = hashlib.sha256(f"{self.seed}:{channel}:{identity}".encode()).digest()
        hit = rate > 0 and int.from_bytes(digest[:8], "big") / 2**64 < rate
        with self._lock:
            self.decisions[channel] += 1
            if hit:
                self.duplicated[channel] += 1
        if hit:
            log.debug("delivering %s message %s twice", channel, identity)
        return hit

    @contextmanager
    def forcing(self, *channels: str, rate: float = 1.0) -> Iterator[None]:
        """Duplicate every message of these channels (or any `rate`) for the block."""
        saved = dict(self.rates)
        for channel in channels or CHANNELS:
            self.rates[channel] = rate
        try:
            yield
        finally:
            self.rates.update(saved)

    # ------------------------------------------------------------------ moto, in this process
    def install(self) -> None:
        """Patch moto's S3 notification, SQS receive and SNS-to-SQS delivery (undone by uninstall)."""
        from moto.s3 import notifications
        from moto.sns.models import Subscription
        from moto.sqs.models import SQSBackend

        send_sqs = notifications._send_sqs_message
        receive = SQSBackend.receive_message
        publish = Subscription.publish
        owner = self

        def send_sqs_message(account_id: str, event_body: Any, queue_name: str, region_name: str) -> None:
            send_sqs(account_id, event_body, queue_name, region_name)
            try:
                record = event_body["Records"][0]
                obj = record["s3"]["object"]
                identity = (
                    f"{record['s3']['bucket']['name']}/{obj['key']}/{obj.get('eTag')}/{record['eventTime']}"
                )
            except (KeyError, IndexError, TypeError):
                return  # s3:TestEvent
            if owner.chosen("s3", identity):
                send_sqs(account_id, event_body, queue_name, region_name)

        def receive_message(self: Any, queue_name: str, *args: Any, **kwargs: Any) -> Any:
            received = receive(self, queue_name, *args, **kwargs)
            again = [m.id for m in received if m.approximate_receive_count == 1 and owner.chosen("sqs", m.id)]
            if again:
                queue = self.get_queue(queue_name)
                for message in list(queue._messages):
                    if message.id in again:
                        message.change_visibility(0)  # received again, as if this receive was not seen
            return received

        def sns_publish(self: Any, message: str, message_id: str, *args: Any, **kwargs: Any) -> None:
            publish(self, message, message_id, *args, **kwargs)
            if self.protocol == "sqs" and owner.chosen("sns", f"{self.arn}/{message_id}"):
                publish(self, message, message_id, *args, **kwargs)

        notifications._send_sqs_message = send_sqs_message
        SQSBackend.receive_message = receive_message  # type: ignore[method-assign]
        Subscription.publish = sns_publish  # type: ignore[method-assign]

        def restore() -> None:
            notifications._send_sqs_message = send_sqs
            SQSBackend.receive_message = receive  # type: ignore[method-assign]
            Subscription.publish = publish  # type: ignore[method-assign]

        self._restore.append(restore)

    def uninstall(self) -> None:
        while self._restore:
            self._restore.pop()()
