"""Plain-words problems reported to users (error.json, notifications, job record)."""

from __future__ import annotations

# pydantic needs typing_extensions.TypedDict on Python < 3.12 (a pydantic dependency anyway).
from typing_extensions import TypedDict


class FieldError(TypedDict):
    field: str | None
    message: str


def field_error(field: str | None, message: str) -> FieldError:
    return {"field": field, "message": message}


class PermanentJobError(Exception):
    """The job cannot succeed as submitted; retrying will not help.

    `kind`: whose problem it is, for the metrics (`input`: the request; `internal`: the service's).
    """

    def __init__(self, errors: list[FieldError], kind: str = "input") -> None:
        super().__init__("; ".join(e["message"] for e in errors))
        self.errors = errors
        self.kind = kind


class TransientJobError(Exception):
    """Something the job needs is not available yet; the SQS message should be retried.

    `errors` describe the problem in case retries run out; `kind` whose problem it is then
    (`input`: media never uploaded; `internal`: backends down, a missing setting).
    """

    def __init__(self, errors: list[FieldError], kind: str = "internal") -> None:
        super().__init__("; ".join(e["message"] for e in errors))
        self.errors = errors
        self.kind = kind
