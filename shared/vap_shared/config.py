"""Typed settings read once from the Lambda environment (names in docs/contracts.md).

The defaults here (and the contract's, `vap_shared.contract`) are THE defaults: template.yaml repeats
each one as its parameter's `Default` (CloudFormation needs a literal) and
`tests/unit/test_settings_source.py` keeps the two equal. Parsed by `vap_shared.settings_parser`: a
malformed variable raises `SettingsError` naming it and what it allows.
Every time limit comes from the job budget (`vap_shared.budget`), never from a setting of its own.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property

from .budget import (
    DEFAULT_BUDGET_S,
    DEFAULT_FAL_MAX_OUTSTANDING,
    DEFAULT_MODAL_CONTAINERS,
    LOCAL_TIME_SCALE_ENV,
    MAX_BUDGET_S,
    MIN_BUDGET_S,
    Budget,
    BudgetError,
    local_time_scale,
)
from .contract import BACKEND_CHOICES, DEFAULT_BACKEND, DEFAULT_GPUS, GPU_COUNTS, MAX_GPUS, BackendChoice
from .settings_parser import SettingsError, choice, integer, names, require, text

MAX_SQS_DELAY_S = 900  # SQS DelaySeconds cannot be longer
REQUIRED = ("BUCKET_NAME", "JOBS_TABLE", "TOPIC_ARN")
BUDGET_SETTINGS = ("JOB_BUDGET_SECONDS", "MODAL_CONTAINERS", "FAL_MAX_OUTSTANDING", LOCAL_TIME_SCALE_ENV)


def _prefix(env: Mapping[str, str], name: str, default: str) -> str:
    value = text(env, name, default)
    return value if value.endswith("/") else value + "/"


@dataclass(frozen=True)
class Settings:
    bucket_name: str
    jobs_table: str
    topic_arn: str
    inbox_prefix: str = "inbox/"
    outputs_prefix: str = "outputs/"
    work_prefix: str = "work/"
    default_backend: BackendChoice = DEFAULT_BACKEND
    modal_endpoint_url: str = ""
    fal_endpoint_id: str = "fal-ai/video-as-prompt"
    fal_queue_url: str = "https://queue.fal.run"
    fal_jwks_url: str = "https://rest.alpha.fal.ai/.well-known/jwks.json"
    fal_media_hosts: tuple[str, ...] = ("fal.media", "*.fal.media")
    # When set, fal webhooks for any other fal user id are rejected (fal signs all users' alike).
    fal_user_id: str = ""
    allowed_media_hosts: tuple[str, ...] = ("storage.googleapis.com", "fal.media", "*.fal.media")
    webhook_base_url: str = ""
    signing_secret_arn: str = ""
    fal_key_secret_arn: str = ""
    modal_token_secret_arn: str = ""
    # Room for two data: URIs of max_data_uri_bytes each (base64 adds a third).
    max_sidecar_bytes: int = 16 * 1024 * 1024
    max_data_uri_bytes: int = 5 * 1024 * 1024
    max_output_bytes: int = 500 * 1024 * 1024
    max_input_bytes: int = 1024 * 1024 * 1024
    job_ttl_days: int = 30
    # How many SQS receives a job may wait for missing media / a transiently down backend.
    ingest_max_attempts: int = 4
    # The job budget B and the pools it is shared by (vap_shared.budget derives every limit).
    job_budget_seconds: int = DEFAULT_BUDGET_S
    modal_containers: int = DEFAULT_MODAL_CONTAINERS
    fal_max_outstanding: int = DEFAULT_FAL_MAX_OUTSTANDING
    # A job waiting for backend capacity is looked at again after this long (SQS DelaySeconds).
    capacity_recheck_seconds: int = 60
    # The ingest queue itself: a waiting job's message is re-sent there with a delay.
    ingest_queue_url: str = ""
    # Local stack only (VAP_LOCAL_TIME_SCALE): every budget duration multiplied by this.
    local_time_scale: float = 1.0
    # The ingest queue's dead-letter queue, drained by the sweeper (crash-looping sidecars end failed),
    # and how many deliveries a message got before it landed there (the queue's maxReceiveCount).
    ingest_dlq_url: str = ""
    ingest_max_receive_count: int = 5
    # The store queue (webhook, sweeper: where a finished run's result is queued for storing; the
    # store function: where it changes a retried message's visibility) and its maxReceiveCount (the
    # store function's last try fails the job instead of leaving it to the dead-letter queue).
    store_queue_url: str = ""
    store_max_receive_count: int = 5
    allow_http_loopback: bool = False
    # GPUs per job: a sidecar without `gpus` gets default_gpus (never more than max_gpus); a sidecar
    # asking for more than max_gpus is refused (stack parameters DefaultGpus, MaxGpus).
    default_gpus: int = DEFAULT_GPUS
    max_gpus: int = MAX_GPUS

    @property
    def gpus_by_default(self) -> int:
        return min(self.default_gpus, self.max_gpus)

    @cached_property
    def budget(self) -> Budget:
        return Budget(
            job_s=self.job_budget_seconds,
            modal_containers=self.modal_containers,
            fal_max_outstanding=self.fal_max_outstanding,
            time_scale=self.local_time_scale,
        )

    @property
    def presign_ttl_seconds(self) -> int:
        """Lifetime of every presigned media URL the service hands a backend: the budget's."""
        return self.budget.url_ttl_s

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        require(env, REQUIRED)
        defaults = cls(bucket_name="", jobs_table="", topic_arn="")
        fal_hosts = env.get("FAL_MEDIA_HOSTS")
        allowed_hosts = env.get("ALLOWED_MEDIA_HOSTS")
        settings = cls(
            bucket_name=env["BUCKET_NAME"],
            jobs_table=env["JOBS_TABLE"],
            topic_arn=env["TOPIC_ARN"],
            inbox_prefix=_prefix(env, "INBOX_PREFIX", "inbox/"),
            outputs_prefix=_prefix(env, "OUTPUTS_PREFIX", "outputs/"),
            work_prefix=_prefix(env, "WORK_PREFIX", "work/"),
            default_backend=choice(env, "DEFAULT_BACKEND", BACKEND_CHOICES, defaults.default_backend),
            modal_endpoint_url=text(env, "MODAL_ENDPOINT_URL").rstrip("/"),
            fal_endpoint_id=text(env, "FAL_ENDPOINT_ID").strip("/") or defaults.fal_endpoint_id,
            fal_queue_url=text(env, "FAL_QUEUE_URL", defaults.fal_queue_url).rstrip("/"),
            fal_jwks_url=text(env, "FAL_JWKS_URL", defaults.fal_jwks_url),
            fal_media_hosts=names(fal_hosts, lower=True)
            if fal_hosts is not None
            else defaults.fal_media_hosts,
            fal_user_id=text(env, "FAL_USER_ID"),
            allowed_media_hosts=(
                names(allowed_hosts, lower=True)
                if allowed_hosts is not None
                else defaults.allowed_media_hosts
            ),
            webhook_base_url=text(env, "WEBHOOK_BASE_URL").rstrip("/"),
            signing_secret_arn=text(env, "SIGNING_SECRET_ARN"),
            fal_key_secret_arn=text(env, "FAL_KEY_SECRET_ARN"),
            modal_token_secret_arn=text(env, "MODAL_TOKEN_SECRET_ARN"),
            max_sidecar_bytes=integer(env, "MAX_SIDECAR_BYTES", defaults.max_sidecar_bytes),
            max_data_uri_bytes=integer(env, "MAX_DATA_URI_BYTES", defaults.max_data_uri_bytes),
            max_output_bytes=integer(env, "MAX_OUTPUT_BYTES", defaults.max_output_bytes),
            max_input_bytes=integer(env, "MAX_INPUT_BYTES", defaults.max_input_bytes),
            job_ttl_days=integer(env, "JOB_TTL_DAYS", defaults.job_ttl_days),
            ingest_max_attempts=integer(env, "INGEST_MAX_ATTEMPTS", defaults.ingest_max_attempts),
            job_budget_seconds=integer(
                env, "JOB_BUDGET_SECONDS", defaults.job_budget_seconds, MIN_BUDGET_S, MAX_BUDGET_S
            ),
            modal_containers=integer(env, "MODAL_CONTAINERS", defaults.modal_containers),
            fal_max_outstanding=integer(env, "FAL_MAX_OUTSTANDING", defaults.fal_max_outstanding),
            capacity_recheck_seconds=min(
                MAX_SQS_DELAY_S,
                integer(env, "CAPACITY_RECHECK_SECONDS", defaults.capacity_recheck_seconds),
            ),
            ingest_queue_url=text(env, "INGEST_QUEUE_URL"),
            local_time_scale=local_time_scale(env),
            ingest_dlq_url=text(env, "INGEST_DLQ_URL"),
            ingest_max_receive_count=integer(
                env, "INGEST_MAX_RECEIVE_COUNT", defaults.ingest_max_receive_count
            ),
            store_queue_url=text(env, "STORE_QUEUE_URL"),
            store_max_receive_count=integer(env, "STORE_MAX_RECEIVE_COUNT", defaults.store_max_receive_count),
            allow_http_loopback=env.get("VAP_ALLOW_HTTP_LOOPBACK", "") == "1",
            default_gpus=integer(env, "DEFAULT_GPUS", defaults.default_gpus, allowed=GPU_COUNTS),
            max_gpus=integer(env, "MAX_GPUS", defaults.max_gpus, allowed=GPU_COUNTS),
        )
        try:
            settings.budget  # noqa: B018 - validate the budget once, at cold start
        except BudgetError as exc:
            raise SettingsError(f"{', '.join(BUDGET_SETTINGS)} do not make a job budget: {exc}") from None
        return settings


def settings_at_cold_start() -> Settings | None:
    """Read the environment once, at cold start; None where it is absent (tests import first)."""
    try:
        return Settings.from_env()
    except SettingsError:
        return None
