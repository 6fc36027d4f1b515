"""Scheduled sweeper Lambda (EventBridge, every 5 minutes): overdue jobs settled with their backend,
ingest dead letters failed clearly, skipped notifications sent.

Thin adapter: the logic lives in the `vap_shared.sweeper` package.
"""

from __future__ import annotations

from typing import Any

from vap_shared.cold_imports import collector_paused

with collector_paused():  # cold start: see vap_shared.cold_imports
    from aws_lambda_powertools import Logger
    from aws_lambda_powertools.utilities.typing import LambdaContext
    from vap_shared.config import Settings, settings_at_cold_start
    from vap_shared.runtime import Runtime
    from vap_shared.sweeper import sweep

logger = Logger()


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


@logger.inject_lambda_context(clear_state=True)
def handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    # The event carries nothing we need: "now" is the clock, the work is in the jobs table (and
    # the ingest dead-letter queue).
    report = sweep(get_runtime(), time_left_ms=context.get_remaining_time_in_millis)
    return {
        "counts": report.count(),
        "jobs": report.outcomes,
        "dead_letters": report.dead_letters,
        "dead_letters_left": report.dead_letters_left,
        "stuck": report.stuck,
    }
