"""SQS → ingest Lambda: S3 sidecar events in, dispatched (or cleanly failed) jobs out.

Thin adapter: each SQS record is read with Powertools' event classes (`SQSRecord`, the S3
notification in its body through `vap_shared.s3_events`) into a typed `Delivery`; partial batch
responses via Powertools; the logic lives in `vap_shared.ingest_logic`.
"""

from __future__ import annotations

from typing import Any

from vap_shared.cold_imports import collector_paused

with collector_paused():  # cold start: see vap_shared.cold_imports
    from aws_lambda_powertools import Logger
    from aws_lambda_powertools.utilities.batch import BatchProcessor, EventType, process_partial_response
    from aws_lambda_powertools.utilities.data_classes.sqs_event import SQSRecord
    from aws_lambda_powertools.utilities.typing import LambdaContext
    from vap_shared import metrics
    from vap_shared.config import Settings, settings_at_cold_start
    from vap_shared.errors import TransientJobError
    from vap_shared.ingest_logic import ATTEMPTS_ATTRIBUTE, Delivery, Ingestor, Invocation
    from vap_shared.runtime import Runtime
    from vap_shared.s3_events import parse_sqs_body

logger = Logger()


_settings = settings_at_cold_start()
_ingestor: Ingestor | None = None


def get_ingestor() -> Ingestor:
    """Clients are built once per execution environment, on the first invocation."""
    global _ingestor
    if _ingestor is None:
        _ingestor = Ingestor(Runtime.build(_settings or Settings.from_env()))
    return _ingestor


def reset() -> None:
    """For tests: forget the cached clients and settings."""
    global _ingestor, _settings
    _ingestor = None
    _settings = None


def delivery_of(record: SQSRecord) -> Delivery:
    """The typed view of one SQS record: its S3 events, receive count and earlier attempts."""
    attempts = record.message_attributes[ATTEMPTS_ATTRIBUTE]
    raw = attempts.string_value if attempts is not None else None
    return Delivery(
        message_id=record.message_id,
        body=record.body,
        events=tuple(parse_sqs_body(record.body)),
        receive_count=int(record.attributes.approximate_receive_count or 1),
        attempts_before=int(raw) if raw and raw.isdigit() else 0,
    )


def handle_record(invocation: Invocation, record: SQSRecord) -> None:
    attempt: int | None = None
    try:
        delivery = delivery_of(record)
        attempt = delivery.attempt
        invocation.handle(delivery)
    except TransientJobError as exc:
        # Expected (media not uploaded yet, backends down): a batch item failure, SQS redelivers
        # after the visibility timeout.
        logger.warning(
            "will retry", extra={"message_id": record.message_id, "attempt": attempt, "reason": str(exc)}
        )
        raise
    except Exception as exc:
        # Unexpected: also a batch item failure, which Lambda's Errors metric does not count.
        metrics.ingest_record_crashed(type(exc).__name__)
        logger.exception(
            "record crashed; SQS will retry it", extra={"message_id": record.message_id, "attempt": attempt}
        )
        raise


@logger.inject_lambda_context(clear_state=True)
def handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    # A processor per invocation: it holds per-batch state. Always answer with batchItemFailures
    # (even when every record failed) so the event source mapping retries exactly the failed messages.
    processor = BatchProcessor(event_type=EventType.SQS, raise_on_entire_batch_failure=False)
    invocation = get_ingestor().invocation(lambda: context.get_remaining_time_in_millis() / 1000)
    return dict(
        process_partial_response(
            event=event,
            record_handler=lambda record: handle_record(invocation, record),
            processor=processor,
            context=context,
        )
    )
