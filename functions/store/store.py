"""Store Lambda (SQS, the store queue): finished runs' results stored into `outputs/`, jobs ended.

Thin adapter: the SQS batch is read with Powertools' `SQSEvent`; each record's body is parsed into a
`StoreRequest` here, and `vap_shared.result_store.store_result` does the work. Records not stored
(a retryable failure, too little time left, a malformed body) are reported as batch item failures:
SQS delivers them again, a retried one after a backoff (its visibility is shortened), and after
`maxReceiveCount` receives moves them to the dead-letter queue (alarmed). A record's last receive
fails its job with the reason rather than leave it waiting.
"""

from __future__ import annotations

from typing import Any

from vap_shared.cold_imports import collector_paused

with collector_paused():  # cold start: see vap_shared.cold_imports
    from aws_lambda_powertools import Logger
    from aws_lambda_powertools.utilities.data_classes import SQSEvent
    from aws_lambda_powertools.utilities.data_classes.sqs_event import SQSRecord
    from aws_lambda_powertools.utilities.typing import LambdaContext
    from pydantic import ValidationError
    from vap_shared.config import Settings, settings_at_cold_start
    from vap_shared.result_store import MIN_DOWNLOAD_S, STORE_RESERVE_S, StoreRequest, store_result
    from vap_shared.runtime import Runtime

logger = Logger()

# A record is started only while the invocation has this much left (ms): room for a download of at
# least MIN_DOWNLOAD_S and what follows it. The rest of the batch is handed back.
MIN_START_MS = int((STORE_RESERVE_S + MIN_DOWNLOAD_S) * 1000)
# A retryable failure is tried again after this (s), doubling per receive, at most RETRY_MAX_S
# (times the local stack's time scale): sooner than the queue's visibility timeout.
RETRY_FIRST_S = 30
RETRY_MAX_S = 900

_settings = settings_at_cold_start()
_runtime: Runtime | None = None


def get_runtime() -> Runtime:
    """Clients are built once per execution environment, on first use."""
    global _runtime
    if _runtime is None:
        _runtime = Runtime.build(_settings or Settings.from_env())
    return _runtime


def reset() -> None:
    """For tests: forget the cached clients and settings."""
    global _runtime, _settings
    _runtime = None
    _settings = None


def retry_delay_s(receive_count: int, time_scale: float = 1.0) -> int:
    delay = min(RETRY_FIRST_S * 2 ** max(0, receive_count - 1), RETRY_MAX_S)
    return max(0, round(delay * time_scale))


def _retry_later(rt: Runtime, record: SQSRecord, delay_s: int) -> None:
    """Make a record that failed visible again after `delay_s` (best effort: otherwise the queue's
    visibility timeout brings it back)."""
    try:
        rt.sqs.change_message_visibility(
            QueueUrl=rt.settings.store_queue_url,
            ReceiptHandle=record.receipt_handle,
            VisibilityTimeout=delay_s,
        )
    except Exception:
        logger.warning("could not shorten a failed record's visibility", exc_info=True)


def _store(rt: Runtime, record: SQSRecord, context: LambdaContext) -> bool:
    """Store one record; False when it is to be delivered again."""
    receives = int(record.attributes.approximate_receive_count or 1)
    try:
        request = StoreRequest.model_validate_json(record.body)
    except ValidationError as exc:
        # Only our own functions write this queue: a bad body is a bug. It goes to the DLQ (alarm).
        logger.error(
            "malformed store request",
            extra={"message_id": record.message_id, "errors": exc.errors(include_url=False)},
        )
        _retry_later(rt, record, 0)
        return False
    try:
        outcome = store_result(
            rt,
            request,
            time_left_s=lambda: context.get_remaining_time_in_millis() / 1000,
            last_try=receives >= rt.settings.store_max_receive_count,
        )
    except Exception:
        # An AWS call failing (S3, DynamoDB, SNS): tried again like a retryable failure.
        logger.exception("storing a result failed; tried again", extra={"job_id": request.job_id})
        outcome = "retry"
    logger.info("store request handled", extra={"job_id": request.job_id, "outcome": outcome})
    if outcome == "retry":
        _retry_later(rt, record, retry_delay_s(receives, rt.settings.local_time_scale))
        return False
    return True


@logger.inject_lambda_context(clear_state=True)
def handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    rt = get_runtime()
    records = list(SQSEvent(event).records)
    failed: list[str] = []
    for index, record in enumerate(records):
        if context.get_remaining_time_in_millis() < MIN_START_MS:
            logger.warning("too little time left; handing records back", extra={"left": len(records) - index})
            failed += [r.message_id for r in records[index:]]
            break
        try:
            stored = _store(rt, record, context)
        except Exception:
            logger.exception("storing a result failed; delivered again", extra={"id": record.message_id})
            stored = False
        if not stored:
            failed.append(record.message_id)
    return {"batchItemFailures": [{"itemIdentifier": message_id} for message_id in failed]}
