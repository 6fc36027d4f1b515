"""The job table's indexes as template.yaml declares them: the sparse unsettled-terminal index (the
catch-up reads only what needs work) and the per-backend count ingest's capacity check uses."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import boto3
import pytest
from moto import mock_aws
from vap_shared.job_store import UNSETTLED_INDEX, JobStore
from vap_shared.jobs import Job
from vap_testkit import jobs_table_spec

NOW = "2026-11-25T18:00:00.000000Z"
TABLE = "jobs"


class CountingClient:
    """The DynamoDB client, recording what each query read (ScannedCount) and serialising calls
    (moto's in-process backend is not thread-safe; DynamoDB applies each write atomically)."""

    def __init__(self, client: Any) -> None:
        self._client = client
        self._lock = threading.RLock()
        self.queries: list[dict[str, Any]] = []

    def query(self, **kwargs: Any) -> Any:
        with self._lock:
            page = self._client.query(**kwargs)
        self.queries.append({"index": kwargs.get("IndexName"), "scanned": page["ScannedCount"]})
        return page

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._client, name)

        def locked(*args: Any, **kwargs: Any) -> Any:
            with self._lock:
                return method(*args, **kwargs)

        return locked


@pytest.fixture
def client(monkeypatch: pytest.MonkeyPatch) -> Iterator[CountingClient]:
    for k, v in {
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ACCESS_KEY_ID": "t",
        "AWS_SECRET_ACCESS_KEY": "t",
    }.items():
        monkeypatch.setenv(k, v)
    with mock_aws():
        ddb = boto3.client("dynamodb", region_name="us-east-1")
        ddb.create_table(TableName=TABLE, **jobs_table_spec())
        yield CountingClient(ddb)


@pytest.fixture
def store(client: CountingClient) -> JobStore:
    return JobStore(client, TABLE)


def _settled_item(i: int) -> dict[str, Any]:
    """A finished, notified job whose terminal status is written: what `settle` leaves behind."""
    state = "succeeded" if i % 3 else "failed"
    return {
        "job_id": {"S": f"20261125T18{i // 60 % 60:02d}{i % 60:02d}Z-{i:010x}"},
        "state": {"S": state},
        "backend": {"S": "modal" if i % 2 else "fal"},
        "dispatched_at": {"S": NOW},
        "completed_at": {"S": NOW},
        "notified_at": {"S": NOW},
        "status_written_at": {"S": NOW},
    }


def _finish(store: JobStore, job_id: str, state: str = "succeeded") -> None:
    store.create(Job(job_id=job_id))
    store.transition(job_id, "dispatched", {"backend": "modal", "dispatched_at": NOW}, NOW)
    store.transition(job_id, state, {"completed_at": NOW}, NOW)


def test_unsettled_terminal_reads_only_the_few_that_need_work(
    store: JobStore, client: CountingClient
) -> None:
    items = [_settled_item(i) for i in range(10_000)]
    for start in range(0, len(items), 25):
        client.batch_write_item(
            RequestItems={TABLE: [{"PutRequest": {"Item": item}} for item in items[start : start + 25]]}
        )
    # Through the real code paths: finished but not notified, notified but status.json unwritten,
    # status written but not notified; and one that completes everything (leaves the index).
    _finish(store, "20261126T000001Z-unnotified", "failed")
    _finish(store, "20261126T000002Z-nostatus")
    store.claim_notification("20261126T000002Z-nostatus", NOW)
    _finish(store, "20261126T000003Z-cancelled", "cancelled")
    store.mark_status_written("20261126T000003Z-cancelled", NOW)
    _finish(store, "20261126T000004Z-settled")
    store.claim_notification("20261126T000004Z-settled", NOW)
    store.mark_status_written("20261126T000004Z-settled", NOW)
    assert not store.settle("20261126T000002Z-nostatus")  # status still missing: stays
    assert store.settle("20261126T000004Z-settled")
    client.queries.clear()

    found = store.unsettled_terminal(limit=100)

    assert found == [
        "20261126T000001Z-unnotified",
        "20261126T000002Z-nostatus",
        "20261126T000003Z-cancelled",
    ]
    assert [q["index"] for q in client.queries] == [UNSETTLED_INDEX]
    assert sum(q["scanned"] for q in client.queries) == 3  # not 10,004
    # And a page limit holds.
    assert store.unsettled_terminal(limit=2) == found[:2]


def test_a_job_leaves_the_unsettled_index_once_notified_and_status_written(store: JobStore) -> None:
    _finish(store, "j1")
    assert store.unsettled_terminal() == ["j1"]
    store.mark_status_written("j1", NOW)
    store.mark_status_written("j1", "2027-01-01T00:00:00.000000Z")  # the first write time stays
    assert store.get("j1").status_written_at == NOW  # type: ignore[union-attr]
    assert not store.settle("j1") and store.unsettled_terminal() == ["j1"]
    store.claim_notification("j1", NOW)
    assert store.settle("j1") and store.unsettled_terminal() == []
    # Non-terminal jobs are never in it.
    store.create(Job(job_id="j2"))
    store.transition("j2", "running", {"backend": "fal", "dispatched_at": NOW}, NOW)
    assert store.unsettled_terminal() == []


def test_a_released_notification_claim_puts_a_settled_job_back_in_the_index(store: JobStore) -> None:
    # Invocation A claims and publishes; B sees the claim and settles; A's publish fails and it
    # releases its claim. The catch-up must still find the job, or its notification is lost.
    _finish(store, "j1")
    store.mark_status_written("j1", NOW)
    assert store.claim_notification("j1", NOW)
    assert store.settle("j1") and store.unsettled_terminal() == []
    store.release_notification("j1")
    assert store.unsettled_terminal() == ["j1"]
    assert store.claim_notification("j1", NOW)  # the catch-up's retry can notify


def test_outstanding_counts_dispatched_and_running_jobs_per_backend(store: JobStore) -> None:
    store.create(Job(job_id="received"))
    for job_id, backend, state in [
        ("m1", "modal", "dispatched"),
        ("m2", "modal", "running"),
        ("m3", "modal", "succeeded"),
        ("f1", "fal", "running"),
    ]:
        store.create(Job(job_id=job_id))
        store.transition(job_id, "dispatched", {"backend": backend, "dispatched_at": NOW}, NOW)
        if state != "dispatched":
            store.transition(job_id, state, {}, NOW)
    assert (store.outstanding("modal"), store.outstanding("fal")) == (2, 1)
    # A fallback moves the job's place; a terminal state frees it. Nothing to decrement.
    store.transition("m2", "dispatched", {"backend": "fal"}, NOW)
    store.transition("m1", "failed", {}, NOW)
    assert (store.outstanding("modal"), store.outstanding("fal")) == (0, 2)


def test_admit_never_gives_more_places_than_capacity(store: JobStore) -> None:
    assert store.admit("modal", "a", 2, now=1000, hold_s=180)
    assert store.admit("modal", "a", 2, now=1001, hold_s=180)  # a duplicate keeps its place
    # `a` is being dispatched (received, lease held): not in the index yet, still counted.
    store.create(Job(job_id="a"))
    store.acquire_dispatch_lease("a", 1000, 120)
    store.create(Job(job_id="b"))
    store.transition("b", "dispatched", {"backend": "modal", "dispatched_at": NOW}, NOW)
    assert not store.admit("modal", "c", 2, now=1002, hold_s=180)
    assert store.admit("fal", "c", 1, now=1002, hold_s=180)  # another backend, other places
    # `a`'s submit failed: its place comes back.
    store.release_admission("modal", "a")
    assert store.admit("modal", "c", 2, now=1003, hold_s=180)
    # `b` finishes: its place is free again.
    store.transition("b", "succeeded", {}, NOW)
    store.create(Job(job_id="c"))
    store.transition("c", "dispatched", {"backend": "modal", "dispatched_at": NOW}, NOW)
    assert store.admit("modal", "d", 2, now=1004, hold_s=180)


def test_an_admission_left_behind_frees_its_place(store: JobStore) -> None:
    # Ingest admits a job it holds the dispatch lease of; it crashed before dispatching.
    store.create(Job(job_id="crashed"))
    store.acquire_dispatch_lease("crashed", 1000, 120)
    assert store.admit("modal", "crashed", 1, now=1000, hold_s=180)
    assert not store.admit("modal", "next", 1, now=1100, hold_s=180)  # lease still held
    assert store.admit("modal", "next", 1, now=1121, hold_s=180)  # lease expired: place free
    # An admission whose job record cannot be read counts until it expires.
    assert store.admit("fal", "ghost", 1, now=1000, hold_s=180)
    assert not store.admit("fal", "other", 1, now=1179, hold_s=180)
    assert store.admit("fal", "other", 1, now=1180, hold_s=180)


def test_concurrent_admissions_respect_capacity(store: JobStore) -> None:
    admitted: list[str] = []
    barrier = threading.Barrier(12)

    def admit(job_id: str) -> None:
        # As ingest does: the job exists and its delivery holds the dispatch lease.
        store.create(Job(job_id=job_id))
        store.acquire_dispatch_lease(job_id, 1000, 120)
        barrier.wait()
        if store.admit("modal", job_id, 4, now=1000, hold_s=180):
            admitted.append(job_id)

    threads = [threading.Thread(target=admit, args=(f"job-{i}",)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(admitted) == 4, admitted
