"""Clients and adapters a function needs, created on first use and then kept for the execution
environment. A route pays only for what it touches: a GPU progress callback never builds the SNS
client, the backends or the fal verifier; ingest builds no JWKS cache."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from .config import Settings
from .http_limits import HTTP_TIMEOUT
from .job_store import JobStore  # every route uses the jobs table (and so boto3): loaded at init
from .naming import GPU_UPLOADS, work_upload_key, work_video_key
from .s3io import presign_get, presign_put

if TYPE_CHECKING:
    import httpx

    from .backends.base import Backend
    from .backends.fal import FalBackend
    from .backends.modal import ModalBackend
    from .cost import Prices
    from .fal_webhook import JwksCache
    from .notifier import Notifier
    from .reuse import ReuseStore
    from .secrets import Secrets

T = TypeVar("T")


def s3_client_config(emulator: bool, max_attempts: int | None = None) -> Any:
    """The S3 client configuration every presigning client uses (the Lambdas and `vap`).

    Presigned URLs name the regional virtual-hosted endpoint `<bucket>.s3.<region>.amazonaws.com`.
    With `signature_version` alone botocore names the legacy global host `<bucket>.s3.amazonaws.com`
    in every region: S3 answers a new bucket there with a 307 for up to a day, and regions opened
    after March 2019 with a 400; the GPU downloader follows no redirects (and a followed redirect
    breaks the signature). Emulators are reached by IP/port, where bucket host names would not
    resolve: path style there.
    """
    from botocore.config import Config

    options: dict[str, Any] = {
        "signature_version": "s3v4",
        "retries": {"mode": "standard"}
        if max_attempts is None
        else {"mode": "standard", "max_attempts": max_attempts},
        "s3": {"addressing_style": "path"}
        if emulator
        else {"addressing_style": "virtual", "us_east_1_regional_endpoint": "regional"},
    }
    return Config(**options)


def s3_client(session: Any, endpoint_url: str | None = None, max_attempts: int | None = None) -> Any:
    """An S3 client of `session` for its region; `endpoint_url` (or `AWS_ENDPOINT_URL`) = an emulator."""
    emulator = bool(endpoint_url or os.environ.get("AWS_ENDPOINT_URL"))
    return session.client(
        "s3",
        region_name=session.region_name,
        endpoint_url=endpoint_url,
        config=s3_client_config(emulator, max_attempts),
    )


class Runtime:
    """Each attribute is built once, under a lock: the local stack runs concurrent invocations as
    threads of one process, and a boto3 session must not create clients from two threads at once."""

    def __init__(
        self,
        settings: Settings,
        *,
        session: Any = None,
        http: httpx.Client | None = None,
        secrets: Secrets | None = None,
    ) -> None:
        self.settings = settings
        self._lock = threading.RLock()
        self._built: dict[str, Any] = {}
        if session is not None:
            self._built["session"] = session
        if http is not None:
            self._built["http"] = http
        if secrets is not None:
            self._built["secrets"] = secrets

    @classmethod
    def build(
        cls,
        settings: Settings,
        *,
        session: Any = None,
        http: httpx.Client | None = None,
        secrets: Secrets | None = None,
    ) -> Runtime:
        """Nothing is created here; clients come on first use (see the properties)."""
        return cls(settings, session=session, http=http, secrets=secrets)

    def _once(self, name: str, make: Callable[[], T]) -> T:
        value: T | None = self._built.get(name)
        if value is None:
            with self._lock:
                value = self._built.get(name)
                if value is None:
                    value = make()
                    self._built[name] = value
        return value

    # ------------------------------------------------------------------ AWS clients
    @property
    def session(self) -> Any:
        def make() -> Any:
            import boto3

            return boto3.session.Session()

        return self._once("session", make)

    @property
    def s3(self) -> Any:
        return self._once("s3", lambda: s3_client(self.session))

    @property
    def sqs(self) -> Any:
        """SQS (the sweeper's dead-letter drain); built on first use."""
        return self._once("sqs", lambda: self.session.client("sqs"))

    @property
    def dynamodb(self) -> Any:
        """The low-level DynamoDB client (thread-safe) the job and reuse stores share."""
        return self._once("dynamodb", lambda: self.session.client("dynamodb"))

    @property
    def store(self) -> JobStore:
        def make() -> JobStore:
            return JobStore(self.dynamodb, self.settings.jobs_table)

        return self._once("store", make)

    @property
    def reuse(self) -> ReuseStore:
        """Result reuse entries (items `reuse#<key>` of the jobs table)."""

        def make() -> ReuseStore:
            from .reuse import ReuseStore

            return ReuseStore(self.dynamodb, self.settings.jobs_table)

        return self._once("reuse", make)

    @property
    def prices(self) -> Prices:
        """The stack's prices for cost estimates (MODAL_PRICE_PER_SECOND_*, FAL_PRICE_PER_VIDEO)."""

        def make() -> Prices:
            from .cost import Prices

            return Prices.from_env()

        return self._once("prices", make)

    @property
    def notifier(self) -> Notifier:
        def make() -> Notifier:
            from .notifier import Notifier

            s3, settings = self.s3, self.settings
            return Notifier(self.session.client("sns"), settings.topic_arn, s3, settings.bucket_name)

        return self._once("notifier", make)

    @property
    def secrets(self) -> Secrets:
        def make() -> Secrets:
            from .secrets import Secrets

            return Secrets.from_client(self.session.client("secretsmanager"))

        return self._once("secrets", make)

    # ------------------------------------------------------------------ HTTP and backends
    @property
    def http(self) -> httpx.Client:
        def make() -> httpx.Client:
            import httpx  # here, not at init: see vap_shared.http_limits

            # httpx logs every request's URL at INFO, and Lambda's JSON logging passes INFO on: a fal
            # submit's URL carries the job's webhook token (vap_shared.fal_token), which must not
            # reach the logs.
            logging.getLogger("httpx").setLevel(logging.WARNING)
            return httpx.Client(timeout=HTTP_TIMEOUT, follow_redirects=False)

        return self._once("http", make)

    @property
    def backends(self) -> dict[str, Backend]:
        return {"modal": self.modal, "fal": self.fal}

    @property
    def modal(self) -> ModalBackend:
        """The Modal client (submit, status, cancel)."""

        def make() -> ModalBackend:
            from .backends.modal import ModalBackend, ModalJobBuilder

            settings = self.settings
            return ModalBackend(
                self.http,
                settings.modal_endpoint_url,
                credentials=lambda: self.secrets.modal_token(settings.modal_token_secret_arn),
                jobs=ModalJobBuilder(
                    stack_secret=self.stack_secret,
                    sign_get=self.sign_get,
                    output_put_url=self.output_put_url,
                    upload_put_url=self.gpu_upload_put_url,
                ),
                allow_http_loopback=settings.allow_http_loopback,
            )

        return self._once("modal", make)

    @property
    def fal(self) -> FalBackend:
        """The fal client (submit, status, result, cancel)."""

        def make() -> FalBackend:
            from .backends.fal import FalBackend
            from .fal_token import fal_webhook_token

            settings = self.settings
            return FalBackend(
                self.http,
                settings.fal_queue_url,
                settings.fal_endpoint_id,
                fal_key=lambda: self.secrets.fal_key(settings.fal_key_secret_arn),
                sign_get=self.sign_get,
                webhook_token=lambda job_id: fal_webhook_token(self.stack_secret(), job_id),
                allow_http_loopback=settings.allow_http_loopback,
            )

        return self._once("fal", make)

    @property
    def jwks(self) -> JwksCache:
        def make() -> JwksCache:
            from .fal_webhook import JwksCache  # PyNaCl: only fal webhooks load it

            return JwksCache.from_url(self.http, self.settings.fal_jwks_url)

        return self._once("jwks", make)

    # ------------------------------------------------------------------ helpers
    def sign_get(self, bucket: str, key: str) -> str:
        return presign_get(self.s3, bucket, key, self.settings.presign_ttl_seconds)

    def output_put_url(self, job_id: str) -> str:
        key = work_video_key(self.settings.work_prefix, job_id)
        return presign_put(self.s3, self.settings.bucket_name, key, self.settings.presign_ttl_seconds)

    def gpu_upload_put_url(self, job_id: str, field: str) -> str:
        """A presigned PUT for one of the GPU's uploads in work/<job_id>/ (`naming.GPU_UPLOADS`)."""
        key = work_upload_key(self.settings.work_prefix, job_id, field)
        return presign_put(
            self.s3, self.settings.bucket_name, key, self.settings.presign_ttl_seconds, GPU_UPLOADS[field][1]
        )

    def stack_secret(self) -> bytes:
        return self.secrets.signing_secret(self.settings.signing_secret_arn)
