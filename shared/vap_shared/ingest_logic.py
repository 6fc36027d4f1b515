"""Ingest: one S3 "sidecar created" event → validated, dispatched job (or a clear failure).

Raises `TransientJobError` when the SQS message should be retried (media not uploaded yet, both
backends down): a real attempt that failed, counted toward `INGEST_MAX_ATTEMPTS`. Permanent problems
end the job as failed and return normally, so SQS drops the message instead of retrying it into the
DLQ.

Time: Lambda kills an invocation at its timeout, and a killed batch comes back whole with every
receive count raised. So a record starts only while the time left covers its worst case
(`RECORD_START_S`: checks, both backends' submits, the record write), except an invocation's first
record, and each backend submit starts only while the time left covers that submit and the write
after it. What did not start is handed back: its message body is sent again to the ingest queue
and the delivery is consumed. A hand-back carries the attempts already made in a message attribute
(`ATTEMPTS_ATTRIBUTE`), so a delivery's attempt number is `attempts before + receive count` and
only real attempts count toward `INGEST_MAX_ATTEMPTS` (and toward the queue's `maxReceiveCount`,
which sees one message's deliveries).

Dispatch intent: before each submit the backend is recorded on the job (`dispatch_intent`), so a
redelivery after a kill between a submit and the `dispatched` write does not submit blindly: for
Modal it re-submits the same job id (the GPU API answers a repeated job id with the same call id,
so that is the lookup) and does not fall back to fal while attempts remain (the first submit may
have queued the job there); for fal, which has no lookup by our id, the job becomes `dispatched` at
fal with no `backend_call_id` and waits for its first fal delivery (the webhook URL's per-job token
proves it; the sweeper's deadlines bound it). A fal submit whose answer was lost (read timeout) is
treated the same way: fal never gets a job twice from ingest.

Backpressure: a job is dispatched only while the jobs outstanding at its backend are below what the
job budget allows there (`Budget.capacity`). Otherwise it stays `received` (status.json `queued`),
its message is handed back with a delay, uncounted: waiting is never an attempt. An `auto` job
waits for Modal rather than going to fal because Modal is busy: fal is the fallback for Modal
*failing*, and a full pool is the normal state of a burst (fal would cost more and take every
burst). Duplicates are harmless: the job id comes from the event, the dispatch lease lets one
delivery dispatch, and a waiting duplicate finds the job dispatched and ends.

Result reuse: a job whose media bytes, settings and explicit seed equal an earlier succeeded job's
is answered with a copy of that job's result (no backend call, no capacity taken); see
`vap_shared.reuse`. The check runs after the media are validated, before anything is dispatched.
"""

from __future__ import annotations

import dataclasses
import math
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import timedelta
from secrets import randbelow
from typing import Any, cast

from aws_lambda_powertools import Logger
from botocore.exceptions import ClientError

from . import metrics, reuse
from .backends.base import REQUEST_WORST_S, Backend, BackendError, Dispatch, DispatchRequest
from .backends.dispatch import DispatchFailed, dispatch
from .backends.modal import SUBMIT_ATTEMPTS
from .contract import SEED_MAX, BackendName
from .errors import FieldError, PermanentJobError, TransientJobError, field_error
from .gpu_contract import GenerationSettings
from .gpu_urls import service_url_fields
from .jobs import Job, iso, parse_iso, utcnow
from .lifecycle import aws_only_cost, fail_job, finalize_terminal, request_from_job, succeed_job
from .media import MediaRef, data_extension, resolve_reference
from .naming import job_id as make_job_id
from .naming import output_prefix, sidecar_name, work_input_key
from .notifier import presign_output
from .runtime import Runtime
from .s3_events import S3ObjectEvent
from .s3_events import parse_sqs_body as parse_sqs_body  # the sweeper's dead-letter drain reads it here
from .s3io import head, read_limited
from .sidecar import Sidecar, SidecarInvalid, decode_json_object, validate_object
from .status_object import write_status

logger = Logger(child=True)

# Longer than an invocation (the function's 60 s timeout), shorter than the queue's visibility
# timeout, so a killed attempt's redelivery can take over. An invocation that knows its time left
# holds it only until Lambda has surely stopped it (+ LEASE_MARGIN_S): a killed invocation's job
# is then free for a duplicate copy soon after, not a minute later.
DISPATCH_LEASE_SECONDS = 120
LEASE_MARGIN_S = 5
MEDIA_FIELDS = ("video_url", "image_url")
# A place taken at a backend counts from the admission record until the job shows in the index:
# longer than a dispatch (its lease) plus the index's lag.
ADMISSION_HOLD_SECONDS = DISPATCH_LEASE_SECONDS + 60
# The SQS message attribute a hand-back carries: real attempts made before this message.
ATTEMPTS_ATTRIBUTE = "vap_attempts"

TimeLeft = Callable[[], float]  # seconds left in this invocation


def lease_seconds(time_left_s: TimeLeft | None) -> int:
    """How long a dispatch lease taken now lasts: no longer than its invocation can run."""
    if time_left_s is None:
        return DISPATCH_LEASE_SECONDS
    return min(DISPATCH_LEASE_SECONDS, math.ceil(max(0.0, time_left_s())) + LEASE_MARGIN_S)


# Worst cases, in seconds of the invocation. A submit: each request's connect + read timeout (Modal
# is asked twice with the same job id when an answer is lost).
SUBMIT_WORST_S: dict[str, float] = {"modal": SUBMIT_ATTEMPTS * REQUEST_WORST_S, "fal": REQUEST_WORST_S}
# After a submit: the `dispatched` write, status.json, metrics (and a backend secret's first read).
RECORD_WRITE_S = 5.0
# Re-sending the records an invocation hands back (one SQS send each).
HAND_BACK_S = 2.0
# A whole dispatch once the media are checked: Modal, then fal, then the write. Hashing media for
# reuse stops while this much of the invocation is left (the job then simply runs).
DISPATCH_RESERVE_S = SUBMIT_WORST_S["modal"] + SUBMIT_WORST_S["fal"] + RECORD_WRITE_S
# Reading the sidecar, checking the media (a few small S3 reads), the job record's first writes.
CHECKS_S = 6.0
# What a record needs to start: the function's Timeout must leave room for it (a template test).
RECORD_START_S = CHECKS_S + DISPATCH_RESERVE_S + HAND_BACK_S
# A record an invocation's whole time could not submit comes back after this long (not at once).
MISCONFIGURED_RETRY_S = 60


class BackendBusy(Exception):
    """The backend has no room for the job now (not a failure: the job waits its turn)."""

    def __init__(self, backend: str) -> None:
        super().__init__(f"{backend} is at capacity")
        self.backend = backend


class JobWaiting(Exception):
    """Raised by `handle_event` for a job that must be looked at again later: it waits for backend
    capacity (its lease is released), or another delivery holds its dispatch lease (that one may
    still fail and leave the job to this copy)."""

    def __init__(self, job_id: str, reason: str) -> None:
        super().__init__(f"job {job_id} waits for {reason}")
        self.job_id = job_id
        self.reason = reason


class OutOfTime(Exception):
    """Too little of the invocation is left to submit to `backend` and record it. `counted`: a
    backend already failed in this delivery, which makes it a real attempt."""

    def __init__(self, backend: str, counted: bool) -> None:
        super().__init__(f"too little time left to submit to {backend}")
        self.backend = backend
        self.counted = counted


class HandBack(Exception):
    """Raised by `handle_event` for a job whose delivery is handed back (its lease is released)."""

    def __init__(self, job_id: str, reason: str, counted: bool) -> None:
        super().__init__(f"job {job_id}: {reason}")
        self.job_id = job_id
        self.reason = reason
        self.counted = counted


class SubmitUnconfirmed(Exception):
    """fal may have queued the job but its answer was lost: fal has no lookup by our id, so the job
    is recorded as dispatched at fal without a request id instead of being submitted again."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class JobMovedOn(Exception):
    """The job left `received` before its submit (a callback, a cancel): nothing is submitted."""


@dataclass(frozen=True)
class Delivery:
    """One SQS message as ingest sees it (typed by the handler from Powertools' `SQSRecord`)."""

    message_id: str
    body: str
    events: tuple[S3ObjectEvent, ...]
    receive_count: int = 1
    # Real attempts made by the messages this one was handed back from.
    attempts_before: int = 0

    @property
    def attempt(self) -> int:
        """This delivery's attempt number (what `INGEST_MAX_ATTEMPTS` bounds)."""
        return self.attempts_before + self.receive_count


@dataclass
class _SubmitGuard:
    """One delivery's dispatch of one job: every submit is timed, admitted and announced (intent)."""

    ingestor: Ingestor
    job: Job
    time_left_s: TimeLeft | None
    intent: str | None = None
    failures: list[BackendError] = dataclasses.field(default_factory=list)

    def submit(self, inner: Backend, capacity: int, request: DispatchRequest) -> Dispatch:
        name, store, jid = inner.name, self.ingestor.rt.store, self.job.job_id
        needed = SUBMIT_WORST_S[name] + RECORD_WRITE_S + HAND_BACK_S
        if self.time_left_s is not None and self.time_left_s() < needed:
            raise OutOfTime(name, counted=bool(self.failures))
        if not store.admit(name, jid, capacity, int(time.time()), ADMISSION_HOLD_SECONDS):
            raise BackendBusy(name)
        before = self.intent
        first = self.failures[0] if self.failures else None
        fallback = (first.backend, first.reason) if first else (None, None)
        if not store.set_dispatch_intent(jid, name, iso(utcnow()), *fallback):
            store.release_admission(name, jid)
            raise JobMovedOn(jid)
        self.intent = name
        try:
            return inner.submit(request)
        except BackendError as exc:
            store.release_admission(name, jid)  # the place was never used
            if exc.may_have_arrived and name == "fal":
                raise SubmitUnconfirmed(exc.reason) from None
            if not exc.may_have_arrived:
                self._restore(before)  # it certainly did not arrive: the earlier intent stands
            self.failures.append(exc)
            raise
        except Exception:
            store.release_admission(name, jid)
            self._restore(before)  # raised before anything was sent (a signer, a secret)
            raise

    def _restore(self, before: str | None) -> None:
        self.intent = before
        self.ingestor.rt.store.set_dispatch_intent(self.job.job_id, before, iso(utcnow()))


class _GuardedBackend:
    """A backend as `dispatch` sees it during one ingest dispatch."""

    def __init__(self, inner: Backend, guard: _SubmitGuard, capacity: int) -> None:
        self._inner = inner
        self._guard = guard
        self._capacity = capacity
        self.name: BackendName = inner.name

    def submit(self, request: DispatchRequest) -> Dispatch:
        return self._guard.submit(self._inner, self._capacity, request)


class Invocation:
    """One ingest invocation: its records, each started only while the time left covers a record's
    worst case (the first always starts: it has the whole invocation)."""

    def __init__(self, ingestor: Ingestor, time_left_s: TimeLeft | None) -> None:
        self.ingestor = ingestor
        self.time_left_s = time_left_s
        self.started = 0

    def handle(self, delivery: Delivery) -> list[str]:
        left = self.time_left_s() if self.time_left_s is not None else None
        if self.started and left is not None and left < RECORD_START_S:
            reason = f"not started: {left:.0f} s left"
            self.ingestor.hand_back(delivery, counted=False, delay=0, reason=reason)
            return []
        self.started += 1
        return self.ingestor.handle_delivery(delivery, self.time_left_s, first=self.started == 1)


class Ingestor:
    def __init__(self, rt: Runtime, sqs: Any = None) -> None:
        self.rt = rt
        self.settings = rt.settings
        self._sqs = sqs
        self._lock = threading.Lock()

    @property
    def sqs(self) -> Any:
        """SQS client for handing messages back, built on first use (concurrent threads locally)."""
        if self._sqs is None:
            with self._lock:
                if self._sqs is None:
                    self._sqs = self.rt.session.client("sqs")
        return self._sqs

    def invocation(self, time_left_s: TimeLeft | None) -> Invocation:
        return Invocation(self, time_left_s)

    def handle_delivery(
        self, delivery: Delivery, time_left_s: TimeLeft | None = None, first: bool = False
    ) -> list[str]:
        """Process every S3 record of one message; returns the job ids touched. A message with a job
        that waits for capacity, or that this invocation has no time left to dispatch, is handed back
        (then this delivery may be deleted). `time_left_s`: the invocation's remaining time; `first`:
        this is the invocation's first record."""
        touched: list[str] = []
        waiting: list[JobWaiting] = []
        for event in delivery.events:
            try:
                jid = self.handle_event(event, delivery.attempt, time_left_s)
            except JobWaiting as exc:
                waiting.append(exc)
                touched.append(exc.job_id)
                continue
            except HandBack as exc:
                delay = 0
                if first and not exc.counted:
                    # A whole invocation too short for one submit: the function's Timeout is below
                    # what a dispatch needs. Say so, and do not spin on the queue meanwhile.
                    logger.error(
                        "the ingest function's timeout leaves no room for a backend submit",
                        extra={"job_id": exc.job_id, "needed_s": RECORD_START_S},
                    )
                    delay = MISCONFIGURED_RETRY_S
                # The message's later records (if any) are handed back with it: they are
                # idempotent for those already done.
                self.hand_back(
                    delivery, counted=exc.counted, delay=delay, reason=exc.reason, job_ids=[exc.job_id]
                )
                return [*touched, exc.job_id]
            if jid:
                touched.append(jid)
        if waiting:
            delay = self.settings.capacity_recheck_seconds
            # Jitter: a burst's waiting jobs do not all look again at the same moment.
            delay = random.randint(max(1, delay // 2), delay) if delay > 1 else delay
            self.hand_back(
                delivery,
                counted=False,
                delay=delay,
                reason="waiting for " + "; ".join(sorted({w.reason for w in waiting})),
                job_ids=[w.job_id for w in waiting],
            )
        return touched

    def hand_back(
        self, delivery: Delivery, *, counted: bool, delay: int, reason: str, job_ids: list[str] | None = None
    ) -> None:
        """Send the message body again to the ingest queue (after `delay` s), carrying the attempts
        made so far: this delivery's own if `counted`, else only the earlier ones."""
        s = self.settings
        if not s.ingest_queue_url:
            raise TransientJobError([field_error(None, "The service has no INGEST_QUEUE_URL configured.")])
        attempts = max(0, delivery.attempt if counted else delivery.attempt - 1)
        self.sqs.send_message(
            QueueUrl=s.ingest_queue_url,
            MessageBody=delivery.body,
            DelaySeconds=delay,
            MessageAttributes={ATTEMPTS_ATTRIBUTE: {"DataType": "Number", "StringValue": str(attempts)}},
        )
        logger.info(
            "handed back to the ingest queue",
            extra={
                "message_id": delivery.message_id,
                "job_ids": job_ids or [],
                "reason": reason,
                "attempts": attempts,
                "delay_s": delay,
            },
        )

    def handle_event(
        self, event: S3ObjectEvent, attempt: int = 1, time_left_s: TimeLeft | None = None
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
        if not self.rt.store.acquire_dispatch_lease(jid, int(time.time()), lease_seconds(time_left_s)):
            # Not consumed: if the holder fails with a retryable error, its own message may be gone
            # (a duplicate delivery of it) and this copy is what brings the job back.
            logger.info("another invocation is dispatching this job", extra={"job_id": jid})
            raise JobWaiting(jid, "another delivery dispatching it")
        try:
            self._process(job, event, attempt, time_left_s)
        except BackendBusy as exc:
            self.rt.store.release_dispatch_lease(jid)
            raise JobWaiting(jid, f"backend capacity ({exc.backend})") from None
        except OutOfTime as exc:
            self.rt.store.release_dispatch_lease(jid)
            raise HandBack(jid, str(exc), exc.counted) from None
        except JobMovedOn:
            self.rt.store.release_dispatch_lease(jid)
            logger.info("the job left `received` before its submit", extra={"job_id": jid})
        except PermanentJobError as exc:
            fail_job(self.rt, jid, exc.errors, kind=_kind(exc.kind))
        except TransientJobError as exc:
            if attempt >= s.ingest_max_attempts:
                gave_up = field_error(None, f"Gave up after {attempt} attempts.")
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
        """Every S3 medium exists, is not empty or too big, and is an intact file of its kind (its
        structure checked by a few ranged reads: `media_probe`), and every `data:` medium too; the S3
        media's ETags (so the reuse hash reads exactly the objects checked here)."""
        # Loaded on first use: it adds nothing to the cold start of an invocation with no job to check.
        from .media_probe import media_problem
        from .media_source import BytesSource, S3RangeSource, SourceChanged

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
            etag = str(meta.get("ETag") or "")
            if etag:
                etags[field] = etag
            if size == 0:
                permanent.append(field_error(field, f"`{field}`: the object {ref.key} is empty (0 bytes)."))
            elif size > s.max_input_bytes:
                permanent.append(
                    field_error(
                        field,
                        f"`{field}`: the object {ref.key} is {size:,} bytes; at most {s.max_input_bytes:,} "
                        "bytes are allowed.",
                    )
                )
            else:
                source = S3RangeSource(self.rt.s3, ref.bucket, ref.key, size, etag or None)
                try:
                    problem = media_problem(field, source)
                except SourceChanged:
                    changed = f"`{field}`: the object {ref.key} was replaced while it was being checked."
                    raise TransientJobError([field_error(field, changed)], kind="input") from None
                if problem:
                    permanent.append(field_error(field, problem.replace("the file", f"the object {ref.key}")))
        for field, ref in refs.items():
            if ref.kind == "data" and ref.data is not None:
                problem = media_problem(field, BytesSource(ref.data))
                if problem:
                    message = problem.replace("the file", "the data: URI's content")
                    permanent.append(field_error(field, message))
        if permanent:
            raise PermanentJobError(permanent + missing)
        if missing:
            raise TransientJobError(missing, kind="input")  # never uploaded: the submitter's problem
        return etags

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
        self, job: Job, event: S3ObjectEvent, attempt: int, time_left_s: TimeLeft | None = None
    ) -> None:
        s = self.settings
        if job.dispatch_intent == "fal":
            # An earlier delivery sent the job to fal and was stopped before it recorded the answer:
            # fal cannot be asked about it, and asking again would run it twice.
            self._record_unconfirmed(job, "an earlier delivery was stopped after its fal submit")
            return
        if job.inputs and job.settings and job.requested_backend and job.webhook_base_url:
            # Validated on an earlier delivery (it waited for capacity, ran out of time, or was
            # stopped): dispatch what was recorded, unless an equal job finished meanwhile (bursts of
            # equal jobs are what reuse is for).
            recorded = GenerationSettings.model_validate(job.settings)
            if job.reuse_key and self._answer_from_earlier(
                job, job.reuse_key, recorded, job.requested_backend, job.gpus or 1
            ):
                return
            self._dispatch(job, request_from_job(job), job.requested_backend, attempt, time_left_s)
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
        self._dispatch(job, request, choice, attempt, time_left_s)

    def _dispatch(
        self, job: Job, request: DispatchRequest, choice: str, attempt: int, time_left_s: TimeLeft | None
    ) -> None:
        """Submit within the backends' capacity and the invocation's time (`BackendBusy` when the
        first backend tried is full, `OutOfTime` when a submit would not finish) and record it."""
        s = self.settings
        if job.dispatch_intent == "modal" and choice == "auto" and attempt < s.ingest_max_attempts:
            # An earlier delivery may have queued the job at Modal: re-submitting the same job id
            # finds that call; falling back to fal now could run the job twice. The last attempt
            # falls back as usual.
            choice = "modal"
        request = replace(request, deadline_unix=s.budget.deadline_unix(time.time()))
        guard = _SubmitGuard(self, job, time_left_s, intent=job.dispatch_intent)
        backends = {
            name: _GuardedBackend(backend, guard, s.budget.capacity(backend.name))
            for name, backend in self.rt.backends.items()
        }
        try:
            outcome = dispatch(request, choice, backends)
        except SubmitUnconfirmed as exc:
            self._record_unconfirmed(job, exc.reason)
            return
        except DispatchFailed as exc:
            if exc.retryable:
                raise TransientJobError(exc.errors) from None
            # A 422 is the request's fault; anything else (credentials refused) is the service's.
            raise PermanentJobError(exc.errors, kind="input" if exc.rejected else "internal") from None
        d = outcome.dispatch
        self._record_dispatch(
            job,
            {
                "backend": d.backend,
                "backend_call_id": d.call_id,
                "fal_urls": d.urls or None,
                "fallback_from": outcome.fallback_from,
                "fallback_reason": outcome.fallback_reason,
                "dispatched_at": iso(utcnow()),
                "dispatch_lease_until": None,
                "dispatch_intent": None,
                "dispatch_intent_at": None,
            },
            attempt,
        )

    def _record_unconfirmed(self, job: Job, reason: str) -> None:
        """The job is at fal (or may be) without a recorded request id: `dispatched` there, waiting
        for its first fal delivery."""
        current = self.rt.store.get(job.job_id) or job
        logger.warning(
            "fal may have the job but its request id is unknown; waiting for its webhook",
            extra={"job_id": job.job_id, "reason": reason},
        )
        self._record_dispatch(
            current,
            {
                "backend": "fal",
                "backend_call_id": None,
                "fal_urls": None,
                "dispatched_at": current.dispatch_intent_at or iso(utcnow()),
                "dispatch_lease_until": None,
            },
            None,
        )

    def _record_dispatch(self, job: Job, fields: dict[str, Any], attempt: int | None) -> None:
        store = self.rt.store
        updated = store.transition(job.job_id, "dispatched", fields, iso(utcnow()), sources=("received",))
        if updated is None:
            # A callback already moved the job on (running/terminal): keep its state, add our fields.
            self.rt.store.update_fields(job.job_id, fields, iso(utcnow()), only_if_absent="backend_call_id")
        else:
            write_status(self.rt.s3, self.settings.bucket_name, updated)
        fallback_from = fields.get("fallback_from", job.fallback_from)
        if fallback_from:
            metrics.fallback(fallback_from, job.job_id)
        metrics.job_dispatched(fields["backend"], _seconds_since(job.received_at), job.job_id)
        logger.info(
            "job dispatched",
            extra={
                "job_id": job.job_id,
                "backend": fields["backend"],
                "call_id": fields["backend_call_id"],
                "fallback_from": fallback_from,
                "attempt": attempt,
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
                video_url=presign_output(self.rt.s3, s.bucket_name, output_key)[0],
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
