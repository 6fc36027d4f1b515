"""The real-shaped sample events in events/ go through the handlers' parsing unchanged."""

import json
from pathlib import Path

import ingest
import pytest
import webhook
from vap_shared.ingest_logic import Ingestor, parse_sqs_body
from vap_testkit import call, stack

EVENTS = Path(__file__).resolve().parents[2] / "events"


def load(name):
    path = EVENTS / name
    if not path.exists():
        pytest.skip(f"{name} not present")
    return json.loads(path.read_text())


@pytest.mark.parametrize("name", ["s3-sqs-put.json", "s3-sqs-put-moto.json"])
def test_put_events_parse(name):
    event = load(name)
    (parsed,) = parse_sqs_body(event["Records"][0]["body"])
    assert parsed.key.startswith("inbox/") and parsed.key.endswith(".json") and "%" not in parsed.key
    assert parsed.etag and parsed.bucket
    if name == "s3-sqs-put.json":
        assert parsed.sequencer


def test_test_event_is_skipped():
    assert parse_sqs_body(load("s3-sqs-testevent.json")["Records"][0]["body"]) == []


@pytest.mark.parametrize("name", ["s3-sqs-put.json", "s3-sqs-testevent.json"])
def test_events_for_another_bucket_are_acknowledged(monkeypatch, name):
    event = load(name)
    with stack(monkeypatch) as st:
        ingest._ingestor = Ingestor(st.runtime)
        assert call(ingest.handler, event) == {"batchItemFailures": []}
        assert st.job_ids() == []
    ingest.reset()


@pytest.mark.parametrize("name", ["function-url-gpu-callback.json", "function-url-fal-webhook.json"])
def test_sample_callbacks_with_placeholder_signatures_are_401(monkeypatch, name):
    event = load(name)
    with stack(monkeypatch) as st:
        webhook._runtime = st.runtime
        response = call(webhook.handler, event)
        assert response["statusCode"] == 401
    webhook.reset()
