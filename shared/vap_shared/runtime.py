"""Clients and adapters a function needs, built once per execution environment (cold start)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import httpx

from .backends.base import Backend
from .backends.fal import FalBackend
from .backends.modal import ModalBackend
from .config import Settings
from .fal_webhook import JwksCache
from .job_store import JobStore
from .naming import work_video_key
from .notifier import Notifier
from .s3io import presign_get, presign_put
from .secrets import Secrets

HTTP_TIMEOUT = httpx.Timeout(30.0, connect=3.0, pool=3.0)


@dataclass
class Runtime:
    settings: Settings
    s3: Any
    store: JobStore
    notifier: Notifier
    http: httpx.Client
    secrets: Secrets
    backends: dict[str, Backend] = field(default_factory=dict)
    _jwks: JwksCache | None = None

    @property
    def jwks(self) -> JwksCache:
        if self._jwks is None:
            self._jwks = JwksCache.from_url(self.http, self.settings.fal_jwks_url)
        return self._jwks

    def sign_get(self, bucket: str, key: str) -> str:
        return presign_get(self.s3, bucket, key, self.settings.presign_ttl_seconds)

    def output_put_url(self, job_id: str) -> str:
        key = work_video_key(self.settings.work_prefix, job_id)
        return presign_put(self.s3, self.settings.bucket_name, key, self.settings.presign_ttl_seconds)

    def stack_secret(self) -> bytes:
        return self.secrets.signing_secret(self.settings.signing_secret_arn)

    @classmethod
    def build(
        cls,
        settings: Settings,
        *,
        session: Any = None,
        http: httpx.Client | None = None,
        secrets: Secrets | None = None,
    ) -> Runtime:
        import boto3
        from botocore.config import Config

        session = session or boto3.session.Session()
        s3_options: dict[str, Any] = {"signature_version": "s3v4", "retries": {"mode": "standard"}}
        if os.environ.get("AWS_ENDPOINT_URL"):
            # Emulators are reached by IP/port: virtual-hosted bucket names would not resolve.
            s3_options["s3"] = {"addressing_style": "path"}
        s3 = session.client("s3", config=Config(**s3_options))
        dynamodb = session.client("dynamodb")
        sns = session.client("sns")
        http = http or httpx.Client(timeout=HTTP_TIMEOUT, follow_redirects=False)
        secrets = secrets or Secrets.from_client(session.client("secretsmanager"))
        runtime = cls(
            settings=settings,
            s3=s3,
            store=JobStore(dynamodb, settings.jobs_table),
            notifier=Notifier(sns, settings.topic_arn, s3, settings.bucket_name),
            http=http,
            secrets=secrets,
        )
        runtime.backends = {
            "modal": ModalBackend(
                http,
                settings.modal_endpoint_url,
                credentials=lambda: secrets.modal_token(settings.modal_token_secret_arn),
                stack_secret=runtime.stack_secret,
                sign_get=runtime.sign_get,
                output_put_url=runtime.output_put_url,
                allow_http_loopback=settings.allow_http_loopback,
            ),
            "fal": FalBackend(
                http,
                settings.fal_queue_url,
                settings.fal_endpoint_id,
                fal_key=lambda: secrets.fal_key(settings.fal_key_secret_arn),
                sign_get=runtime.sign_get,
                allow_http_loopback=settings.allow_http_loopback,
            ),
        }
        return runtime
