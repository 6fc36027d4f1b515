import boto3
import pytest
from moto import mock_aws
from vap_shared.config import Settings
from vap_shared.job_store import JobStore
from vap_shared.jobs import Job
from vap_shared.naming import job_id, output_keys, output_prefix, parse_event_time, sidecar_name
from vap_shared.settings_parser import SettingsError
from vap_shared.urls import host_matches

NOW = "2026-11-25T18:00:00.000000Z"


@pytest.fixture
def store(monkeypatch):
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "t")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "t")
    with mock_aws():
        ddb = boto3.client("dynamodb", region_name="us-east-1")
        ddb.create_table(
            TableName="jobs",
            KeySchema=[{"AttributeName": "job_id", "KeyType": "HASH"}],
            AttributeDefinitions=[{"AttributeName": "job_id", "AttributeType": "S"}],
            BillingMode="PAY_PER_REQUEST",
        )
        yield JobStore(ddb, "jobs")


def test_create_is_conditional(store):
    assert store.create(Job(job_id="j", received_at=NOW))
    assert not store.create(Job(job_id="j", received_at=NOW, name="other"))
    assert store.get("j").name == ""


def test_transitions_never_leave_a_terminal_state(store):
    store.create(Job(job_id="j"))
    assert store.transition("j", "dispatched", {"backend": "modal"}, NOW).state == "dispatched"
    assert store.transition("j", "running", {"progress": {"step": 1, "total": 2}}, NOW).progress["step"] == 1
    assert store.transition("j", "succeeded", {"seed": 5}, NOW).seed == 5
    for target in ("received", "dispatched", "running", "failed"):
        if target == "received":
            continue
        assert store.transition("j", target, {}, NOW) is None
    assert store.get("j").state == "succeeded"
    assert store.transition("missing", "running", {}, NOW) is None


def test_initial_dispatch_only_from_received(store):
    store.create(Job(job_id="j"))
    store.transition("j", "running", {}, NOW)
    assert store.transition("j", "dispatched", {}, NOW, sources=("received",)) is None
    assert store.update_fields("j", {"backend_call_id": "c"}, NOW, only_if_absent="backend_call_id")
    assert store.update_fields("j", {"backend_call_id": "d"}, NOW, only_if_absent="backend_call_id") is None
    assert store.get("j").backend_call_id == "c"


def test_notification_is_claimed_once(store):
    store.create(Job(job_id="j"))
    assert store.claim_notification("j", NOW)
    assert not store.claim_notification("j", NOW)
    store.release_notification("j")
    assert store.claim_notification("j", NOW)


def test_dispatch_lease(store):
    store.create(Job(job_id="j"))
    assert store.acquire_dispatch_lease("j", now=100, seconds=60)
    assert not store.acquire_dispatch_lease("j", now=120, seconds=60)
    assert store.acquire_dispatch_lease("j", now=161, seconds=60)  # expired: a stuck job is re-taken
    store.release_dispatch_lease("j")
    assert store.acquire_dispatch_lease("j", now=162, seconds=60)
    store.transition("j", "dispatched", {}, NOW)
    assert not store.acquire_dispatch_lease("j", now=10_000, seconds=60)


def test_nested_values_roundtrip(store):
    errors = [{"field": None, "message": "x"}, {"field": "fps", "message": "y"}]
    settings = {"guidance_scale": 5.5, "seed": None, "prompt": "p"}
    store.create(Job(job_id="j", settings=settings, errors=errors, expires_at=123))
    job = store.get("j")
    assert job.settings == settings and job.errors == errors and job.expires_at == 123


def test_job_id_and_names():
    t = parse_event_time("2026-11-25T18:23:01.123Z")
    a = job_id(t, "b", "inbox/x.json", '"abc"', "001")
    assert a == job_id(t, "b", "inbox/x.json", "abc", "001")  # quotes do not matter
    assert a != job_id(t, "b", "inbox/x.json", "abc", "002")
    assert a.startswith("20261125T182301Z-") and len(a.split("-")[1]) == 10
    assert sidecar_name("inbox/balloon/horse.json", "inbox/") == "balloon/horse"
    prefix = output_prefix("outputs/", "balloon/horse", a)
    assert output_keys(prefix)["video"] == f"outputs/balloon/horse/{a}/video.mp4"


def test_timings():
    job = Job(
        job_id="j",
        received_at="2026-11-25T18:00:00.000000Z",
        dispatched_at="2026-11-25T18:00:01.500000Z",
        completed_at="2026-11-25T18:01:01.500000Z",
    )
    assert (
        job.timings()["queue_s"] == 1.5
        and job.timings()["generation_s"] == 60
        and job.timings()["total_s"] == 61.5
    )


def test_settings_from_env():
    env = {
        "BUCKET_NAME": "b",
        "JOBS_TABLE": "t",
        "TOPIC_ARN": "arn",
        "ALLOWED_MEDIA_HOSTS": " A.com, *.b.org ,",
    }
    s = Settings.from_env(env)
    assert s.allowed_media_hosts == ("a.com", "*.b.org") and s.inbox_prefix == "inbox/"
    assert s.fal_queue_url == "https://queue.fal.run" and not s.allow_http_loopback
    with pytest.raises(SettingsError, match="missing environment variables: JOBS_TABLE, TOPIC_ARN"):
        Settings.from_env({"BUCKET_NAME": "b"})
    with pytest.raises(SettingsError, match="DEFAULT_BACKEND must be one of auto, modal, fal, got 'gpu'"):
        Settings.from_env({**env, "DEFAULT_BACKEND": "gpu"})
    with pytest.raises(
        SettingsError, match="MAX_SIDECAR_BYTES must be a whole number of at least 1, got 'lots'"
    ):
        Settings.from_env({**env, "MAX_SIDECAR_BYTES": "lots"})


def test_host_wildcards():
    assert host_matches("v3.fal.media", ["*.fal.media"])
    assert host_matches("a.b.fal.media", ["*.fal.media"])
    assert not host_matches("fal.media", ["*.fal.media"])
    assert not host_matches("evilfal.media", ["*.fal.media"])
    assert host_matches("STORAGE.googleapis.com", ["storage.googleapis.com"])


def test_cancelled_is_terminal_and_entered_from_live_states() -> None:
    from vap_shared.jobs import TERMINAL, Job, can_transition

    assert "cancelled" in TERMINAL and Job(job_id="j", state="cancelled").terminal
    for source in ("received", "dispatched", "running"):
        assert can_transition(source, "cancelled")
    for source in ("succeeded", "failed", "cancelled"):
        assert not can_transition(source, "cancelled")
    assert not can_transition("cancelled", "running")
