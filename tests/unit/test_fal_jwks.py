"""fal webhook keys and sender.

fal's docs promise only the `x` field of a JWKS entry (a 32-byte Ed25519 public key, base64url)
and fal's own verifier tries every key: an entry is used unless `kty`/`crv` say it is not Ed25519.
With `FalUserId` set, a delivery for any other fal user id is refused (fal signs every account's
webhooks with the same keys, so a valid signature alone does not say the request was ours).
"""

from __future__ import annotations

import json
from typing import Any

import ingest
import pytest
import webhook
from vap_shared import routes
from vap_shared.fal_webhook import JwksCache, parse_jwks, verify_fal_webhook
from vap_shared.signing import SignatureError
from vap_testkit import FalKeys, call, handlers_on, sqs_event, stack, upload_fal_example, url_event

BODY = b'{"request_id": "r", "status": "OK"}'


def entry(keys: FalKeys, **fields: Any) -> dict[str, Any]:
    """A JWKS entry for `keys` with exactly `fields` besides `x` (None drops a field)."""
    base = {**keys.jwks()["keys"][0], **fields}
    return {k: v for k, v in base.items() if v is not None}


@pytest.mark.parametrize(
    "fields",
    [
        {"kty": None, "crv": None},  # only `x`: all fal promises
        {"kty": "OKP", "crv": None},
        {"kty": None, "crv": "Ed25519"},
        {"kid": "fal-2026", "use": "sig", "alg": "EdDSA"},
    ],
    ids=["x-only", "no-crv", "no-kty", "extra-fields"],
)
def test_an_entry_with_a_32_byte_x_verifies_without_kty_or_crv(fields: dict[str, Any]) -> None:
    keys = FalKeys()
    cache = JwksCache(lambda: {"keys": [entry(keys, **fields)]})
    assert verify_fal_webhook(keys.headers("r", BODY), BODY, cache) == "r"


def test_every_usable_key_is_tried() -> None:
    other, signer = FalKeys(), FalKeys()
    document = {"keys": [entry(other), entry(signer, kty=None, crv=None)]}
    assert len(parse_jwks(document)) == 2
    assert verify_fal_webhook(signer.headers("r", BODY), BODY, JwksCache(lambda: document)) == "r"


@pytest.mark.parametrize(
    "fields",
    [{"kty": "RSA"}, {"kty": "EC", "crv": "P-256"}, {"crv": "X25519"}, {"kty": "OKP", "crv": "Ed448"}],
    ids=["rsa", "ec", "x25519", "ed448"],
)
def test_entries_that_say_they_are_not_ed25519_are_skipped(fields: dict[str, Any]) -> None:
    assert parse_jwks({"keys": [entry(FalKeys(), **fields)]}) == []


def test_an_x_that_is_not_32_bytes_is_skipped() -> None:
    x = entry(FalKeys(), kty=None, crv=None)["x"]
    assert parse_jwks({"keys": [{"x": x[:-4]}, {"x": x + "AAAA"}, {"x": 32}, {"y": x}]}) == []
    assert len(parse_jwks({"keys": [{"x": x}]})) == 1


def test_a_pinned_user_id_refuses_other_users_deliveries() -> None:
    keys = FalKeys()
    cache = JwksCache(keys.jwks)
    headers = keys.headers("r", BODY, user="someone-else")
    assert verify_fal_webhook(headers, BODY, cache) == "r"  # validly signed by fal, for another user
    with pytest.raises(SignatureError, match="another fal user"):
        verify_fal_webhook(headers, BODY, cache, expected_user_id="our-user")
    ours = keys.headers("r", BODY, user="our-user")
    assert verify_fal_webhook(ours, BODY, cache, expected_user_id="our-user") == "r"


@pytest.mark.parametrize(
    ("pinned", "sender", "status"),
    [("our-user", "someone-else", 401), ("our-user", "our-user", 200), ("", "anyone", 200)],
)
def test_the_webhook_answers_401_to_another_fal_user_when_fal_user_id_is_set(
    monkeypatch: pytest.MonkeyPatch, pinned: str, sender: str, status: int
) -> None:
    with stack(monkeypatch, FAL_USER_ID=pinned) as st, handlers_on(st):
        call(ingest.handler, sqs_event(upload_fal_example(st, backend="fal")))
        (job_id,) = st.job_ids()
        job = st.store.get(job_id)
        delivery = {"request_id": job.backend_call_id, "status": "ERROR", "error": "boom"}
        body = json.dumps(delivery).encode()
        headers = st.services.fal_keys.headers(job.backend_call_id, body, user=sender)
        response = call(webhook.handler, url_event(routes.path("fal", job_id), body, headers))
        assert response["statusCode"] == status
        assert st.store.get(job_id).state == ("dispatched" if status == 401 else "failed")
