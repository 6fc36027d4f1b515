"""The store queue and function in template.yaml: encrypted, its own dead-letter queue (alarmed), a
visibility timeout of at least 6 x the function's timeout, partial batch failures, and the last
receive the function knows of is the queue's."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import store
from vap_shared.result_store import MIN_DOWNLOAD_S, STORE_RESERVE_S

from local_stack.cfn import Template, load_template

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def sam() -> Template:
    return load_template(ROOT / "template.yaml")


def _props(sam: Template, logical_id: str) -> dict[str, Any]:
    return dict(sam["Resources"][logical_id]["Properties"])


def test_the_store_queue_is_encrypted_redriven_and_outlasts_six_timeouts(sam: Template) -> None:
    queue, dlq, function = (_props(sam, n) for n in ("StoreQueue", "StoreDeadLetterQueue", "StoreFunction"))
    assert queue["SqsManagedSseEnabled"] is True and dlq["SqsManagedSseEnabled"] is True
    assert queue["RedrivePolicy"]["deadLetterTargetArn"] == {"Fn::GetAtt": ["StoreDeadLetterQueue", "Arn"]}
    assert queue["VisibilityTimeout"] >= 6 * function["Timeout"]
    receives = queue["RedrivePolicy"]["maxReceiveCount"]
    assert int(function["Environment"]["Variables"]["STORE_MAX_RECEIVE_COUNT"]) == receives
    (source,) = function["Events"].values()
    assert source["Type"] == "SQS" and source["Properties"]["Queue"] == {"Fn::GetAtt": ["StoreQueue", "Arn"]}
    assert source["Properties"]["FunctionResponseTypes"] == ["ReportBatchItemFailures"]
    assert source["Properties"]["BatchSize"] == 1


def test_every_limit_inside_the_store_function_is_below_its_timeout(sam: Template) -> None:
    timeout_s = _props(sam, "StoreFunction")["Timeout"]
    # A record starts only with room for a download of MIN_DOWNLOAD_S and the reserve after it,
    # and that room is less than a whole invocation.
    assert store.MIN_START_MS == (STORE_RESERVE_S + MIN_DOWNLOAD_S) * 1000 < timeout_s * 1000
    # A retried record comes back before the queue's visibility timeout would return it.
    assert _props(sam, "StoreQueue")["VisibilityTimeout"] > store.RETRY_MAX_S


def test_the_store_dead_letter_queue_and_function_are_alarmed(sam: Template) -> None:
    alarms = {
        logical_id: r["Properties"]
        for logical_id, r in sam["Resources"].items()
        if r["Type"] == "AWS::CloudWatch::Alarm"
    }
    dlq = alarms["StoreDeadLetterAlarm"]
    assert dlq["Dimensions"] == [
        {"Name": "QueueName", "Value": {"Fn::GetAtt": ["StoreDeadLetterQueue", "QueueName"]}}
    ]
    for kind in ("Errors", "Throttles"):
        alarm = alarms[f"Store{kind}Alarm"]
        assert alarm["MetricName"] == kind
        assert alarm["Dimensions"] == [{"Name": "FunctionName", "Value": {"Ref": "StoreFunction"}}]
