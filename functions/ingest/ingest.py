"""SQS → ingest Lambda: S3 sidecar events in, dispatched (or cleanly failed) jobs out.

Thin adapter: partial batch responses via Powertools; the logic lives in `vap_shared.ingest_logic`.
"""

from __future__ import annotations

import gc
from typing import Any

# Cold start: no garbage collections while the imports below build ~90,000 long-lived objects
# (~20 ms of an init here), then freeze them so later collections do not scan them either.
_gc_was_enabled = gc.isenabled()
gc.disable()
try:
    from aws_lambda_powertools import Logger
    from aws_lambda_powertools.utilities.batch import BatchProcessor, EventType, process_partial_response
    from aws_lambda_powertools.utilities.data_classes.sqs_event import SQSRecord
    from aws_lambda_powertools.utilities.typing import LambdaContext
    from vap_shared.config import Settings, settings_at_cold_start
    from vap_shared.errors import TransientJobError
    from vap_shared.ingest_logic import Ingestor
    from vap_shared.runtime import Runtime
finally:
    gc.freeze()
    if _gc_was_enabled:
        gc.enable()

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


def record_handler(record: SQSRecord, lambda_context: LambdaContext | None = None) -> None:
    """Powertools passes `lambda_context` (it looks for the parameter by name)."""
    receive_count = int(record.attributes.approximate_receive_count or 1)
    context = lambda_context
    time_left_s = (lambda: context.get_remaining_time_in_millis() / 1000) if context is not None else None
    try:
        get_ingestor().handle_message(record.body, receive_count, time_left_s)
    except TransientJobError as exc:
        # Reported as a batch item failure: SQS redelivers after the visibility timeout.
        logger.warning(
            "will retry",
            extra={"message_id": record.message_id, "receive_count": receive_count, "reason": str(exc)},
        )
        raise


@logger.inject_lambda_context(clear_state=True)
def handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    # A processor per invocation: it holds per-batch state. Always answer with batchItemFailures
    # (even when every record failed) so the event source mapping retries exactly the failed messages.
    processor = BatchProcessor(event_type=EventType.SQS, raise_on_entire_batch_failure=False)
    return dict(
        process_partial_response(
            event=event, record_handler=record_handler, processor=processor, context=context
        )
    )
