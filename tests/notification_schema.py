"""Checks SNS notifications against docs/notification.schema.json (body, Subject, attributes)."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator, FormatChecker
from vap_shared.notifier import subject_line

SCHEMA_PATH = Path(__file__).resolve().parent.parent / "docs" / "notification.schema.json"


@cache
def schema() -> dict[str, Any]:
    return dict(json.loads(SCHEMA_PATH.read_text(encoding="utf-8")))


def _validator(part: str | None = None) -> Draft202012Validator:
    root = schema()
    target = root if part is None else {"$ref": f"#/$defs/{part}", "$defs": root["$defs"]}
    return Draft202012Validator(target, format_checker=FormatChecker())


def problems(body: Any, subject: str | None = None, attributes: dict[str, str] | None = None) -> list[str]:
    found = [f"body: {e.json_path}: {e.message}" for e in _validator().iter_errors(body)]
    if subject is not None:
        found += [f"Subject: {e.message}" for e in _validator("subject").iter_errors(subject)]
        if isinstance(body, dict) and subject != subject_line(
            str(body.get("status")), str(body.get("sidecar_key")), str(body.get("job_id"))
        ):
            found.append(f"Subject {subject!r} does not name the job and status")
    if attributes is not None:
        found += [
            f"attributes: {e.message}" for e in _validator("message_attributes").iter_errors(attributes)
        ]
        if isinstance(body, dict) and attributes.get("status") != body.get("status"):
            found.append("the status attribute differs from the body")
    return found
