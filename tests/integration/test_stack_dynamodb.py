"""DynamoDB on the local stack applies a conditional write atomically, as DynamoDB does: the
service's idempotency (the dispatch lease, the result and notification claims) rests on it."""

from __future__ import annotations

import threading
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest

from local_stack import LocalStack

pytestmark = pytest.mark.stack

WRITERS = 6
ITEMS = 40


def test_racing_conditional_puts_let_exactly_one_writer_win(stack: LocalStack) -> None:
    ddb = stack.client("dynamodb")
    table = f"race-{uuid.uuid4().hex[:8]}"
    ddb.create_table(
        TableName=table,
        KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"}],
        AttributeDefinitions=[{"AttributeName": "pk", "AttributeType": "S"}],
        BillingMode="PAY_PER_REQUEST",
    )
    start = threading.Barrier(WRITERS)

    def claim(writer: int) -> list[str]:
        won = []
        start.wait()
        for item in range(ITEMS):
            try:
                ddb.put_item(
                    TableName=table,
                    Item={"pk": {"S": f"job-{item}"}, "writer": {"N": str(writer)}},
                    ConditionExpression="attribute_not_exists(pk)",
                )
                won.append(f"job-{item}")
            except ddb.exceptions.ConditionalCheckFailedException:
                pass
        return won

    try:
        with ThreadPoolExecutor(WRITERS) as pool:
            claims = [key for won in pool.map(claim, range(WRITERS)) for key in won]
        assert sorted(claims) == sorted(f"job-{item}" for item in range(ITEMS))
    finally:
        ddb.delete_table(TableName=table)
