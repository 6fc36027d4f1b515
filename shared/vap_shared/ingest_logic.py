"""Ingest: one S3 "sidecar created" event → validated, dispatched job (or a clear failure).

Raises `TransientJobError` when the SQS message should be retried (media not uploaded yet, both
backends down); permanent problems end the job as failed and return normally, so SQS drops the
message instead of retrying it into the DLQ.

Backpressure: a job is dispatched only while the jobs outstanding at its backend are below what the
job budget allows there (`Budget.capacity`). Otherwise it stays `received` (status.json `queued`),
its message is sent again to the ingest queue with a delay, and the delivery in hand is consumed:
waiting is never an attempt (the new message starts at receive count 1). An `auto` job waits for
Modal rather than going to fal because Modal is busy: fal is the fallback for Modal *failing*,
and a full pool is the normal state of a burst (fal would cost more and take every burst).
Duplicates are harmless: the job id comes from the event, the dispatch lease lets one delivery
dispatch, and a waiting duplicate finds the job dispatched and ends.

Result reuse: a job whose media bytes, settings and explicit seed equal an earlier succeeded job's
is answered with a copy of that job's result (no backend call, no capacity taken); see
`vap_shared.reuse`. The check runs after the media are validated, before anything is dispatched.
"""

from __future__ import annotations

import json
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from secrets import randbelow
from typing import Any, Literal, cast
from urllib.parse import unquote_plus

from aws_lambda_powertools import Logger
from botocore.exceptions import ClientError

from . import metrics, reuse
from .backends.base import SUBMIT_TIMEOUT, Backend, Dispatch, DispatchRequest
from .backends.dispatch import DispatchFailed, dispatch
from .backends.modal import SUBMIT_ATTEMPTS
from .errors import FieldError, PermanentJobError, TransientJobError, field_error
from .gpu_contract import GenerationSettings
from .gpu_urls import service_url_fields
from .job_store import JobStore
from .jobs import Job, iso, parse_iso, utcnow
from .lifecycle import aws_only_cost, fail_job, finalize_terminal, request_from_job, succeed_job
from .media import MediaRef, data_extension, resolve_reference, sniff
from .naming import job_id as make_job_id
from .naming import output_prefix, parse_event_time, sidecar_name, work_input_key
from .notifier import OUTPUT_URL_TTL
from .runtime import Runtime
from .s3io import head, presign_get, read_limited
from .sidecar import SEED_MAX, Sidecar, SidecarInvalid, decode_json_object, validate_object
from .status_object import write_status

logger = Logger(child=True)

# Longer than a dispatch can take (two backend submits with tight timeouts), shorter than the
# queue's visibility timeout, so a crashed attempt's redelivery can take over.
DISPATCH_LEASE_SECONDS = 120
MEDIA_FIELDS = ("video_url", "image_url")
# A place taken at a backend counts from the admission record until the job shows in the index:
# longer than a dispatch (its lease) plus the index's lag.
ADMISSION_HOLD_SECONDS = DISPATCH_LEASE_SECONDS + 60

TimeLeft = Callable[[], float]  # seconds left in this invocation
# The longest a dispatch takes once the media are hashed: Modal's submit (tried twice) and then
# fal's, each up to its connect + read timeout, plus a few seconds of DynamoDB/S3. Hashing for
# reuse stops while this much of the invocation is left (the job then simply runs).
DISPATCH_RESERVE_S = (SUBMIT_ATTEMPTS + 1) * ((SUBMIT_TIMEOUT.connect or 0) + (SUBMIT_TIMEOUT.read or 0)) + 5


class BackendBusy(Exception):
    """The backend has no room for the job now (not a failure: the job waits its turn)."""

    def __init__(self, backend: str) -> None:
        super().__init__(f"{backend} is at capacity")
        self.backend = backend


class JobWaiting(Exception):
    """Raised by `handle_event` for a job that waits for capacity (its lease is released)."""

    def __init__(self, job_id: str, backend: str) -> None:
        super().__init__(f"job {job_id} waits for {backend}")
        self.job_id = job_id
        self.backend = backend


class AdmittedBackend:
    """A backend whose submit first takes one of the `capacity` places ingest may use there."""

    def __init__(self, inner: Backend, store: JobStore, capacity: int) -> None:
        self._inner = inner
        self._store = store
        self._capacity = capacity
        self.name: Literal["modal", "fal"] = inner.name

    def submit(self, request: DispatchRequest) -> Dispatch:
        now = int(time.time())
        if not self._store.admit(self.name, request.job_id, self._capacity, now, ADMISSION_HOLD_SECONDS):
            raise BackendBusy(self.name)
        try:
            return self._inner.submit(request)
        except Exception:
            self._store.release_admission(self.name, request.job_id)  # the place was never used
            raise


@dataclass(frozen=True)
class S3ObjectEvent:
    bucket: str
    key: str
    etag: str
    sequencer: str | None
    event_time: datetime
    event_name: str
    size: int | None


def parse_sqs_body(body: str) -> list[S3ObjectEvent]:
    """S3 notification records in an SQS message body (real S3 or moto shape). Test events and
    non-S3 messages give an empty list."""
    try:
        message = json.loads(body)
    except ValueError:
        logger.warning("skipping an SQS message that is not JSON")
        return []
    if not isinstance(message, dict):
        return []
    if message.get("Event") == "s3:TestEvent":
        logger.info("skipping s3:TestEvent")
        return []
    # An SNS envelope (if someone routes S3 → SNS → SQS without raw delivery).
    if message.get("Type") == "Notification" and isinstance(message.get("Message"), str):
        return parse_sqs_body(message["Message"])
    events: list[S3ObjectEvent] = []
    for record in message.get("Records") or []:
        if not isinstance(record, dict) or record.get("eventSource") != "aws:s3":
            continue
        name = str(record.get("eventName", ""))
        if not name.startswith("ObjectCreated"):
            continue
        s3 = record.get("s3") or {}
        obj = s3.get("object") or {}
        bucket = (s3.get("bucket") or {}).get("name")
        key = obj.get("key")
        if not bucket or not key:
            continue
        size = obj.get("size")
        events.append(
            S3ObjectEvent(
                bucket=str(bucket),
                # Keys are URL-encoded ('+' for space; moto also encodes '/').
                key=unquote_plus(str(key)),
                etag=str(obj.get("eTag") or obj.get("etag") or "").strip('"'),
                sequencer=obj.get("sequencer"),
                event_time=parse_event_time(record.get("eventTime")),
                event_name=name,
                size=int(size) if isinstance(size, int) else None,
            )
        )
    return events


class Ingestor:
    def __init__(self, rt: Runtime, sqs: Any = None) -> None:
        self.rt = rt
        self.settings = rt.settings
        self._sqs = sqs
        self._lock = threading.Lock()

    @property
    def sqs(self) -> Any:
        """SQS client for re-queueing waiting jobs, built on first use (concurrent threads locally)."""
        if self._sqs is None:
            with self._lock:
                if self._sqs is None:
                    self._sqs = self.rt.session.client("sqs")
        return self._sqs

    def handle_message(
        self, body: str, receive_count: int = 1, time_left_s: TimeLeft | None = None
    ) -> list[str]:
        """Process every S3 record in one SQS message; returns the job ids touched. A message with
        a job waiting for capacity is sent again with a delay (then this delivery may be deleted).
        `time_left_s`: the invocation's remaining time (bounds hashing media for reuse)."""
        touched: list[str] = []
        waiting: list[JobWaiting] = []
        for event in parse_sqs_body(body):
            try:
                jid = self.handle_event(event, receive_count, time_left_s)
            except JobWaiting as exc:
                waiting.append(exc)
                touched.append(exc.job_id)
                continue
            if jid:
                touched.append(jid)
        if waiting:
            self._requeue(body, waiting)
        return touched

    def _requeue(self, body: str, waiting: list[JobWaiting]) -> None:
        s = self.settings
        if not s.ingest_queue_url:
            raise TransientJobError([field_error(None, "The service has no INGEST_QUEUE_URL configured.")])
        delay = s.capacity_recheck_seconds
        # Jitter: a burst's waiting jobs do not all look again at the same moment.
        delay = random.randint(max(1, delay // 2), delay) if delay > 1 else delay
        self.sqs.send_message(QueueUrl=s.ingest_queue_url, MessageBody=body, DelaySeconds=delay)
        logger.info(
            "waiting for backend capacity",
            extra={
                "job_ids": [w.job_id for w in waiting],
                "backends": sorted({w.backend for w in waiting}),
                "recheck_s": delay,
            },
        )

    def handle_event(
        self, event: S3ObjectEvent, receive_count: int = 1, time_left_s: TimeLeft | None = None
    ) -> str | None:
        s = self.settings
        if event.bucket != s.bucket_name:
            logger.warning("skipping an event for another bucket", extra={"bucket": event.bucket})
            return None
        if not event.key.startswith(s.inbox_prefix) or not event.key.endswith(".json"):
            logger.info("skipping a key outside inbox/*.json", extra={"key": event.key})
            return None
        jid = make_job_id(event.event_time, event.bucket, event.key, event.etag, event.sequencer)
        job = self.get_or_create(jid, event)
        if job.terminal:
            finalize_terminal(self.rt, job)  # a crash may have skipped the report/notification
            return jid
        if job.state != "received":
            logger.info("duplicate event for a dispatched job", extra={"job_id": jid, "state": job.state})
            return jid
        if not self.rt.store.acquire_dispatch_lease(jid, int(time.time()), DISPATCH_LEASE_SECONDS):
            logger.info("another invocation is dispatching this job", extra={"job_id": jid})
            return jid
        try:
            self._process(job, event, receive_count, time_left_s)
        except BackendBusy as exc:
            self.rt.store.release_dispatch_lease(jid)
            raise JobWaiting(jid, exc.backend) from None
        except PermanentJobError as exc:
            fail_job(self.rt, jid, exc.errors, kind=_kind(exc.kind))
        except TransientJobError as exc:
            if receive_count >= s.ingest_max_attempts:
                gave_up = field_error(None, f"Gave up after {receive_count} attempts.")
                fail_job(self.rt, jid, [*exc.errors, gave_up], kind=_kind(exc.kind))
                return jid
            self.rt.store.release_dispatch_lease(jid)
            raise
        except Exception:
            self.rt.store.release_dispatch_lease(jid)
            raise
        return jid

    def get_or_create(self, jid: str, event: S3ObjectEvent) -> Job:
        """The job's record, created as `received` (with its first status.json) if missing; the
        sweeper's dead-letter drain creates records the same way."""
        existing = self.rt.store.get(jid)
        if existing is not None:
            return existing
        s = self.settings
        name = sidecar_name(event.key, s.inbox_prefix)
        now = utcnow()
        job = Job(
            job_id=jid,
            state="received",
            sidecar_bucket=event.bucket,
            sidecar_key=event.key,
            sidecar_etag=event.etag,
            name=name,
            output_prefix=output_prefix(s.outputs_prefix, name, jid),
            received_at=iso(now),
            updated_at=iso(now),
            expires_at=int((now + timedelta(days=s.job_ttl_days)).timestamp()),
        )
        if self.rt.store.create(job):
            logger.info("job received", extra={"job_id": jid, "key": event.key})
            metrics.job_received(jid)
            write_status(self.rt.s3, s.bucket_name, job)
            return job
        again = self.rt.store.get(jid)
        return again if again is not None else job

    def _read_sidecar(self, event: S3ObjectEvent) -> bytes:
        s = self.settings
        if event.size is not None and event.size > s.max_sidecar_bytes:
            raise PermanentJobError(
                [
                    field_error(
                        None,
                        f"The sidecar is {event.size:,} bytes; "
                        f"at most {s.max_sidecar_bytes:,} bytes are allowed.",
                    )
                ]
            )
        raw = read_limited(self.rt.s3, event.bucket, event.key, s.max_sidecar_bytes, event.etag or None)
        if raw is None:
            raise PermanentJobError(
                [field_error(None, "The sidecar was deleted or replaced before it could be read.")]
            )
        return raw

    def _validate(self, raw: bytes, event: S3ObjectEvent) -> tuple[Sidecar, dict[str, MediaRef]]:
        """Every problem at once: sidecar fields and media references."""
        s = self.settings
        try:
            data = decode_json_object(raw, s.max_sidecar_bytes)
        except SidecarInvalid as exc:
            raise PermanentJobError(exc.errors) from None
        errors: list[FieldError] = []
        sidecar: Sidecar | None = None
        try:
            sidecar = validate_object(data)
        except SidecarInvalid as exc:
            errors.extend(exc.errors)
        bad_fields = {e["field"] for e in errors}
        refs: dict[str, MediaRef] = {}
        for field in MEDIA_FIELDS:
            value = data.get(field)
            if field in bad_fields or not isinstance(value, str):
                continue
            resolved = resolve_reference(
                field,
                value.strip(),
                sidecar_key=event.key,
                bucket=s.bucket_name,
                allowed_hosts=s.allowed_media_hosts,
                max_data_bytes=s.max_data_uri_bytes,
                inbox_prefix=s.inbox_prefix,
            )
            if isinstance(resolved, MediaRef):
                refs[field] = resolved
            else:
                errors.append(resolved)
        if sidecar is not None and sidecar.gpus is not None and sidecar.gpus > s.max_gpus:
            errors.append(
                field_error(
                    "gpus",
                    f"`gpus` is {sidecar.gpus}, but this stack runs a job on at most {s.max_gpus} GPU"
                    f"{'s' if s.max_gpus > 1 else ''} (its MaxGpus setting); use {s.max_gpus} or fewer.",
                )
            )
        if errors or sidecar is None:
            raise PermanentJobError(errors)
        return sidecar, refs

    def _check_media(self, refs: dict[str, MediaRef]) -> dict[str, str]:
        """Every S3 medium exists, is not empty or too big, and looks like its kind; their ETags
        (so the reuse hash reads exactly the objects checked here)."""
        s = self.settings
        permanent: list[FieldError] = []
        missing: list[FieldError] = []
        etags: dict[str, str] = {}
        for field, ref in refs.items():
            if ref.kind != "s3" or not ref.bucket or not ref.key:
                continue
            try:
                meta = head(self.rt.s3, ref.bucket, ref.key)
            except ClientError as exc:
                code = exc.response.get("Error", {}).get("Code", "")
                if code not in ("403", "AccessDenied", "Forbidden"):
                    raise
                permanent.append(field_error(field, f"`{field}`: the object {ref.key} cannot be read."))
                continue
            if meta is None:
                missing.append(
                    field_error(
                        field,
                        f"`{field}`: the object s3://{ref.bucket}/{ref.key} does not exist; upload the media "
                        "before the sidecar (or check the name).",
                    )
                )
                continue
            size = int(meta.get("ContentLength", 0))
            if meta.get("ETag"):
                etags[field] = str(meta["ETag"])
            problem = sniff(field, self._first_bytes(ref.bucket, ref.key)) if size else None
            if problem:
                permanent.append(field_error(field, problem.replace("the file", f"the object {ref.key}")))
            elif size == 0:
                permanent.append(field_error(field, f"`{field}`: the object {ref.key} is empty (0 bytes)."))
            elif size > s.max_input_bytes:
                permanent.append(
                    field_error(
                        field,
                        f"`{field}`: the object {ref.key} is {size:,} bytes; at most {s.max_input_bytes:,} "
                        "bytes are allowed.",
                    )
                )
        if permanent:
            raise PermanentJobError(permanent + missing)
        if missing:
            raise TransientJobError(missing, kind="input")  # never uploaded: the submitter's problem
        return etags

    def _first_bytes(self, bucket: str, key: str) -> bytes:
        response = self.rt.s3.get_object(Bucket=bucket, Key=key, Range="bytes=0-63")
        return bytes(response["Body"].read())

    def _store_data_media(self, jid: str, refs: dict[str, MediaRef]) -> dict[str, MediaRef]:
        s = self.settings
        stored = dict(refs)
        for field, ref in refs.items():
            if ref.kind != "data" or ref.data is None:
                continue
            key = work_input_key(s.work_prefix, jid, field, data_extension(ref.content_type))
            self.rt.s3.put_object(
                Bucket=s.bucket_name,
                Key=key,
                Body=ref.data,
                ContentType=ref.content_type or "application/octet-stream",
            )
            stored[field] = ref.with_location(s.bucket_name, key)
        return stored

    def _process(
        self, job: Job, event: S3ObjectEvent, receive_count: int, time_left_s: TimeLeft | None = None
    ) -> None:
        s = self.settings
        if job.inputs and job.settings and job.requested_backend and job.webhook_base_url:
            # Validated on an earlier delivery (it waited for capacity): dispatch what was recorded,
            # unless an equal job finished meanwhile (bursts of equal jobs are what reuse is for).
            recorded = GenerationSettings.model_validate(job.settings)
            if job.reuse_key and self._answer_from_earlier(
                job, job.reuse_key, recorded, job.requested_backend, job.gpus or 1
            ):
                return
            self._dispatch(job, request_from_job(job), job.requested_backend, receive_count)
            return
        raw = self._read_sidecar(event)
        sidecar, refs = self._validate(raw, event)
        etags = self._check_media(refs)
        choice = sidecar.backend or s.default_backend
        gpus = sidecar.gpus or s.gpus_by_default
        settings = sidecar.settings()
        # Before data: media are stored and before a seed is drawn or a backend's place is taken.
        reuse_key = self._reuse_key(job, sidecar.reuse is not False, settings, refs, etags, time_left_s)
        if reuse_key is not None and self._answer_from_earlier(job, reuse_key, settings, choice, gpus):
            return
        refs = self._store_data_media(job.job_id, refs)
        if settings.seed is None:
            # The seed used is always reported, and fal's output has none: draw it here (or reuse an
            # earlier attempt's) and send it to whichever backend runs the job.
            seed = job.seed if job.seed is not None else randbelow(SEED_MAX + 1)
            settings = settings.model_copy(update={"seed": seed})
        inputs: dict[str, dict[str, Any]] = {f: r.to_record() for f, r in refs.items()}
        # Recorded before dispatch: the webhook needs them if the callback overtakes our write.
        self.rt.store.update_fields(
            job.job_id,
            {
                "requested_backend": choice,
                "settings": settings.model_dump(),
                "inputs": inputs,
                "webhook_base_url": s.webhook_base_url,
                "seed": settings.seed,
                "service_urls": list(service_url_fields(refs["video_url"], refs["image_url"], previews=True)),
                "gpus": gpus,
                "reuse_key": reuse_key,
            },
            iso(utcnow()),
            only_if_absent="backend_call_id",
        )
        request = DispatchRequest(
            job_id=job.job_id,
            settings=settings,
            video=refs["video_url"],
            image=refs["image_url"],
            webhook_base_url=s.webhook_base_url,
            gpus=gpus,
        )
        if not s.webhook_base_url:
            raise TransientJobError([field_error(None, "The service has no WEBHOOK_BASE_URL configured.")])
        self._dispatch(job, request, choice, receive_count)

    def _admitted_backends(self) -> dict[str, Backend]:
        budget, store = self.settings.budget, self.rt.store
        return {
            name: AdmittedBackend(backend, store, budget.capacity(backend.name))
            for name, backend in self.rt.backends.items()
        }

    def _dispatch(self, job: Job, request: DispatchRequest, choice: str, receive_count: int) -> None:
        """Submit within the backends' capacity (`BackendBusy` when the first one tried is full)
        and record the dispatch."""
        request = replace(request, deadline_unix=self.settings.budget.deadline_unix(time.time()))
        try:
            outcome = dispatch(request, choice, self._admitted_backends())
        except DispatchFailed as exc:
            if exc.retryable:
                raise TransientJobError(exc.errors) from None
            # A 422 is the request's fault; anything else (credentials refused) is the service's.
            raise PermanentJobError(exc.errors, kind="input" if exc.rejected else "internal") from None
        d = outcome.dispatch
        fields = {
            "backend": d.backend,
            "backend_call_id": d.call_id,
            "fal_urls": d.urls or None,
            "fallback_from": outcome.fallback_from,
            "fallback_reason": outcome.fallback_reason,
            "dispatched_at": iso(utcnow()),
            "dispatch_lease_until": None,
        }
        updated = self.rt.store.transition(
            job.job_id, "dispatched", fields, iso(utcnow()), sources=("received",)
        )
        if updated is None:
            # A callback already moved the job on (running/terminal): keep its state, add our fields.
            self.rt.store.update_fields(job.job_id, fields, iso(utcnow()), only_if_absent="backend_call_id")
        else:
            write_status(self.rt.s3, self.settings.bucket_name, updated)
        if outcome.fallback_from:
            metrics.fallback(outcome.fallback_from, job.job_id)
        metrics.job_dispatched(d.backend, _seconds_since(job.received_at), job.job_id)
        logger.info(
            "job dispatched",
            extra={
                "job_id": job.job_id,
                "backend": d.backend,
                "call_id": d.call_id,
                "fallback_from": outcome.fallback_from,
                "receive_count": receive_count,
            },
        )

    # ------------------------------------------------------------------ result reuse
    def _reuse_key(
        self,
        job: Job,
        requested: bool,
        settings: GenerationSettings,
        refs: dict[str, MediaRef],
        etags: dict[str, str],
        time_left_s: TimeLeft | None,
    ) -> str | None:
        """The job's reuse key, or None (no explicit seed, `reuse: false`, https media, media too big
        to hash in time: the job simply runs)."""
        try:
            return reuse.key_for_job(
                self.rt.s3,
                settings.model_dump(),
                refs,
                explicit_seed=settings.seed is not None,
                reuse_requested=requested,
                etags=etags,
                time_left_s=time_left_s,
                reserve_s=DISPATCH_RESERVE_S,
            )
        except reuse.NotReusable as exc:
            logger.info("result reuse not possible", extra={"job_id": job.job_id, "reason": str(exc)})
        except ClientError:
            # Reuse only saves a run: a read that fails here must not fail (or delay) the job.
            logger.warning("could not hash the media for reuse", extra={"job_id": job.job_id}, exc_info=True)
        return None

    def _answer_from_earlier(
        self, job: Job, key: str, settings: GenerationSettings, choice: str, gpus: int
    ) -> bool:
        """Copy an equal earlier job's result into this job's folder and end it succeeded (no
        backend call); False when there is none (or its output was deleted: the entry goes stale)."""
        s = self.settings
        target = reuse.Target(job.job_id, job.name, job.sidecar_bucket, job.sidecar_key, job.output_prefix)
        output_key = target.output_prefix + "video.mp4"
        cost = aws_only_cost(self.rt)
        # The new job's own timings: no dispatch, completed now.
        timings = job.model_copy(update={"completed_at": iso(utcnow())}).timings()
        try:
            found = reuse.reuse_or_none(
                self.rt.s3,
                self.rt.reuse,
                s.bucket_name,
                key,
                target,
                iso(utcnow()),
                timings=timings,
                cost=cost,
                video_url=presign_get(self.rt.s3, s.bucket_name, output_key, OUTPUT_URL_TTL),
            )
        except ClientError:
            # Reuse only saves a run: if the copy is refused the job runs (its result overwrites
            # whatever part of the copy was made).
            logger.warning("could not copy the earlier result", extra={"job_id": job.job_id}, exc_info=True)
            return False
        if found is None:
            return False
        entry, copied = found
        succeed_job(
            self.rt,
            job.job_id,
            copied.success_fields(
                reused_from=entry.job_id,
                reuse_key=key,
                seed=settings.seed,
                settings=settings.model_dump(),
                requested_backend=choice,
                gpus=gpus,
            ),
        )
        logger.info("result reused", extra={"job_id": job.job_id, "reused_from": entry.job_id})
        return True


def _kind(value: str) -> metrics.ErrorKind:
    return cast(metrics.ErrorKind, value if value in metrics.ERROR_KINDS else "internal")


def _seconds_since(moment: str | None) -> float | None:
    start = parse_iso(moment)
    return (utcnow() - start).total_seconds() if start else None
