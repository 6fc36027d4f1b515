"""DynamoDB adapter for job records: conditional create, transitions, notify-once."""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

from boto3.dynamodb.types import TypeDeserializer, TypeSerializer
from botocore.exceptions import ClientError

from .jobs import ALLOWED_FROM, Job

# Nested values are stored as JSON strings: no float→Decimal conversions, and the record
# stays readable in the console.
_JSON_FIELDS = ("settings", "inputs", "fal_urls", "progress", "errors")


# Sparse-by-state GSI the sweeper queries: partition `state`, sort `dispatched_at` (ISO-8601 UTC,
# sorts as time). Only items that have `dispatched_at` are in it, and a query reads one state.
DEADLINE_INDEX = "state-dispatched_at"

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

        A terminal state is never left because no state lists a terminal one as its source.
        """
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
        """Undo a claim whose publish failed, so a retry can notify."""
        self._update(job_id, {"notified_at": None}, "attribute_exists(job_id)", {}, {})

    def overdue(
        self,
        state: str,
        dispatched_before_iso: str,
        limit: int = 100,
        dispatched_after_iso: str | None = None,
        unnotified_only: bool = False,
    ) -> list[str]:
        """Ids of jobs in `state` dispatched before the given time (oldest first); optionally only
        those dispatched after a lower bound and never notified (the index projects `notified_at`)."""
        ids: list[str] = []
        values: dict[str, Any] = {":s": state, ":t": dispatched_before_iso}
        if dispatched_after_iso is not None:
            condition = "#state = :s AND #d BETWEEN :f AND :t"
            values[":f"] = dispatched_after_iso
        else:
            condition = "#state = :s AND #d < :t"
        names = {"#state": "state", "#d": "dispatched_at"}
        kwargs: dict[str, Any] = {
            "TableName": self._table,
            "IndexName": DEADLINE_INDEX,
            "KeyConditionExpression": condition,
            "ExpressionAttributeNames": names,
            "ExpressionAttributeValues": _wire(values),
        }
        if unnotified_only:
            kwargs["FilterExpression"] = "attribute_not_exists(#n)"
            names["#n"] = "notified_at"
        while len(ids) < limit:
            page = self._client.query(**kwargs, Limit=limit)
            ids.extend(str(_unwire(item)["job_id"]) for item in page.get("Items", []))
            if "LastEvaluatedKey" not in page:
                break
            kwargs["ExclusiveStartKey"] = page["LastEvaluatedKey"]
        return ids[:limit]
