"""DynamoDB adapter for job records: conditional create, transitions, notify-once."""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

from boto3.dynamodb.types import TypeDeserializer, TypeSerializer
from botocore.exceptions import ClientError

from .jobs import ALLOWED_FROM, TERMINAL, Job

# Nested values are stored as JSON strings: no float→Decimal conversions, and the record
# stays readable in the console.
_JSON_FIELDS = ("settings", "inputs", "fal_urls", "progress", "errors", "cost")


# Sparse-by-state GSI the sweeper queries: partition `state`, sort `dispatched_at` (ISO-8601 UTC,
# sorts as time). Only items that have `dispatched_at` are in it, and a query reads one state.
DEADLINE_INDEX = "state-dispatched_at"
# Ingest's capacity check: partition `backend`, sort `state` (keys only). A job counts at a backend
# exactly while its own record says dispatched/running there: nothing to increment or leak.
BACKEND_INDEX = "backend-state"
OUTSTANDING_STATES = ("dispatched", "running")
# Sparse: `unsettled` is set by every terminal transition and removed once the job is notified and
# its terminal status.json is written, so the catch-up reads only jobs that still need work.
UNSETTLED_INDEX = "unsettled-job_id"
UNSETTLED = "1"
# Items of the admission record (one per backend) share the table; job ids never contain '#'.
_ADMISSION_KEY = "admission#{backend}"
ADMISSION_RETRIES = 5

_SERIALIZER = TypeSerializer()
_DESERIALIZER = TypeDeserializer()


def _wire(values: dict[str, Any]) -> dict[str, Any]:
    return {k: _SERIALIZER.serialize(v) for k, v in values.items()}


def _unwire(item: dict[str, Any]) -> dict[str, Any]:
    return {k: _DESERIALIZER.deserialize(v) for k, v in item.items()}


def _to_item(values: dict[str, Any]) -> dict[str, Any]:
    item: dict[str, Any] = {}
    for key, value in values.items():
        if value is None:
            continue
        if key in _JSON_FIELDS:
            item[key] = json.dumps(value, separators=(",", ":"), sort_keys=True)
        elif isinstance(value, float):
            item[key] = Decimal(str(value))
        else:
            item[key] = value
    return item


def _from_item(item: dict[str, Any]) -> Job:
    values: dict[str, Any] = {}
    for key, value in item.items():
        if key in _JSON_FIELDS and isinstance(value, str):
            values[key] = json.loads(value)
        elif isinstance(value, Decimal):
            values[key] = int(value) if value == value.to_integral_value() else float(value)
        else:
            values[key] = value
    return Job.model_validate(values)


def _conditional_failed(exc: ClientError) -> bool:
    return exc.response.get("Error", {}).get("Code") == "ConditionalCheckFailedException"


class JobStore:
    def __init__(self, client: Any, table_name: str) -> None:
        # The low-level client, not a Table resource: clients are thread-safe, resources are not
        # (the local stack runs concurrent invocations in threads of one process).
        self._client = client
        self._table = table_name

    def get(self, job_id: str) -> Job | None:
        item = self._client.get_item(
            TableName=self._table, Key=_wire({"job_id": job_id}), ConsistentRead=True
        ).get("Item")
        return _from_item(_unwire(item)) if item else None

    def create(self, job: Job) -> bool:
        """Create the record unless one exists already (duplicate S3 event). True if created."""
        try:
            self._client.put_item(
                TableName=self._table,
                Item=_wire(_to_item(job.model_dump())),
                ConditionExpression="attribute_not_exists(job_id)",
            )
        except ClientError as exc:
            if _conditional_failed(exc):
                return False
            raise
        return True

    def _update(
        self,
        job_id: str,
        fields: dict[str, Any],
        condition: str,
        names: dict[str, str],
        values: dict[str, Any],
        remove: tuple[str, ...] = (),
    ) -> Job | None:
        sets = []
        names = dict(names)
        values = dict(values)
        removes = list(remove)
        for i, (key, value) in enumerate(fields.items()):
            names[f"#f{i}"] = key
            if value is None:
                removes.append(f"#f{i}")
                continue
            values[f":f{i}"] = _to_item({key: value})[key]
            sets.append(f"#f{i} = :f{i}")
        expression = ""
        if sets:
            expression += "SET " + ", ".join(sets)
        if removes:
            expression += " REMOVE " + ", ".join(removes)
        kwargs: dict[str, Any] = {
            "TableName": self._table,
            "Key": _wire({"job_id": job_id}),
            "UpdateExpression": expression.strip(),
            "ConditionExpression": condition,
            "ExpressionAttributeNames": names,
            "ReturnValues": "ALL_NEW",
        }
        if values:
            kwargs["ExpressionAttributeValues"] = _wire(values)
        try:
            response = self._client.update_item(**kwargs)
        except ClientError as exc:
            if _conditional_failed(exc):
                return None
            raise
        return _from_item(_unwire(response["Attributes"]))

    def transition(
        self,
        job_id: str,
        target: str,
        fields: dict[str, Any],
        now_iso: str,
        sources: tuple[str, ...] | None = None,
    ) -> Job | None:
        """Move to `target` if allowed from the current state; None when the condition failed.

        A terminal state is never left because no state lists a terminal one as its source. A
        terminal one marks the job unsettled until it is notified and its status.json written.
        """
        if target in TERMINAL:
            fields = {**fields, "unsettled": UNSETTLED}
        allowed = ALLOWED_FROM[target]
        sources = tuple(x for x in (sources or allowed) if x in allowed)
        values = {f":s{i}": s for i, s in enumerate(sources)}
        condition = "attribute_exists(job_id) AND #state IN (" + ", ".join(values) + ")"
        return self._update(
            job_id,
            {**fields, "state": target, "updated_at": now_iso},
            condition,
            {"#state": "state"},
            values,
        )

    def update_fields(
        self, job_id: str, fields: dict[str, Any], now_iso: str, only_if_absent: str
    ) -> Job | None:
        """Set fields without a state change, only while `only_if_absent` is not set."""
        return self._update(
            job_id,
            {**fields, "updated_at": now_iso},
            "attribute_exists(job_id) AND attribute_not_exists(#guard)",
            {"#guard": only_if_absent},
            {},
        )

    def acquire_dispatch_lease(self, job_id: str, now: int, seconds: int) -> bool:
        """One invocation at a time may dispatch a `received` job; an expired lease is re-taken."""
        result = self._update(
            job_id,
            {"dispatch_lease_until": now + seconds},
            "#state = :received AND (attribute_not_exists(#lease) OR #lease < :now)",
            {"#state": "state", "#lease": "dispatch_lease_until"},
            {":received": "received", ":now": now},
        )
        return result is not None

    def release_dispatch_lease(self, job_id: str) -> None:
        self._update(job_id, {"dispatch_lease_until": None}, "attribute_exists(job_id)", {}, {})

    def set_dispatch_intent(
        self,
        job_id: str,
        backend: str | None,
        now_iso: str,
        fallback_from: str | None = None,
        fallback_reason: str | None = None,
    ) -> bool:
        """Record, before a submit, the backend a `received` job is about to be sent to (and, for a
        fallback, the backend that failed and why), or clear it (`backend` None) after a submit that
        certainly did not arrive. False when the job is no longer `received` (a callback moved it
        on, or it was cancelled): then nothing is submitted."""
        fields: dict[str, Any] = {
            "dispatch_intent": backend,
            "dispatch_intent_at": now_iso if backend else None,
            "fallback_from": fallback_from,
            "fallback_reason": fallback_reason,
            "updated_at": now_iso,
        }
        condition, names, values = "#state = :received", {"#state": "state"}, {":received": "received"}
        return self._update(job_id, fields, condition, names, values) is not None

    def claim_notification(self, job_id: str, now_iso: str) -> bool:
        """True exactly once per job: the caller then publishes."""
        result = self._update(
            job_id,
            {"notified_at": now_iso},
            "attribute_exists(job_id) AND attribute_not_exists(#n)",
            {"#n": "notified_at"},
            {},
        )
        return result is not None

    def release_notification(self, job_id: str) -> None:
        """Undo a claim whose publish failed, so a retry can notify. The job goes back into the
        unsettled index: another invocation may have settled it while this publish was failing."""
        self._update(
            job_id, {"notified_at": None, "unsettled": UNSETTLED}, "attribute_exists(job_id)", {}, {}
        )

    def overdue(self, state: str, dispatched_before_iso: str, limit: int = 100) -> list[str]:
        """Ids of jobs in `state` dispatched before the given time (oldest first)."""
        return self._query_ids(
            DEADLINE_INDEX,
            "#state = :s AND #d < :t",
            {"#state": "state", "#d": "dispatched_at"},
            {":s": state, ":t": dispatched_before_iso},
            limit,
        )

    def _query_ids(
        self, index: str, condition: str, names: dict[str, str], values: dict[str, Any], limit: int
    ) -> list[str]:
        """Job ids from one index query, following pages until `limit` (keys only: one read each)."""
        ids: list[str] = []
        kwargs: dict[str, Any] = {
            "TableName": self._table,
            "IndexName": index,
            "KeyConditionExpression": condition,
            "ExpressionAttributeNames": names,
            "ExpressionAttributeValues": _wire(values),
        }
        while len(ids) < limit:
            page = self._client.query(**kwargs, Limit=limit - len(ids))
            ids.extend(str(_unwire(item)["job_id"]) for item in page.get("Items", []))
            if "LastEvaluatedKey" not in page:
                break
            kwargs["ExclusiveStartKey"] = page["LastEvaluatedKey"]
        return ids[:limit]

    # ------------------------------------------------------------------ settling finished jobs
    def mark_status_written(self, job_id: str, now_iso: str) -> None:
        """Record when the terminal status.json was first written (only a terminal job has one)."""
        try:
            self._client.update_item(
                TableName=self._table,
                Key=_wire({"job_id": job_id}),
                UpdateExpression="SET #w = if_not_exists(#w, :now)",
                ConditionExpression="attribute_exists(job_id)",
                ExpressionAttributeNames={"#w": "status_written_at"},
                ExpressionAttributeValues=_wire({":now": now_iso}),
            )
        except ClientError as exc:
            if not _conditional_failed(exc):
                raise

    def settle(self, job_id: str) -> bool:
        """Drop the job from the unsettled index once it is notified and its terminal status is
        written; False while something is still missing."""
        result = self._update(
            job_id,
            {"unsettled": None},
            "attribute_exists(#n) AND attribute_exists(#w)",
            {"#n": "notified_at", "#w": "status_written_at"},
            {},
        )
        return result is not None

    def unsettled_terminal(self, limit: int = 100) -> list[str]:
        """Finished jobs whose notification or terminal status.json is missing (oldest id first).
        Reads only those: the index holds nothing else."""
        return self._query_ids(UNSETTLED_INDEX, "#u = :u", {"#u": "unsettled"}, {":u": UNSETTLED}, limit)

    # ------------------------------------------------------------------ backend capacity
    def outstanding_ids(self, backend: str) -> set[str]:
        """Jobs dispatched/running at `backend`, from the index (eventually consistent)."""
        ids: set[str] = set()
        for state in OUTSTANDING_STATES:
            kwargs: dict[str, Any] = {
                "TableName": self._table,
                "IndexName": BACKEND_INDEX,
                "KeyConditionExpression": "#b = :b AND #s = :s",
                "ExpressionAttributeNames": {"#b": "backend", "#s": "state"},
                "ExpressionAttributeValues": _wire({":b": backend, ":s": state}),
            }
            while True:
                page = self._client.query(**kwargs)
                ids.update(str(_unwire(item)["job_id"]) for item in page.get("Items", []))
                if "LastEvaluatedKey" not in page:
                    break
                kwargs["ExclusiveStartKey"] = page["LastEvaluatedKey"]
        return ids

    def outstanding(self, backend: str) -> int:
        """How many jobs are dispatched/running at `backend` (what ingest compares to capacity)."""
        return len(self.outstanding_ids(backend))

    def admit(self, backend: str, job_id: str, capacity: int, now: int, hold_s: int) -> bool:
        """Take one of `capacity` places at `backend` for `job_id`; False when all are taken.

        The index alone would let two ingest invocations both see one free place, and it lags
        writes: so each admission is also written to a per-backend record under optimistic
        locking (a version), and counted from there until the job shows in the index (at most
        `hold_s`). Admitting a job that already has a place (a duplicate delivery) is True.
        """
        key = _wire({"job_id": _ADMISSION_KEY.format(backend=backend)})
        for _ in range(ADMISSION_RETRIES):
            item = self._client.get_item(TableName=self._table, Key=key, ConsistentRead=True).get("Item")
            record = _unwire(item) if item else {}
            version = int(record.get("version", 0))
            recent = {
                str(j): int(t) for j, t in dict(record.get("recent") or {}).items() if now - int(t) < hold_s
            }
            if job_id in recent:
                return True
            taken = self.outstanding_ids(backend)
            if job_id in taken:
                return True
            taken |= self._still_admitted(backend, set(recent) - taken, now)
            if len(taken) >= capacity:
                return False
            recent = {j: t for j, t in recent.items() if j in taken}
            recent[job_id] = now
            try:
                self._client.put_item(
                    TableName=self._table,
                    Item={**key, **_wire({"version": version + 1, "recent": recent})},
                    ConditionExpression="attribute_not_exists(job_id) OR version = :v",
                    ExpressionAttributeValues=_wire({":v": version}),
                )
            except ClientError as exc:
                if _conditional_failed(exc):
                    continue  # another admission won the race: count again
                raise
            return True
        return False  # heavy contention: the caller waits like for a full backend

    def _still_admitted(self, backend: str, ids: set[str], now: int) -> set[str]:
        """Recently admitted jobs not (yet) in the index that still hold their place: unless their
        record shows otherwise (finished, moved to the other backend, or back in `received`
        without a dispatch lease), they are being dispatched."""
        held = set(ids)
        pending = [_wire({"job_id": j}) for j in sorted(ids)]
        while pending:
            batch, pending = pending[:100], pending[100:]
            request: dict[str, Any] = {
                self._table: {
                    "Keys": batch,
                    "ConsistentRead": True,
                    "ProjectionExpression": "job_id, #s, #b, #l",
                    "ExpressionAttributeNames": {
                        "#s": "state",
                        "#b": "backend",
                        "#l": "dispatch_lease_until",
                    },
                }
            }
            while request:
                response = self._client.batch_get_item(RequestItems=request)
                for raw in response.get("Responses", {}).get(self._table, []):
                    job = _unwire(raw)
                    state, at = job.get("state"), job.get("backend")
                    leased = int(job.get("dispatch_lease_until") or 0) >= now
                    if (
                        state in TERMINAL
                        or (at is not None and at != backend)
                        or (state == "received" and not leased)
                    ):
                        held.discard(str(job["job_id"]))
                request = response.get("UnprocessedKeys") or {}
        return held

    def release_admission(self, backend: str, job_id: str) -> None:
        """Give back a place whose submit failed (best effort: it also expires by itself)."""
        try:
            self._client.update_item(
                TableName=self._table,
                Key=_wire({"job_id": _ADMISSION_KEY.format(backend=backend)}),
                UpdateExpression="REMOVE #r.#j ADD version :one",
                ConditionExpression="attribute_exists(#r)",
                ExpressionAttributeNames={"#r": "recent", "#j": job_id},
                ExpressionAttributeValues=_wire({":one": 1}),
            )
        except ClientError as exc:
            if not _conditional_failed(exc):
                raise

    # ------------------------------------------------------------------ what callbacks record
    def record_fal_request(self, job_id: str, request_id: str, now_iso: str) -> Job | None:
        """Record the fal request a verified delivery names, for a job waiting for its first fal
        delivery (dispatch intent fal, no fal request recorded yet); None when it is not waiting."""
        return self._update(
            job_id,
            {"backend": "fal", "backend_call_id": request_id, "updated_at": now_iso},
            "attribute_exists(job_id) AND #intent = :fal AND #state IN (:r, :d, :run)"
            " AND (attribute_not_exists(#call) OR #backend <> :fal)",
            {
                "#intent": "dispatch_intent",
                "#state": "state",
                "#call": "backend_call_id",
                "#backend": "backend",
            },
            {":fal": "fal", ":r": "received", ":d": "dispatched", ":run": "running"},
        )

    def record_gpu_attempt(self, job_id: str, attempt: int, now_iso: str) -> Job | None:
        """Raise `gpu_attempt` to `attempt` (never lower it); None when a newer attempt is recorded."""
        return self._update(
            job_id,
            {"gpu_attempt": attempt, "updated_at": now_iso},
            "attribute_exists(job_id) AND (attribute_not_exists(#a) OR #a <= :a)",
            {"#a": "gpu_attempt"},
            {":a": attempt},
        )

    def advance_progress(
        self, job_id: str, progress: dict[str, int], attempt: int, now_iso: str
    ) -> Job | None:
        """Job → running with `progress`, only if it is further than the progress recorded (in
        thousandths of the run, `progress_permille`) and no newer GPU attempt is recorded; None when
        not (progress never goes backwards, whatever order callbacks arrive in)."""
        step, total = int(progress["step"]), max(int(progress["total"]), 1)
        permille = min(1000, step * 1000 // total)
        return self._update(
            job_id,
            {
                "state": "running",
                "progress": progress,
                "progress_permille": permille,
                "gpu_attempt": attempt,
                "updated_at": now_iso,
            },
            "#state IN (:r, :d, :run) AND (attribute_not_exists(#a) OR #a <= :a)"
            " AND (attribute_not_exists(#p) OR #p < :p)",
            {"#state": "state", "#a": "gpu_attempt", "#p": "progress_permille"},
            {":r": "received", ":d": "dispatched", ":run": "running", ":a": attempt, ":p": permille},
        )
