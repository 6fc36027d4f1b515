"""Secrets Manager values the functions need, cached in-process (Powertools parameters)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

SECRET_MAX_AGE = 300  # seconds; a rotated secret is picked up within five minutes


class SecretError(Exception):
    """A secret is not configured or not in the expected shape (message never holds the value)."""


class Secrets:
    def __init__(self, fetch: Callable[[str], Any]) -> None:
        self._fetch = fetch

    @classmethod
    def from_client(cls, client: Any) -> Secrets:
        from aws_lambda_powertools.utilities.parameters import SecretsProvider

        provider = SecretsProvider(boto3_client=client)
        return cls(lambda name: provider.get(name, max_age=SECRET_MAX_AGE))

    def _string(self, arn: str, what: str) -> str:
        if not arn:
            raise SecretError(f"the {what} secret is not configured")
        value = self._fetch(arn)
        if isinstance(value, bytes):
            value = value.decode("utf-8")
        if not isinstance(value, str) or not value.strip():
            raise SecretError(f"the {what} secret is empty")
        return value.strip()

    def signing_secret(self, arn: str) -> bytes:
        return self._string(arn, "webhook signing").encode("utf-8")

    def fal_key(self, arn: str) -> str:
        value = self._string(arn, "fal key")
        # Accept a plain key or {"key": "..."} / {"FAL_KEY": "..."}.
        if value.startswith("{"):
            try:
                data = json.loads(value)
            except ValueError:
                raise SecretError("the fal key secret is not valid JSON") from None
            value = str(data.get("key") or data.get("FAL_KEY") or "")
            if not value:
                raise SecretError("the fal key secret has no 'key'")
        return value

    def modal_token(self, arn: str) -> tuple[str, str]:
        value = self._string(arn, "Modal token")
        try:
            data = json.loads(value)
            key, secret = str(data["key"]), str(data["secret"])
        except (ValueError, KeyError, TypeError):
            raise SecretError('the Modal token secret must be JSON {"key": ..., "secret": ...}') from None
        if not key or not secret:
            raise SecretError("the Modal token secret has an empty key or secret")
        return key, secret
