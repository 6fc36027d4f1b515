"""Ingest inside its Lambda timeout: with a slow backend a batch of records never runs past the
invocation's time (Lambda would kill it and send every record back with a higher receive count);
records that cannot finish are handed back to the queue, and only real attempts are counted.

Time is a test clock: the fake backends advance it by what a slow answer takes, and the Lambda
context reads the time left from it, as `get_remaining_time_in_millis()` does on Lambda."""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
import ingest
import pytest
from vap_shared.ingest_logic import (
    ATTEMPTS_ATTRIBUTE,
    MISCONFIGURED_RETRY_S,
    RECORD_START_S,
    SUBMIT_WORST_S,
    Ingestor,
)
from vap_testkit import FAL_EXAMPLE, MP4, PNG, FakeServices, Stack, s3_event, stack

TIMEOUT_S = 60.0  # the ingest function's Timeout in template.yaml


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def advance(self, seconds: float) -> None:
        self.now += seconds


class LambdaContext:
    """What the handler reads of Lambda's context; the time left comes from the test clock."""

    function_name = "ingest"
    memory_limit_in_mb = 512
    invoked_function_arn = "arn:aws:lambda:us-east-1:123456789012:function:ingest"
    aws_request_id = "req-1"

    def __init__(self, clock: Clock, timeout_s: float = TIMEOUT_S) -> None:
        self.clock = clock
        self.deadline = clock.now + timeout_s

    def get_remaining_time_in_millis(self) -> int:
        return max(0, int((self.deadline - self.clock.now) * 1000))


class SlowServices(FakeServices):
    """Modal answers after `modal_delay_s` (or times out after the submit's read timeout)."""

    def __init__(self, clock: Clock) -> None:
        super().__init__()
        self.clock = clock
        self.modal_delay_s = 0.0
        self.modal_times_out = False
        self.fal_delay_s = 0.0

    def handler(self, request: httpx.Request) -> httpx.Response:
        if request.url.host == "modal.test":
            if self.modal_times_out:
                self.requests.append(request)
                self.clock.advance(SUBMIT_WORST_S["modal"] / 2)  # connect + read timeout
                raise httpx.ReadTimeout("no answer", request=request)
            self.clock.advance(self.modal_delay_s)
        if request.url.host == "queue.fal.test":
            self.clock.advance(self.fal_delay_s)
        return super().handler(request)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def services(clock: Clock) -> SlowServices:
    return SlowServices(clock)


@pytest.fixture
def st(monkeypatch: pytest.MonkeyPatch, services: SlowServices) -> Any:
    with stack(monkeypatch, services) as s:
        ingest._ingestor = Ingestor(s.runtime)
        yield s
    ingest.reset()


def upload(st: Stack, n: int, backend: str = "auto") -> dict[str, Any]:
    st.put("inbox/t/clip.mp4", MP4)
    st.put("inbox/t/face.png", PNG)
    raw = json.dumps({**FAL_EXAMPLE, "video_url": "clip.mp4", "image_url": "face.png", "backend": backend})
    key = f"inbox/t/job-{n}.json"
    return s3_event(key, st.put(key, raw), size=len(raw))


def record(
    body: dict[str, Any] | str, n: int, receive_count: int = 1, attempts: int | None = None
) -> dict[str, Any]:
    attributes = {}
    if attempts is not None:
        attributes[ATTEMPTS_ATTRIBUTE] = {"stringValue": str(attempts), "dataType": "Number"}
    return {
        "messageId": f"m-{n}",
        "receiptHandle": f"rh-{n}",
        "body": body if isinstance(body, str) else json.dumps(body),
        "attributes": {"ApproximateReceiveCount": str(receive_count), "SentTimestamp": "1700000000000"},
        "messageAttributes": attributes,
        "md5OfBody": "x",
        "eventSource": "aws:sqs",
        "eventSourceARN": "arn:aws:sqs:us-east-1:123456789012:ingest",
        "awsRegion": "us-east-1",
    }


def invoke(clock: Clock, *records: dict[str, Any]) -> tuple[dict[str, Any], float]:
    """One invocation; its answer and how long it ran on the test clock."""
    context = LambdaContext(clock)
    started = clock.now
    result = ingest.handler({"Records": list(records)}, context)
    return result, clock.now - started


def as_records(messages: list[dict[str, Any]], start: int = 100) -> list[dict[str, Any]]:
    """Re-sent messages as their next delivery (receive count 1, the attributes they carry)."""
    records = []
    for i, m in enumerate(messages):
        attempts = m.get("MessageAttributes", {}).get(ATTEMPTS_ATTRIBUTE, {}).get("StringValue")
        records.append(record(m["Body"], start + i, attempts=int(attempts) if attempts else None))
    return records


def jobs(st: Stack) -> list[Any]:
    return [j for j in map(st.store.get, st.job_ids()) if j is not None]


def submits(st: Stack, host: str) -> int:
    return len([r for r in st.services.calls(host) if r.method == "POST"])


# ---------------------------------------------------------------------------------------------- slow backends


def test_a_slow_backend_and_a_full_batch_never_outrun_the_timeout(
    st: Stack, clock: Clock, services: SlowServices
) -> None:
    """Modal takes 13 s to accept each job: five in one batch would take 65 s of a 60 s function."""
    services.modal_delay_s = 13.0
    pending = [record(upload(st, n), n) for n in range(5)]
    rounds = 0
    while pending:
        rounds += 1
        result, ran = invoke(clock, *pending)
        assert ran <= TIMEOUT_S, f"round {rounds} ran {ran:.0f} s: Lambda would have killed it"
        assert result == {"batchItemFailures": []}  # nothing is retried toward the DLQ
        back = st.handed_back()
        assert all(m["MessageAttributes"][ATTEMPTS_ATTRIBUTE]["StringValue"] == "0" for m in back)
        pending = as_records(back, start=100 * rounds)
    assert rounds > 1
    assert sorted(j.state for j in jobs(st)) == ["dispatched"] * 5
    assert all(j.backend == "modal" for j in jobs(st)) and submits(st, "modal.test") == 5


def test_modal_timing_out_falls_back_within_the_invocation_and_hands_the_rest_back(
    st: Stack, clock: Clock, services: SlowServices
) -> None:
    services.modal_times_out = True  # two tries of 13 s each, then fal
    result, ran = invoke(clock, *[record(upload(st, n), n) for n in range(5)])
    assert result == {"batchItemFailures": []} and ran <= TIMEOUT_S
    (dispatched,) = [j for j in jobs(st) if j.state == "dispatched"]
    assert dispatched.backend == "fal" and dispatched.fallback_from == "modal"
    assert len(st.handed_back()) == 4 and submits(st, "queue.fal.test") == 1


def test_no_time_for_the_fallback_hands_the_job_back_as_one_attempt(
    st: Stack, clock: Clock, services: SlowServices
) -> None:
    """Modal failed (a real attempt) and fal no longer fits: the job is handed back counted, its
    intent still Modal (the lost answers may have queued it there), and the next delivery asks
    Modal again with the same job id instead of running the job on fal too."""
    services.modal_times_out = True
    event = upload(st, 0)
    context = LambdaContext(clock, timeout_s=SUBMIT_WORST_S["modal"] + 15)  # fal would need 20 s more
    result = ingest.handler({"Records": [record(event, 0, receive_count=1)]}, context)
    assert result == {"batchItemFailures": []}
    (job,) = jobs(st)
    assert job.state == "received" and job.dispatch_intent == "modal" and submits(st, "queue.fal.test") == 0
    (message,) = st.handed_back()
    assert message["MessageAttributes"][ATTEMPTS_ATTRIBUTE]["StringValue"] == "1"
    services.modal_times_out = False
    result, _ = invoke(clock, *as_records([message]))
    (job,) = jobs(st)
    assert job.state == "dispatched" and job.backend == "modal" and submits(st, "queue.fal.test") == 0


def test_a_submit_that_cannot_finish_is_not_started(st: Stack, clock: Clock) -> None:
    """Even an invocation's first record submits only when the submit and its write fit. A whole
    invocation too short for a submit is a misconfigured Timeout: the record comes back later, not
    at once (no spinning on the queue)."""

    class Sends:
        def __init__(self, sqs: Any) -> None:
            self.sqs = sqs
            self.sent: list[dict[str, Any]] = []

        def send_message(self, **kwargs: Any) -> Any:
            self.sent.append(kwargs)
            return self.sqs.send_message(**{**kwargs, "DelaySeconds": 0})

    sends = Sends(st.sqs)
    ingest._ingestor = Ingestor(st.runtime, sqs=sends)
    context = LambdaContext(clock, timeout_s=SUBMIT_WORST_S["modal"])
    result = ingest.handler({"Records": [record(upload(st, 0), 0)]}, context)
    assert result == {"batchItemFailures": []}
    assert submits(st, "modal.test") == 0
    (job,) = jobs(st)
    assert job.state == "received" and job.dispatch_intent is None and job.dispatch_lease_until is None
    (sent,) = sends.sent
    assert sent["DelaySeconds"] == MISCONFIGURED_RETRY_S
    assert sent["MessageAttributes"][ATTEMPTS_ATTRIBUTE]["StringValue"] == "0"
    (message,) = st.handed_back()
    assert message["MessageAttributes"][ATTEMPTS_ATTRIBUTE]["StringValue"] == "0"


def test_records_start_only_with_room_for_their_worst_case(st: Stack, clock: Clock) -> None:
    """A fast batch runs whole; a record is left for another invocation once less than
    RECORD_START_S is left (the first always starts)."""
    result, _ = invoke(clock, *[record(upload(st, n), n) for n in range(3)])
    assert result == {"batchItemFailures": []} and st.handed_back() == []
    assert [j.state for j in jobs(st)] == ["dispatched"] * 3
    context = LambdaContext(clock, timeout_s=RECORD_START_S - 1)
    ingest.handler({"Records": [record(upload(st, n), n) for n in range(3, 5)]}, context)
    assert [j.state for j in jobs(st)] == ["dispatched"] * 4  # the fifth was not even looked at
    (message,) = st.handed_back()
    assert "job-4.json" in message["Body"]


# ---------------------------------------------------------------------------------------------- attempts


def test_attempts_carried_by_a_handed_back_message_count(st: Stack, clock: Clock) -> None:
    """A sidecar whose media are missing, on its first receive of a message that was handed back
    after 3 real attempts: attempt 4 of INGEST_MAX_ATTEMPTS (4), so it fails now."""
    raw = json.dumps({**FAL_EXAMPLE, "video_url": "nowhere.mp4", "image_url": "face.png"})
    event = s3_event("inbox/t/late.json", st.put("inbox/t/late.json", raw), size=len(raw))
    st.put("inbox/t/face.png", PNG)
    result, _ = invoke(clock, record(event, 0, receive_count=1, attempts=2))
    assert result == {"batchItemFailures": [{"itemIdentifier": "m-0"}]}  # attempt 3: retried
    result, _ = invoke(clock, record(event, 0, receive_count=1, attempts=3))
    assert result == {"batchItemFailures": []}
    (job,) = jobs(st)
    assert job.state == "failed" and job.errors[-1]["message"] == "Gave up after 4 attempts."


def test_waiting_for_capacity_carries_the_attempts_made_but_adds_none(
    monkeypatch: pytest.MonkeyPatch, clock: Clock, services: SlowServices
) -> None:
    class Undelayed:
        """The SQS client, sending the capacity wait's re-send without its delay."""

        def __init__(self, sqs: Any) -> None:
            self.sqs = sqs

        def send_message(self, **kwargs: Any) -> Any:
            return self.sqs.send_message(**{**kwargs, "DelaySeconds": 0})

    with stack(monkeypatch, services, MODAL_CONTAINERS="1") as st:
        ingest._ingestor = Ingestor(st.runtime, sqs=Undelayed(st.sqs))
        try:
            for n in range(2):
                invoke(clock, record(upload(st, n, "modal"), n))
            result, _ = invoke(clock, record(upload(st, 2, "modal"), 2, receive_count=3, attempts=1))
            assert result == {"batchItemFailures": []}
            (message,) = st.handed_back()
            # Attempts 1 (an earlier message) + 2 (this message's first two receives): 3 made; this
            # third receive only waited.
            assert message["MessageAttributes"][ATTEMPTS_ATTRIBUTE]["StringValue"] == "3"
        finally:
            ingest.reset()


def test_a_malformed_attempts_attribute_counts_as_none(st: Stack, clock: Clock) -> None:
    bad = record(upload(st, 0), 0)
    bad["messageAttributes"][ATTEMPTS_ATTRIBUTE] = {"stringValue": "-7x", "dataType": "Number"}
    result, _ = invoke(clock, bad)
    assert result == {"batchItemFailures": []} and jobs(st)[0].state == "dispatched"


def test_the_function_timeout_leaves_room_for_a_record() -> None:
    """Every record the invocation starts can finish: the Timeout covers RECORD_START_S, and a
    killed invocation's dispatch lease runs out before SQS redelivers its messages."""
    from pathlib import Path

    from vap_shared.ingest_logic import DISPATCH_LEASE_SECONDS

    from local_stack.cfn import load_template

    template = load_template(Path(__file__).resolve().parents[2] / "template.yaml")
    resources = template["Resources"]
    timeout = resources["IngestFunction"]["Properties"]["Timeout"]
    assert timeout == TIMEOUT_S
    assert timeout >= RECORD_START_S + 3
    assert timeout < DISPATCH_LEASE_SECONDS < resources["IngestQueue"]["Properties"]["VisibilityTimeout"]


@pytest.mark.parametrize("time_left_s", [TIMEOUT_S, 20.0])
def test_a_dispatch_lease_lasts_no_longer_than_its_invocation_can(
    st: Stack, clock: Clock, monkeypatch: pytest.MonkeyPatch, time_left_s: float
) -> None:
    """Lambda stops an invocation at its timeout: a lease that outlived it would keep a killed
    invocation's job from a duplicate copy for nothing (it used to last 120 s whatever was left)."""
    from vap_shared.ingest_logic import LEASE_MARGIN_S

    held: list[float] = []

    def process(self: Ingestor, job: Any, *args: Any) -> None:
        current = st.store.get(job.job_id)
        assert current is not None and current.dispatch_lease_until is not None
        held.append(current.dispatch_lease_until - time.time())

    monkeypatch.setattr(Ingestor, "_process", process)
    context = LambdaContext(clock, timeout_s=time_left_s)
    ingest.handler({"Records": [record(upload(st, 1), 1)]}, context)
    (lease_s,) = held
    assert time_left_s - 1 <= lease_s <= time_left_s + LEASE_MARGIN_S + 1
