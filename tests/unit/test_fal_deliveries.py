"""Which fal deliveries count: fal signs every account's webhooks with the same keys, so a valid
signature is not enough. A delivery counts for the fal request recorded on the job, or, while none is
recorded, when it reaches the job's webhook URL with its token (only we and fal know it) and the job
is being dispatched to fal."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import ingest
import pytest
import webhook
from vap_shared.fal_token import fal_webhook_token, token_matches
from vap_shared.signing import derive_callback_key
from vap_testkit import (
    SIGNING_SECRET,
    FakeServices,
    Stack,
    call,
    fal_token,
    fal_webhook_event,
    handlers_on,
    sqs_event,
    stack,
    upload_fal_example,
)

ATTACKER = "user-of-another-fal-account"


@pytest.fixture
def st(monkeypatch: pytest.MonkeyPatch) -> Iterator[Stack]:
    with stack(monkeypatch, FakeServices()) as s, handlers_on(s):
        yield s


def _job(st: Stack, backend: str = "fal") -> Any:
    call(ingest.handler, sqs_event(upload_fal_example(st, backend=backend)))
    (job_id,) = st.job_ids()
    return st.store.get(job_id)


def _set(st: Stack, job: Any, **values: str | None) -> Any:
    """Rewrite some of the job record's fields (None removes one), as another writer would."""
    sets = {k: v for k, v in values.items() if v is not None}
    removes = [k for k, v in values.items() if v is None]
    expression = ""
    if sets:
        expression = "SET " + ", ".join(f"#{k} = :{k}" for k in sets)
    if removes:
        expression += " REMOVE " + ", ".join(f"#{k}" for k in removes)
    st.store._client.update_item(
        TableName="vap-jobs",
        Key={"job_id": {"S": job.job_id}},
        UpdateExpression=expression.strip(),
        ExpressionAttributeNames={f"#{k}": k for k in values},
        **({"ExpressionAttributeValues": {f":{k}": {"S": v} for k, v in sets.items()}} if sets else {}),
    )
    return st.store.get(job.job_id)


def _waiting_for_capacity(st: Stack, job: Any) -> Any:
    """A job that has not been dispatched yet (`received`, no backend): as every job waiting for
    backend capacity is."""
    return _set(st, job, state="received", backend=None, backend_call_id=None, fal_urls=None)


def _delivery(request_id: str, url: str = "https://v3.fal.media/files/evil/theirs.mp4") -> bytes:
    return json.dumps(
        {
            "request_id": request_id,
            "gateway_request_id": request_id,
            "status": "OK",
            "payload": {"video": {"url": url, "content_type": "video/mp4"}},
        }
    ).encode()


def _post(st: Stack, job: Any, request_id: str, *, user: str = "user-1", token: str | None = "derive") -> int:
    body = _delivery(request_id)
    headers = st.services.fal_keys.headers(request_id, body, user=user)
    return int(call(webhook.handler, fal_webhook_event(job.job_id, body, headers, token))["statusCode"])


def _unchanged(st: Stack, before: Any) -> None:
    after = st.store.get(before.job_id)
    assert after.model_dump(exclude={"updated_at"}) == before.model_dump(exclude={"updated_at"})
    assert st.store_requests_waiting() == 0 and st.notifications() == []


def test_another_accounts_delivery_cannot_complete_a_job_waiting_for_capacity(st: Stack) -> None:
    """Correctly signed by fal (the same keys sign every account's webhooks), for the attacker's
    own request, sent to our webhook path of a job id they learned: refused, nothing recorded."""
    job = _waiting_for_capacity(st, _job(st))
    assert _post(st, job, "their-request", user=ATTACKER, token=None) == 401
    _unchanged(st, job)
    # Nor with a token they made up.
    assert _post(st, job, "their-request", user=ATTACKER, token="0" * 64) == 401
    _unchanged(st, job)


def test_another_accounts_delivery_cannot_complete_a_job_dispatched_to_fal(st: Stack) -> None:
    job = _job(st)
    assert job.backend == "fal" and job.backend_call_id
    assert _post(st, job, "their-request", user=ATTACKER, token=None) == 401
    assert (
        _post(st, job, "their-request", user=ATTACKER, token=fal_token("20991231T000000Z-0000000000")) == 401
    )
    _unchanged(st, job)


def test_a_delivery_for_the_recorded_request_counts_with_or_without_the_token(st: Stack) -> None:
    job = _job(st)
    # Without the token: a request made before the URL had one (only the recorded id counts).
    assert _post(st, job, job.backend_call_id, token=None) == 200
    assert st.store_requests_waiting() == 1
    assert _post(st, job, job.backend_call_id) == 200
    assert st.store_requests_waiting() == 2
    # Another request of ours for the job (a superseded submit) is ignored, token or not.
    assert _post(st, job, "another-of-ours") == 200 and st.store_requests_waiting() == 2


def test_a_delivery_overtaking_the_dispatch_write_records_the_request(st: Stack) -> None:
    """Ingest writes its intent to dispatch to fal before the submit; fal may answer before ingest
    records the request id. The delivery to the token URL is then the record."""
    job = _set(st, _waiting_for_capacity(st, _job(st)), dispatch_intent="fal")
    assert _post(st, job, "our-request") == 200
    recorded = st.store.get(job.job_id)
    assert (recorded.backend, recorded.backend_call_id) == ("fal", "our-request")
    assert st.store_requests_waiting() == 1
    # From now on only that request counts.
    assert _post(st, job, "a-second-request") == 200
    assert st.store.get(job.job_id).backend_call_id == "our-request" and st.store_requests_waiting() == 1


def test_a_token_delivery_for_a_job_not_being_dispatched_to_fal_is_not_recorded(st: Stack) -> None:
    # Not dispatched yet and no intent: fal is asked to deliver again later; nothing recorded.
    job = _waiting_for_capacity(st, _job(st))
    assert _post(st, job, "our-request") == 503
    _unchanged(st, job)
    # Being dispatched to Modal (a fallback from fal, say): an old fal delivery is stale.
    job = _set(st, job, dispatch_intent="modal", backend="modal", backend_call_id="fc-9", state="dispatched")
    assert _post(st, job, "our-request") == 200
    _unchanged(st, job)


def test_the_token_is_the_jobs_own_and_not_the_gpus_key() -> None:
    secret = SIGNING_SECRET.encode()
    one, other = "20261125T182301Z-0000000001", "20261125T182301Z-0000000002"
    token = fal_webhook_token(secret, one)
    assert len(token) == 64 and token != fal_webhook_token(secret, other)
    assert token != derive_callback_key(secret, one).hex()  # the GPU's key does not give it away
    assert token_matches(secret, one, token) and not token_matches(secret, other, token)
    assert not token_matches(secret, one, None) and not token_matches(secret, one, token[:-1] + "x")


def test_the_token_is_only_in_the_url_fal_gets(st: Stack) -> None:
    job = _job(st)
    (submit,) = st.services.calls("queue.fal.test")
    assert submit.url.params["fal_webhook"].endswith(f"?token={fal_token(job.job_id)}")
    assert _post(st, job, job.backend_call_id) == 200
    st.store_results()
    done = st.store.get(job.job_id)
    assert done.state == "succeeded"
    token = fal_token(job.job_id)
    written = [
        st.s3.get_object(Bucket="vap-test-bucket", Key=k)["Body"].read() for k in st.object_keys("outputs/")
    ]
    assert written and not [body for body in written if token.encode() in body]
    (note,) = st.notifications()
    assert token not in json.dumps(note) and token not in done.model_dump_json()


def test_the_fal_user_id_pin_still_refuses_other_accounts(monkeypatch: pytest.MonkeyPatch) -> None:
    with stack(monkeypatch, FakeServices(), FAL_USER_ID="user-1") as st, handlers_on(st):
        job = _job(st)
        assert _post(st, job, job.backend_call_id, user=ATTACKER) == 401
        assert _post(st, job, job.backend_call_id, user="user-1") == 200
