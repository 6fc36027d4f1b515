"""The whole local stack as one object: `with LocalStack() as stack: ...` (tests use it as a fixture).

Pieces: moto in server mode with the stack from `template.yaml` (IAM enforced, deliveries at least
once); the functions in their own execution environments (processes), fed by one SQS poller per
event source of the template, the webhook behind a loopback Function URL; the local GPU server
(the same HTTP API as the Modal app); a local fal-protocol server; an SQS queue subscribed to the
topic so notifications can be read.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import sys
import threading
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
import httpx
from vap_shared import metrics
from vap_shared.budget import DEFAULT_BUDGET_S, LOCAL_TIME_SCALE_ENV, Budget

from local_stack.at_least_once import AtLeastOnce
from local_stack.emulator import ACCOUNT_ID, Deployer, Deployment, layer_dirs
from local_stack.fal_server import FalServer
from local_stack.function_url import FunctionUrlServer
from local_stack.iam import (
    Denial,
    MotoAuthorizationGaps,
    assume_role_as_lambda,
    create_admin,
    set_authorization,
)
from local_stack.lambda_runtime import Isolation, LambdaFunction, scoped_environ, warm_up
from local_stack.moto_server import AwsFault, MotoServer
from local_stack.net import LOOPBACK, free_port
from local_stack.notifications import Notification, NotificationReader
from local_stack.sqs_poller import SqsPoller

log = logging.getLogger("local_stack")

ROOT = Path(__file__).resolve().parent.parent
INGEST = "IngestFunction"
WEBHOOK = "WebhookFunction"
SWEEPER = "SweeperFunction"
STORE = "StoreFunction"


@dataclass
class LocalStackConfig:
    root: Path = ROOT
    template: Path = ROOT / "template.yaml"
    region: str = "us-east-1"
    stack_name: str = "vap-local"
    # Template parameter overrides, e.g. {"DefaultBackend": "fal", "MaxSidecarBytes": "65536"}.
    parameters: dict[str, str] = field(default_factory=dict)
    # Local-only: a shorter ingest-queue visibility timeout so redeliveries happen in seconds.
    visibility_timeout_s: int | None = None
    gpu_engine: str = "tiny"  # "tiny" (real code path, random weights), "fake", or "none"
    gpu_steps: int | None = None
    # Jobs the local GPU server runs at once (like Modal containers; pair with ModalContainers).
    gpu_workers: int = 1
    # Local-only: a job waiting for backend capacity is looked at again after this many seconds
    # (CAPACITY_RECHECK_SECONDS; the deployed default is 60).
    capacity_recheck_s: int | None = 2
    # Local-only: VAP_LOCAL_TIME_SCALE, every job-budget duration multiplied by this (e.g. 0.001
    # turns the 7200 s default into 8 s), for the functions and the in-process GPU server alike.
    time_scale: float | None = None
    state_file: Path | None = None
    # How the functions run: "process" (default; each in execution-environment processes, killed at
    # its Timeout, as Lambda does) or "thread" (in this process, timeouts only logged: for benchmarks
    # that instrument the handlers in-process).
    lambda_isolation: Isolation = "process"
    # Local-only: a shorter Timeout than the template's for some functions (logical id -> seconds),
    # so a test can watch a function be killed without waiting a minute.
    function_timeouts: dict[str, float] = field(default_factory=dict)
    # Pass what the functions print (their log) on to this process's logging (local_stack.function.<id>).
    function_logs: bool = True
    # IAM as on AWS: moto authorizes every request; each function calls AWS (and presigns) with
    # credentials of its own role from the template, the harness with an admin user's.
    iam: bool = True
    # How long a function's role credentials last (the Lambda service's, refreshed per environment).
    role_credentials_ttl_s: int = 12 * 3600
    # At-least-once delivery: this share of S3 event notifications, SQS receives and SNS deliveries
    # to SQS is delivered twice (decided per message from `duplicate_seed`); 0 turns it off entirely.
    duplicate_rate: float = 0.03
    duplicate_seed: int = 0
    # Modal as it is (the local GPU server): this share of `/submit` and `/status` requests is answered
    # with a transient 5xx (half of them after the request took effect), and of runs is preempted once
    # mid-run and run again on a fresh worker (same call id), as Modal does with GPU inputs; both
    # seeded by `gpu_fault_seed`. 0 turns each off.
    gpu_error_rate: float = 0.02
    gpu_preempt_rate: float = 0.05
    gpu_fault_seed: int = 0


class MetricLog:
    """The EMF lines the functions print (Lambda sends them to CloudWatch Logs, which turns them into
    metrics); the newest `limit` are kept. Thread-safe: invocations run concurrently."""

    def __init__(self, limit: int = 100_000) -> None:
        self._lines: deque[str] = deque(maxlen=limit)
        self._lock = threading.Lock()

    def write(self, line: str) -> None:
        with self._lock:
            self._lines.append(line)

    def documents(self) -> list[dict[str, Any]]:
        with self._lock:
            lines = list(self._lines)
        return [json.loads(line) for line in lines]


class LocalStack:
    def __init__(self, config: LocalStackConfig | None = None) -> None:
        self.config = config or LocalStackConfig()
        self.region = self.config.region
        self.deployment: Deployment | None = None
        self.functions: dict[str, LambdaFunction] = {}
        self.pollers: list[SqsPoller] = []
        self.fal: FalServer | None = None
        self.gpu: Any = None
        self.webhook_server: FunctionUrlServer | None = None
        self.notifications: NotificationReader | None = None
        self.duplicates = AtLeastOnce(self.config.duplicate_rate, self.config.duplicate_seed)
        self._moto_gaps = MotoAuthorizationGaps()
        # The harness's credentials (the admin user's once IAM is on).
        self.credentials: dict[str, str] = {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
        }
        self.modal_token = (f"local-key-{secrets.token_hex(8)}", f"local-secret-{secrets.token_hex(16)}")
        self.fal_key = f"local-fal-{secrets.token_hex(16)}"
        self.endpoint_url = ""
        self._moto: MotoServer | None = None
        self._saved_environ: dict[str, str] = {}
        self._saved_path: list[str] = []
        # The functions' metric lines (EMF), collected as their log groups would hold them.
        self.metric_log = MetricLog()

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> LocalStack:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        cfg = self.config
        self._saved_environ = dict(os.environ)
        self._saved_path = list(sys.path)
        # moto's server logs every request at INFO through werkzeug.
        logging.getLogger("werkzeug").setLevel(logging.WARNING)
        port = free_port()
        self._moto = MotoServer(LOOPBACK, port)
        self._moto.start()
        self.endpoint_url = f"http://{LOOPBACK}:{port}"
        # moto's backends are process-global: start from nothing even after an earlier stack.
        self._reset_moto()
        os.environ.pop("AWS_SESSION_TOKEN", None)
        os.environ.update(
            {
                # Dummy credentials until the admin user exists: nothing here may ever reach real AWS.
                **self.credentials,
                "AWS_DEFAULT_REGION": self.region,
                "AWS_REGION": self.region,
                "AWS_ENDPOINT_URL": self.endpoint_url,
            }
        )
        if cfg.duplicate_rate > 0:  # 0: moto's own exactly-once delivery, forcing() included
            self.duplicates.install()
        if cfg.lambda_isolation == "process":
            warm_up()  # the fork server of the execution environments imports its libraries meanwhile
        self.fal = FalServer(self.fal_key, time_scale=cfg.time_scale or 1.0)
        self.fal.start()
        self._start_gpu()

        webhook_port = free_port()
        deployer = Deployer(cfg.root, self.endpoint_url, self.region, cfg.stack_name)
        self.deployment = deployer.deploy(
            cfg.template,
            cfg.parameters,
            function_urls={"WebhookFunctionUrl": f"http://{LOOPBACK}:{webhook_port}/"},
            secret_values={
                "FalKeySecret": self.fal_key,
                "ModalTokenSecret": json.dumps({"key": self.modal_token[0], "secret": self.modal_token[1]}),
            },
        )
        if cfg.iam:
            self._enable_iam()
        if cfg.visibility_timeout_s is not None:
            self._set_visibility_timeout(cfg.visibility_timeout_s)
        self._subscribe_notifications()
        self._load_functions(webhook_port)
        self.webhook_server = FunctionUrlServer(self.functions[WEBHOOK], webhook_port)
        self.webhook_server.start()
        if cfg.lambda_isolation == "thread":
            metrics.set_output(self.metric_log.write)  # handlers in this process: no log to read
        self._start_pollers()
        if cfg.state_file is not None:
            cfg.state_file.parent.mkdir(parents=True, exist_ok=True)
            cfg.state_file.write_text(json.dumps(self.describe(), indent=2) + "\n", encoding="utf-8")

    def stop(self) -> None:
        for poller in self.pollers:
            poller.stop()
        metrics.set_output(None)
        self.pollers.clear()
        for function in self.functions.values():
            function.stop()
        for server in (self.webhook_server, self.notifications, self.fal):
            if server is not None:
                server.stop()
        self.webhook_server = self.notifications = self.fal = None
        if self.gpu is not None:
            self.gpu.stop()
            self.gpu = None
        if self._moto is not None:
            set_authorization(self.endpoint_url, False)
            self._moto_gaps.uninstall()
            self._reset_moto()
            self._moto.stop()
            self._moto = None
        self.duplicates.uninstall()
        if self._saved_environ:
            os.environ.clear()
            os.environ.update(self._saved_environ)
            self._saved_environ = {}
        if self._saved_path:
            sys.path[:] = self._saved_path
        if self.config.state_file is not None and self.config.state_file.exists():
            self.config.state_file.unlink()

    # ------------------------------------------------------------------ pieces
    def _reset_moto(self) -> None:
        try:
            httpx.post(f"{self.endpoint_url}/moto-api/reset", timeout=30)
        except httpx.HTTPError:
            log.warning("could not reset moto's state")

    def _start_gpu(self) -> None:
        if self.config.gpu_engine == "none":
            return
        from gpu.service.local_server import ModalFaults, start_local_gpu_server

        cfg = self.config
        # The GPU side derives its run limits from the same budget as the functions, as the Modal
        # app does (under the stack's time scale too).
        budget = Budget(
            job_s=int(cfg.parameters.get("JobBudgetSeconds", DEFAULT_BUDGET_S)),
            modal_containers=cfg.gpu_workers,
            time_scale=cfg.time_scale or 1.0,
        )
        self.gpu = start_local_gpu_server(
            0,
            self.modal_token[0],
            self.modal_token[1],
            cfg.gpu_engine,  # type: ignore[arg-type]
            steps=cfg.gpu_steps,
            workers=cfg.gpu_workers,
            budget=budget,
            faults=ModalFaults(
                error_rate=cfg.gpu_error_rate, preempt_rate=cfg.gpu_preempt_rate, seed=cfg.gpu_fault_seed
            ),
        )

    def local_environment(self, function_env: Mapping[str, str], webhook_port: int) -> dict[str, str]:
        """The function's template environment with the local endpoints swapped in."""
        assert self.fal is not None
        env = dict(function_env)
        local = {
            "MODAL_ENDPOINT_URL": self.gpu.url.rstrip("/") if self.gpu is not None else "",
            "FAL_QUEUE_URL": self.fal.url,
            "FAL_JWKS_URL": self.fal.jwks_url,
            "FAL_MEDIA_HOSTS": self.fal.media_host,
        }
        for key, value in local.items():
            if key in env:  # only what the template gives this function
                env[key] = value
        if "WEBHOOK_BASE_URL" in env:
            # No TLS locally: the Function URL is plain http on the loopback.
            env["WEBHOOK_BASE_URL"] = env["WEBHOOK_BASE_URL"].replace("https://", "http://", 1)
            assert env["WEBHOOK_BASE_URL"] == f"http://{LOOPBACK}:{webhook_port}", env["WEBHOOK_BASE_URL"]
        env["VAP_ALLOW_HTTP_LOOPBACK"] = "1"
        # Lambda sets the region; the endpoint is the local stack's (every boto3 client follows it).
        env.update(AWS_REGION=self.region, AWS_DEFAULT_REGION=self.region, AWS_ENDPOINT_URL=self.endpoint_url)
        cfg = self.config
        if cfg.capacity_recheck_s is not None and "INGEST_QUEUE_URL" in env:
            env["CAPACITY_RECHECK_SECONDS"] = str(cfg.capacity_recheck_s)
        if cfg.time_scale is not None:
            env[LOCAL_TIME_SCALE_ENV] = str(cfg.time_scale)
        return env

    def _load_functions(self, webhook_port: int) -> None:
        assert self.deployment is not None
        cfg = self.config
        layers = layer_dirs(cfg.root, cfg.template)
        for logical_id, spec in self.deployment.functions.items():
            function = LambdaFunction(
                logical_id=logical_id,
                name=spec.name,
                arn=spec.arn,
                code_dir=spec.code_dir,
                handler=spec.handler,
                timeout_s=cfg.function_timeouts.get(logical_id, spec.timeout_s),
                memory_mb=spec.memory_mb,
                log_group=spec.log_group,
                reserved_concurrency=spec.reserved_concurrency,
                environment=self.local_environment(spec.environment, webhook_port),
                layers=layers,
                isolation=cfg.lambda_isolation,
                credentials=self._role_credentials(logical_id),
            )
            function.log.metrics = self.metric_log.write
            function.log.echo = cfg.function_logs
            self.functions[logical_id] = function

    def _enable_iam(self) -> None:
        """From here on moto authorizes every request; the harness signs as an admin user."""
        self.credentials = create_admin(self.client("iam"))
        os.environ.update(self.credentials)
        self._moto_gaps.install()
        set_authorization(self.endpoint_url, True)

    def role_credentials(self, logical_id: str, session_name: str | None = None) -> dict[str, str]:
        """Fresh credentials of the function's role (what its environments get: the session is named
        after the function, as Lambda names it); the harness's own without IAM."""
        assert self.deployment is not None
        if not self.config.iam:
            return dict(self.credentials)
        spec = self.deployment.functions[logical_id]
        return assume_role_as_lambda(
            ACCOUNT_ID,
            self.region,
            spec.role_arn,
            session_name or spec.name,
            self.config.role_credentials_ttl_s,
        )

    @property
    def denied(self) -> list[Denial]:
        """Every request IAM refused so far (principal, action, resource)."""
        return self._moto_gaps.denied

    def denials_of_functions(self, since: int = 0) -> list[Denial]:
        """Refusals of the template's functions themselves (their role sessions), from `since` on:
        each one is a permission the function's policy lacks for what its code does."""
        names = {spec.name for spec in self.deployment.functions.values()} if self.deployment else set()
        return [d for d in self.denied[since:] if d.principal.rsplit("/", 1)[-1] in names]

    def _role_credentials(self, logical_id: str) -> Callable[[], dict[str, str]]:
        if self.config.lambda_isolation == "thread":
            # One process environment for every function: per-function credentials cannot be kept apart.
            return lambda: dict(self.credentials)
        return lambda: self.role_credentials(logical_id)

    def client_as(self, service: str, credentials: Mapping[str, str]) -> Any:
        """A client signing with these AWS_* credentials (e.g. a function's role's)."""
        return boto3.client(  # type: ignore[call-overload]
            service,
            endpoint_url=self.endpoint_url,
            region_name=self.region,
            aws_access_key_id=credentials["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=credentials["AWS_SECRET_ACCESS_KEY"],
            aws_session_token=credentials.get("AWS_SESSION_TOKEN"),
        )

    def _set_visibility_timeout(self, seconds: int) -> None:
        """Every queue feeding a function gets this visibility timeout (local only)."""
        assert self.deployment is not None
        for source in self.deployment.event_sources:
            url = self._queue_url_of(source.queue_arn)
            policy = self.sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["Policy"])["Attributes"].get(
                "Policy"
            )
            attributes = {"VisibilityTimeout": str(seconds)}
            if policy:
                # moto drops the queue policy on any set_queue_attributes call that omits it.
                attributes["Policy"] = policy
            self.sqs.set_queue_attributes(QueueUrl=url, Attributes=attributes)

    def _queue_url_of(self, queue_arn: str) -> str:
        return str(self.sqs.get_queue_url(QueueName=queue_arn.rsplit(":", 1)[1])["QueueUrl"])

    def _subscribe_notifications(self) -> None:
        url = self.sqs.create_queue(QueueName=f"{self.config.stack_name}-notifications")["QueueUrl"]
        arn = self.sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"][
            "QueueArn"
        ]
        self.client("sns").subscribe(TopicArn=self.topic_arn, Protocol="sqs", Endpoint=arn)
        self.notifications = NotificationReader(self.client("sqs"), url)
        self.notifications.start()

    def _start_pollers(self) -> None:
        assert self.deployment is not None
        for source in self.deployment.event_sources:
            queue_url = self._queue_url_of(source.queue_arn)
            # Lambda polls the queue with the function's execution role.
            poller = SqsPoller(
                self.client_as("sqs", self.role_credentials(source.function_logical_id)),
                queue_url,
                source.queue_arn,
                self.region,
                self.functions[source.function_logical_id],
                batch_size=source.batch_size,
                max_concurrency=source.max_concurrency,
                report_batch_item_failures=source.report_batch_item_failures,
                batching_window_s=source.batching_window_s,
            )
            poller.start()
            self.pollers.append(poller)

    # ------------------------------------------------------------------ accessors
    def client(self, service: str) -> Any:
        """A client of the harness (the admin user once IAM is on)."""
        return self.client_as(service, self.credentials)

    @property
    def sqs(self) -> Any:
        return self.client("sqs")

    @property
    def s3(self) -> Any:
        return self.client("s3")

    def _output(self, key: str) -> str:
        assert self.deployment is not None
        return self.deployment.outputs[key]

    @property
    def bucket(self) -> str:
        return self._output("BucketName")

    @property
    def topic_arn(self) -> str:
        return self._output("TopicArn")

    @property
    def jobs_table(self) -> str:
        return self._output("JobsTable")

    @property
    def webhook_url(self) -> str:
        return self._output("WebhookUrl")

    def _queue_url(self, output_key: str) -> str:
        # moto's stack outputs show AWS-shaped queue URLs; ask for the emulator's own form.
        name = self._output(output_key).rsplit("/", 1)[1]
        return str(self.sqs.get_queue_url(QueueName=name)["QueueUrl"])

    @property
    def ingest_queue_url(self) -> str:
        return self._queue_url("IngestQueueUrl")

    @property
    def dlq_url(self) -> str:
        return self._queue_url("IngestDeadLetterQueueUrl")

    @property
    def ingest_poller(self) -> SqsPoller:
        return self.poller_for(INGEST)

    def poller_for(self, function_logical_id: str) -> SqsPoller:
        """The event source mapping feeding that function (every SQS event of the template has one)."""
        return next(p for p in self.pollers if p.function.logical_id == function_logical_id)

    def describe(self) -> dict[str, Any]:
        """What `.local/stack.json` holds."""
        assert self.deployment is not None and self.fal is not None and self.notifications is not None
        return {
            "endpoint_url": self.endpoint_url,
            "region": self.region,
            "stack_name": self.config.stack_name,
            "bucket": self.bucket,
            "inbox_prefix": "inbox/",
            "outputs_prefix": "outputs/",
            "topic_arn": self.topic_arn,
            "webhook_url": self.webhook_url,
            "jobs_table": self.jobs_table,
            "ingest_queue_url": self.ingest_queue_url,
            "dead_letter_queue_url": self.dlq_url,
            "notifications_queue_url": self.notifications.queue_url,
            "gpu_url": self.gpu.url if self.gpu is not None else None,
            "fal_url": self.fal.url,
            "aws_access_key_id": self.credentials["AWS_ACCESS_KEY_ID"],
            "aws_secret_access_key": self.credentials["AWS_SECRET_ACCESS_KEY"],
        }

    # ------------------------------------------------------------------ helpers for tests and the demo
    @contextmanager
    def environment(self, **values: str) -> Iterator[None]:
        """Run with some function environment variables changed (e.g. a dead MODAL_ENDPOINT_URL for
        fault tests), for every function: invocations from here on land in new execution
        environments that have them (like a configuration update); afterwards in environments with
        the template's again."""
        saved = {logical_id: function.overrides for logical_id, function in self.functions.items()}
        try:
            for logical_id, function in self.functions.items():
                function.set_overrides({**saved[logical_id], **values})
            with scoped_environ(values) if self.config.lambda_isolation == "thread" else nullcontext():
                yield
        finally:
            for logical_id, function in self.functions.items():
                function.set_overrides(saved[logical_id])

    @contextmanager
    def aws_fault(self, fault: AwsFault) -> Iterator[AwsFault]:
        """AWS answers requests matching `fault` with its error while the block runs (at the API:
        every client, the functions' too, sees it as it would see AWS's, retries included)."""
        assert self._moto is not None
        with self._moto.fault(fault) as injected:
            yield injected

    def put_job(
        self, sidecar_key: str, sidecar: dict[str, Any] | bytes, media: Mapping[str, bytes] | None = None
    ) -> str:
        """Upload `media` (key → bytes) first, then the sidecar (which triggers ingest); its ETag."""
        s3 = self.s3
        for key, data in (media or {}).items():
            content_type = (
                "video/mp4" if key.endswith(".mp4") else "image/png" if key.endswith(".png") else "image/jpeg"
            )
            s3.put_object(Bucket=self.bucket, Key=key, Body=data, ContentType=content_type)
        body = sidecar if isinstance(sidecar, bytes) else json.dumps(sidecar).encode("utf-8")
        return str(
            s3.put_object(Bucket=self.bucket, Key=sidecar_key, Body=body, ContentType="application/json")[
                "ETag"
            ]
        )

    def run_sweeper(self, time_scale: float | None = None) -> dict[str, Any]:
        """Invoke the sweeper now, as its EventBridge schedule would (the schedule itself does not
        run locally); returns its report `{"counts": ..., "jobs": {job_id: outcome}}`. Deadlines
        follow the job budget; `time_scale` runs this one sweep with every budget duration
        multiplied by it (local only, `VAP_LOCAL_TIME_SCALE`): e.g. 0.0003 makes a job overdue one
        second after its dispatch and stops a still-running one after four."""
        if time_scale is not None:
            # Only the sweeper, in environments of its own that have the scale.
            with self.functions[SWEEPER].overridden(**{LOCAL_TIME_SCALE_ENV: str(time_scale)}):
                return self.run_sweeper()
        event = {
            "version": "0",
            "id": secrets.token_hex(8),
            "detail-type": "Scheduled Event",
            "source": "aws.events",
            "account": "123456789012",
            "region": self.region,
            "resources": [],
            "detail": {},
        }
        return dict(self.functions[SWEEPER].invoke(event))

    def queue_depth(self, queue_url: str) -> int:
        attrs = self.sqs.get_queue_attributes(
            QueueUrl=queue_url,
            AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
        )["Attributes"]
        return int(attrs["ApproximateNumberOfMessages"]) + int(attrs["ApproximateNumberOfMessagesNotVisible"])

    def wait_for_notification(
        self, sidecar_key: str, count: int = 1, timeout_s: float = 180.0
    ) -> list[Notification]:
        assert self.notifications is not None
        return self.notifications.wait_for(
            lambda n: n.body.get("sidecar_key") == sidecar_key, count, timeout_s
        )

    def notifications_for(self, sidecar_key: str) -> list[Notification]:
        assert self.notifications is not None
        return self.notifications.matching(lambda n: n.body.get("sidecar_key") == sidecar_key)
