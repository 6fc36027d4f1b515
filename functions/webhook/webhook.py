"""Webhook Lambda (Function URL, payload 2.0): signed GPU callbacks and fal webhooks.

Thin adapter: the Function URL event is read with Powertools' `LambdaFunctionUrlEvent`; routing and
HTTP checks here; verification and job logic in `vap_shared.webhook_logic`, which sees a typed
`Delivery` (job id, lower-case headers, raw body bytes, the fal URL's token), never the event.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable
from typing import Any

from vap_shared.cold_imports import collector_paused

with collector_paused():  # cold start: see vap_shared.cold_imports
    from aws_lambda_powertools import Logger
    from aws_lambda_powertools.utilities.data_classes import LambdaFunctionUrlEvent
    from aws_lambda_powertools.utilities.typing import LambdaContext
    from vap_shared.config import Settings, settings_at_cold_start
    from vap_shared.fal_token import TOKEN_PARAM
    from vap_shared.naming import is_job_id
    from vap_shared.routes import RouteName, match_route
    from vap_shared.runtime import Runtime
    from vap_shared.webhook_logic import (
        Delivery,
        Reply,
        handle_fal_webhook,
        handle_gpu_callback,
        handle_url_refresh,
    )

logger = Logger()

# Callbacks are small JSON documents; anything bigger is not from our GPU app or fal.
MAX_BODY_BYTES = 256 * 1024


_settings = settings_at_cold_start()
_runtime: Runtime | None = None


def get_runtime() -> Runtime:
    """Clients are built once per execution environment, on the first invocation."""
    global _runtime
    if _runtime is None:
        _runtime = Runtime.build(_settings or Settings.from_env())
    return _runtime


def reset() -> None:
    global _runtime, _settings
    _runtime = None
    _settings = None


Logic = Callable[[Runtime, Delivery], Reply]
# Three POST routes (`vap_shared.routes`): a few lines here instead of Powertools' resolver, whose
# import (asyncio, every event class) was the webhook's largest avoidable cold-start cost.
LOGIC: dict[RouteName, Logic] = {
    "gpu": handle_gpu_callback,
    "urls": handle_url_refresh,
    "fal": handle_fal_webhook,
}


def _json(status: int, body: dict[str, Any]) -> dict[str, Any]:
    """A Function URL (payload 2.0) response."""
    return {"statusCode": status, "headers": {"Content-Type": "application/json"}, "body": json.dumps(body)}


def _raw_body(event: LambdaFunctionUrlEvent) -> bytes:
    """The exact bytes the caller sent (signatures cover them), base64-decoded when Lambda says so."""
    body = event.body or ""
    if event.is_base64_encoded:
        return base64.b64decode(body, validate=True)
    return body.encode("utf-8")


def _handle(event: LambdaFunctionUrlEvent, job_id: str, logic: Logic) -> dict[str, Any]:
    headers = {k.lower(): v for k, v in (event.headers or {}).items()}
    declared = headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        return _json(413, {"error": "body too large"})
    try:
        body = _raw_body(event)
    except (binascii.Error, ValueError):
        return _json(400, {"error": "body is not valid base64"})
    if len(body) > MAX_BODY_BYTES:
        return _json(413, {"error": "body too large"})
    content_type = headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != "application/json":
        return _json(415, {"error": "content type must be application/json"})
    if not is_job_id(job_id):  # e.g. `reuse#<key>`: other items of the jobs table are never jobs
        return _json(404, {"error": "unknown job"})
    token = (event.query_string_parameters or {}).get(TOKEN_PARAM)
    reply = logic(get_runtime(), Delivery(job_id=job_id, headers=headers, body=body, token=token))
    return _json(reply.status, reply.body)


def route(event: LambdaFunctionUrlEvent) -> tuple[str, Logic] | None:
    """The job id and logic for the event's method and path; None for anything else."""
    if str(event.http_method or "").upper() != "POST":
        return None
    found = match_route(str(event.raw_path or ""))
    if found is None:
        return None
    name, job_id = found
    return job_id, LOGIC[name]


@logger.inject_lambda_context(clear_state=True)
def handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    request = LambdaFunctionUrlEvent(event)
    found = route(request)
    if found is None:
        return _json(404, {"error": "not found"})
    job_id, logic = found
    return _handle(request, job_id, logic)
