import hashlib
import time

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st
from vap_shared.fal_webhook import JwksCache, parse_jwks, signed_message, verify_fal_webhook
from vap_shared.signing import SignatureError, derive_callback_key, sign_callback, verify_callback
from vap_testkit import FalKeys


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def cache_for(*key_sets: FalKeys, clock=None):
    served = {"i": 0, "fetches": 0}

    def fetch():
        served["fetches"] += 1
        keys = key_sets[min(served["i"], len(key_sets) - 1)]
        return keys.jwks()

    cache = JwksCache(fetch, clock=clock or Clock())
    return cache, served


def test_signed_message_format():
    body = b'{"a":1}'
    assert signed_message("r", "u", "123", body) == f"r\nu\n123\n{hashlib.sha256(body).hexdigest()}".encode()


def test_fal_verification_accepts_a_good_signature_and_caches_jwks():
    keys = FalKeys()
    cache, served = cache_for(keys)
    body = b'{"status":"OK"}'
    for _ in range(3):
        assert verify_fal_webhook(keys.headers("req-1", body), body, cache) == "req-1"
    assert served["fetches"] == 1


def test_any_key_in_the_jwks_may_verify():
    old, new = FalKeys(), FalKeys()
    both = {"keys": old.jwks()["keys"] + new.jwks()["keys"]}
    cache = JwksCache(lambda: both)
    body = b"{}"
    assert verify_fal_webhook(new.headers("r", body), body, cache) == "r"
    assert verify_fal_webhook(old.headers("r", body), body, cache) == "r"


def test_rotated_key_triggers_one_refetch_rate_limited():
    old, new = FalKeys(), FalKeys()
    clock = Clock()
    cache, served = cache_for(old, new, clock=clock)
    body = b"{}"
    verify_fal_webhook(old.headers("r", body), body, cache)
    served["i"] = 1  # fal rotates
    clock.now += 120
    assert verify_fal_webhook(new.headers("r", body), body, cache) == "r"
    assert served["fetches"] == 2
    # Forged signatures cannot make us hammer the JWKS endpoint.
    forger = FalKeys()
    for _ in range(5):
        with pytest.raises(SignatureError):
            verify_fal_webhook(forger.headers("r", body), body, cache)
    assert served["fetches"] == 2


def test_jwks_expires_after_24h():
    keys = FalKeys()
    clock = Clock()
    cache, served = cache_for(keys, clock=clock)
    cache.keys()
    clock.now += 24 * 3600 + 1
    cache.keys()
    assert served["fetches"] == 2


@pytest.mark.parametrize(
    "case", ["stale", "future", "garbled", "short", "missing", "other_body", "other_request"]
)
def test_fal_verification_rejections(case):
    keys = FalKeys()
    cache, _ = cache_for(keys)
    body = b'{"x":1}'
    headers = keys.headers("req-1", body)
    if case == "stale":
        headers = keys.headers("req-1", body, now=time.time() - 301)
    elif case == "future":
        headers = keys.headers("req-1", body, now=time.time() + 301)
    elif case == "garbled":
        headers["x-fal-webhook-signature"] = "zz" * 64
    elif case == "short":
        headers["x-fal-webhook-signature"] = headers["x-fal-webhook-signature"][:-2]
    elif case == "missing":
        del headers["x-fal-webhook-user-id"]
    elif case == "other_body":
        body = b'{"x":2}'
    elif case == "other_request":
        headers["x-fal-webhook-request-id"] = "req-2"
    with pytest.raises(SignatureError):
        verify_fal_webhook(headers, body, cache)


def test_jwks_parsing_skips_foreign_keys():
    keys = FalKeys().jwks()["keys"]
    doc = {
        "keys": [{"kty": "RSA", "n": "x"}, {"kty": "OKP", "crv": "X25519", "x": "abc"}, {"kty": "OKP"}, *keys]
    }
    assert len(parse_jwks(doc)) == 1
    assert parse_jwks("nonsense") == []


def test_jwks_parsing_skips_malformed_ed25519_keys():
    good = FalKeys().jwks()["keys"][0]
    short = {**good, "x": good["x"][:-4]}  # 29 bytes: not an Ed25519 public key
    garbled = {**good, "x": "!!not-base64!!"}
    assert len(parse_jwks({"keys": [short, garbled, good]})) == 1


# ------------------------------------------------------------------------- properties

_fal_keys = FalKeys()
_fal_cache = JwksCache(_fal_keys.jwks)


@settings(max_examples=60, deadline=None)
@given(body=st.binary(max_size=200), flip=st.integers(min_value=0, max_value=10_000))
def test_fal_any_body_change_breaks_the_signature(body, flip):
    headers = _fal_keys.headers("req", body)
    assert verify_fal_webhook(headers, body, _fal_cache) == "req"
    changed = bytearray(body or b"\x00")
    changed[flip % len(changed)] ^= 0x01
    if bytes(changed) != body:
        with pytest.raises(SignatureError):
            verify_fal_webhook(headers, bytes(changed), _fal_cache)


@settings(max_examples=60, deadline=None)
@given(
    ts=st.text(max_size=20),
    sig=st.text(max_size=140),
    body=st.binary(max_size=64),
)
def test_fal_garbage_headers_never_crash(ts, sig, body):
    headers = {
        "x-fal-webhook-request-id": "r",
        "x-fal-webhook-user-id": "u",
        "x-fal-webhook-timestamp": ts,
        "x-fal-webhook-signature": sig,
    }
    with pytest.raises(SignatureError):
        verify_fal_webhook(headers, body, _fal_cache)


@settings(max_examples=100, deadline=None)
@given(
    secret=st.binary(min_size=1, max_size=64),
    job_id=st.text(min_size=1, max_size=40),
    body=st.binary(max_size=200),
    skew=st.integers(min_value=-300, max_value=300),
)
def test_hmac_roundtrip_within_the_window(secret, job_id, body, skew):
    key = derive_callback_key(secret, job_id)
    now = 1_800_000_000
    header = sign_callback(key, now + skew, body)
    verify_callback(key, str(now + skew), header, body, now=now)
    with pytest.raises(SignatureError):
        verify_callback(derive_callback_key(secret, job_id + "x"), str(now + skew), header, body, now=now)
    with pytest.raises(SignatureError):
        verify_callback(key, str(now + skew), header, body + b"!", now=now)


@settings(max_examples=100, deadline=None)
@given(ts=st.text(max_size=16), sig=st.text(max_size=80))
def test_hmac_garbage_headers_never_crash(ts, sig):
    key = derive_callback_key(b"s", "j")
    with pytest.raises(SignatureError):
        verify_callback(key, ts, sig, b"{}", now=1_800_000_000)


def test_ed25519_signatures_of_a_foreign_key_do_not_verify():
    keys = FalKeys()
    cache = JwksCache(keys.jwks)
    body = b"{}"
    headers = keys.headers("r", body)
    other = Ed25519PrivateKey.generate()
    message = signed_message("r", "user-1", headers["x-fal-webhook-timestamp"], body)
    headers["x-fal-webhook-signature"] = other.sign(message).hex()
    with pytest.raises(SignatureError):
        verify_fal_webhook(headers, body, cache)
