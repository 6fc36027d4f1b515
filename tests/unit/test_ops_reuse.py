"""vap_shared.reuse against emulated S3 and DynamoDB (moto): key, store and copy."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import pytest
from moto import mock_aws
from vap_shared.media import MediaRef
from vap_shared.reuse import (
    ITEM_PREFIX,
    NotReusable,
    ReuseEntry,
    ReuseStore,
    Target,
    copy_result,
    digest_bytes,
    digest_s3_object,
    key_for_job,
    reuse_key,
    reuse_or_none,
)

BUCKET = "vap-bucket"
TABLE = "jobs"
VIDEO = b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 4000  # ~1 MiB
IMAGE = b"\x89PNG\r\n\x1a\n" + b"pixels" * 1000
SETTINGS: dict[str, Any] = {
    "prompt": "A chestnut horse inflates like a balloon",
    "video_description": "A sneaker inflates into a sphere",
    "seed": 42,
    "num_frames": 49,
    "fps": 16,
    "enable_safety_checker": True,
    "aspect_ratio": "9:16",
    "resolution": "480p",
    "guidance_scale": 5.0,
}
EARLIER = "20261120T101010Z-0123456789"
LATER = "20261125T182301Z-3f9c0a1b2d"
NOW = "2026-11-25T18:23:02.000000Z"


@dataclass
class Env:
    s3: Any
    ddb: Any
    store: ReuseStore


@pytest.fixture
def env() -> Iterator[Env]:
    with mock_aws():
        s3 = boto3.client("s3", region_name="us-east-1")
        s3.create_bucket(Bucket=BUCKET)
        ddb = boto3.client("dynamodb", region_name="us-east-1")
        ddb.create_table(
            TableName=TABLE,
            AttributeDefinitions=[{"AttributeName": "job_id", "AttributeType": "S"}],
            KeySchema=[{"AttributeName": "job_id", "KeyType": "HASH"}],
            BillingMode="PAY_PER_REQUEST",
        )
        yield Env(s3, ddb, ReuseStore(ddb, TABLE))


def upload(env: Env, name: str, video: bytes = VIDEO, image: bytes = IMAGE) -> dict[str, MediaRef]:
    refs = {}
    for field, leaf, body in (("video_url", "clip.mp4", video), ("image_url", "horse.png", image)):
        key = f"inbox/{name}/{leaf}"
        env.s3.put_object(Bucket=BUCKET, Key=key, Body=body)
        refs[field] = MediaRef(field, "s3", leaf, BUCKET, key)
    return refs


def etags(env: Env, refs: dict[str, MediaRef]) -> dict[str, str]:
    return {f: env.s3.head_object(Bucket=BUCKET, Key=r.key)["ETag"] for f, r in refs.items()}


def key_of(env: Env, refs: dict[str, MediaRef], settings: dict[str, Any] = SETTINGS, **kw: Any) -> str:
    kw.setdefault("explicit_seed", True)
    return key_for_job(env.s3, settings, refs, etags=etags(env, refs), **kw)


def target(name: str, job_id: str) -> Target:
    return Target(job_id, name, BUCKET, f"inbox/{name}.json", f"outputs/{name}/{job_id}/")


def succeed_earlier(env: Env, key: str, name: str = "balloon/horse", poster: bool = True) -> ReuseEntry:
    """What the webhook does when the earlier job succeeds (phase 2 wires `record` there)."""
    prefix = f"outputs/{name}/{EARLIER}/"
    env.s3.put_object(Bucket=BUCKET, Key=prefix + "video.mp4", Body=b"\x00\x00\x00\x18ftypisom-generated")
    if poster:
        env.s3.put_object(Bucket=BUCKET, Key=prefix + "poster.jpg", Body=b"\xff\xd8jpeg")
    metadata = {
        "version": "1",
        "job_id": EARLIER,
        "sidecar_bucket": BUCKET,
        "sidecar_key": f"inbox/{name}.json",
        "name": name,
        "inputs": {"settings": SETTINGS, "media": {}},
        "seed": 42,
        "backend": "modal",
        "backend_call_id": "fc-1",
        "result": {"seed": 42, "gpu": "NVIDIA H100", "timings": {"total_s": 230.0}},
        "output_key": prefix + "video.mp4",
        "bytes": 24,
        "timings": {"queue_s": 0.4, "generation_s": 231.0},
        "video": {
            "url": "https://expired",
            "content_type": "video/mp4",
            "file_name": "x.mp4",
            "file_size": 24,
        },
        "cost": {"total": 0.25},
    }
    env.s3.put_object(Bucket=BUCKET, Key=prefix + "metadata.json", Body=json.dumps(metadata).encode())
    entry = ReuseEntry(
        key=key,
        job_id=EARLIER,
        output_key=prefix + "video.mp4",
        metadata_key=prefix + "metadata.json",
        bytes=24,
        backend="modal",
        created_at="2026-11-20T10:14:00.000000Z",
        files=("poster.jpg",) if poster else (),
    )
    assert env.store.record(entry, expires_at=1_900_000_000)
    return entry


def body(env: Env, key: str) -> bytes:
    return bytes(env.s3.get_object(Bucket=BUCKET, Key=key)["Body"].read())


# ---------------------------------------------------------------------------------------------- scenarios


def test_identical_resubmission_under_another_name_reuses(env: Env) -> None:
    first = key_of(env, upload(env, "balloon/horse"))
    earlier = succeed_earlier(env, first)
    again = key_of(env, upload(env, "other/copy"))  # same bytes, other keys, other sidecar name
    assert again == first
    new = target("other/copy", LATER)
    found = reuse_or_none(env.s3, env.store, BUCKET, again, new, NOW, cost={"total": 0.0006})
    assert found is not None
    entry, copied = found
    assert entry == earlier
    assert copied.output_key == f"outputs/other/copy/{LATER}/video.mp4"
    assert body(env, copied.output_key) == body(env, earlier.output_key)
    assert copied.files == {"poster.jpg": f"outputs/other/copy/{LATER}/poster.jpg"}
    assert body(env, copied.files["poster.jpg"]) == b"\xff\xd8jpeg"
    meta = json.loads(body(env, copied.metadata_key))
    assert meta["reused_from"] == EARLIER and meta["job_id"] == LATER
    assert meta["name"] == "other/copy" and meta["sidecar_key"] == "inbox/other/copy.json"
    assert meta["output_key"] == copied.output_key
    assert meta["result"]["gpu"] == "NVIDIA H100" and meta["backend"] == "modal"  # what was generated
    assert meta["cost"] == {"total": 0.0006}  # this job's cost, not the earlier run's
    assert "video" not in meta and "backend_call_id" not in meta  # stale URL / call id not carried over


def test_one_byte_of_media_changed_misses(env: Env) -> None:
    first = key_of(env, upload(env, "balloon/horse"))
    succeed_earlier(env, first)
    changed = bytearray(VIDEO)
    changed[len(changed) // 2] ^= 1
    other = key_of(env, upload(env, "other/copy", video=bytes(changed)))
    assert other != first
    assert reuse_or_none(env.s3, env.store, BUCKET, other, target("other/copy", LATER), NOW) is None
    image = key_of(env, upload(env, "other/img", image=IMAGE[:-1] + b"X"))
    assert image not in (first, other)


@pytest.mark.parametrize(
    "change",
    [
        {"seed": 43},
        {"num_frames": 53},
        {"fps": 24},
        {"guidance_scale": 5.5},
        {"prompt": "A chestnut horse inflates like a balloon!"},
        {"video_description": "Another caption"},
        {"enable_safety_checker": False},
        {"aspect_ratio": "16:9"},
        {"resolution": "720p"},
    ],
)
def test_one_setting_changed_misses(env: Env, change: dict[str, Any]) -> None:
    refs = upload(env, "balloon/horse")
    first = key_of(env, refs)
    succeed_earlier(env, first)
    other = key_of(env, refs, {**SETTINGS, **change})
    assert other != first
    assert env.store.lookup(other) is None


def test_no_seed_is_never_reused(env: Env) -> None:
    refs = upload(env, "balloon/horse")
    with pytest.raises(NotReusable, match="no seed"):
        key_of(env, refs, explicit_seed=False)  # ingest drew the seed: it is in the settings
    with pytest.raises(NotReusable, match="no seed"):
        reuse_key({**SETTINGS, "seed": None}, {"video_url": "sha256:0"})


def test_reuse_false_forces_a_run(env: Env) -> None:
    refs = upload(env, "balloon/horse")
    succeed_earlier(env, key_of(env, refs))
    with pytest.raises(NotReusable, match="reuse: false"):
        key_of(env, refs, reuse_requested=False)


def test_earlier_output_deleted_runs_again_and_the_new_result_replaces_it(env: Env) -> None:
    key = key_of(env, upload(env, "balloon/horse"))
    earlier = succeed_earlier(env, key)
    env.s3.delete_object(Bucket=BUCKET, Key=earlier.output_key)
    new = target("other/copy", LATER)
    assert reuse_or_none(env.s3, env.store, BUCKET, key, new, NOW) is None
    assert env.store.lookup(key) is None  # marked stale: no later job tries it again
    assert "Contents" not in env.s3.list_objects_v2(Bucket=BUCKET, Prefix=new.output_prefix)
    # The job ran; its success is recorded in place of the stale entry, and the next one reuses it.
    mine = ReuseEntry(
        key, LATER, new.output_prefix + "video.mp4", new.output_prefix + "metadata.json", 30, "fal", NOW
    )
    env.s3.put_object(Bucket=BUCKET, Key=mine.output_key, Body=b"fresh video")
    env.s3.put_object(Bucket=BUCKET, Key=mine.metadata_key, Body=json.dumps({"job_id": LATER}).encode())
    assert env.store.record(mine, expires_at=1_900_000_000)
    third = target("third/one", "20261126T000000Z-aaaaaaaaaa")
    found = reuse_or_none(env.s3, env.store, BUCKET, key, third, NOW)
    assert found is not None and found[0].job_id == LATER
    assert body(env, found[1].output_key) == b"fresh video"


def test_deleted_metadata_is_a_miss_too(env: Env) -> None:
    key = key_of(env, upload(env, "balloon/horse"))
    earlier = succeed_earlier(env, key, poster=False)
    env.s3.delete_object(Bucket=BUCKET, Key=earlier.metadata_key)
    assert copy_result(env.s3, BUCKET, earlier, target("x/y", LATER)) is None


# ---------------------------------------------------------------------------------------------- key details


def test_data_media_hash_like_the_same_bytes_in_s3(env: Env) -> None:
    s3_refs = upload(env, "balloon/horse")
    data_refs = {
        "video_url": MediaRef("video_url", "data", "data:video/mp4;base64,…", data=VIDEO),
        "image_url": MediaRef("image_url", "data", "data:image/png;base64,…", data=IMAGE),
    }
    assert key_for_job(env.s3, SETTINGS, data_refs, explicit_seed=True) == key_of(env, s3_refs)
    assert digest_bytes(VIDEO) == "sha256:" + hashlib.sha256(VIDEO).hexdigest()


def test_hashing_keeps_the_time_a_dispatch_needs(env: Env) -> None:
    from vap_shared.ingest_logic import DISPATCH_RESERVE_S

    from local_stack.cfn import load_template

    refs = upload(env, "balloon/horse")
    # With no more than the dispatch's reserve left, the media are not hashed (the job just runs).
    with pytest.raises(NotReusable, match="too long"):
        key_of(env, refs, time_left_s=lambda: DISPATCH_RESERVE_S, reserve_s=DISPATCH_RESERVE_S)
    assert key_of(env, refs, time_left_s=lambda: DISPATCH_RESERVE_S + 30, reserve_s=DISPATCH_RESERVE_S)
    # The reserve covers Modal's submit twice and fal's once, and still leaves the ingest function
    # time to hash.
    assert DISPATCH_RESERVE_S >= 3 * 13
    template = load_template(Path(__file__).resolve().parents[2] / "template.yaml")
    assert template["Resources"]["IngestFunction"]["Properties"]["Timeout"] >= DISPATCH_RESERVE_S + 10


def test_https_media_are_never_reused(env: Env) -> None:
    refs = upload(env, "balloon/horse")
    refs["video_url"] = MediaRef("video_url", "https", "https://x/clip.mp4", url="https://x/clip.mp4")
    with pytest.raises(NotReusable, match="https"):
        key_for_job(env.s3, SETTINGS, refs, explicit_seed=True)


class SpyBody:
    def __init__(self, inner: Any, sizes: list[int | None]) -> None:
        self._inner, self._sizes = inner, sizes

    def read(self, size: int | None = None) -> bytes:
        self._sizes.append(size)
        return bytes(self._inner.read(size))

    def close(self) -> None:
        self._inner.close()


class SpyS3:
    def __init__(self, s3: Any) -> None:
        self._s3, self.sizes = s3, []

    def get_object(self, **kwargs: Any) -> dict[str, Any]:
        response = dict(self._s3.get_object(**kwargs))
        response["Body"] = SpyBody(response["Body"], self.sizes)
        return response


def test_s3_media_are_streamed_in_chunks(env: Env) -> None:
    big = VIDEO * 3  # ~3 MiB
    env.s3.put_object(Bucket=BUCKET, Key="inbox/a/big.mp4", Body=big)
    spy = SpyS3(env.s3)
    assert digest_s3_object(spy, BUCKET, "inbox/a/big.mp4", chunk_bytes=1024 * 1024) == digest_bytes(big)
    assert len(spy.sizes) >= 4 and set(spy.sizes) == {1024 * 1024}  # never read() without a bound


def test_changed_too_big_or_slow_objects_are_not_reused(env: Env) -> None:
    env.s3.put_object(Bucket=BUCKET, Key="inbox/a/clip.mp4", Body=VIDEO)
    old = env.s3.head_object(Bucket=BUCKET, Key="inbox/a/clip.mp4")["ETag"]
    env.s3.put_object(Bucket=BUCKET, Key="inbox/a/clip.mp4", Body=VIDEO + b"!")  # replaced after the check
    with pytest.raises(NotReusable, match="gone or changed"):
        digest_s3_object(env.s3, BUCKET, "inbox/a/clip.mp4", old)
    with pytest.raises(NotReusable, match="larger"):
        digest_s3_object(env.s3, BUCKET, "inbox/a/clip.mp4", max_bytes=1000)
    with pytest.raises(NotReusable, match="too long"):
        digest_s3_object(env.s3, BUCKET, "inbox/a/clip.mp4", chunk_bytes=1024, deadline=0.0)


# ---------------------------------------------------------------------------------------------- store details


def test_lookup_is_one_read_and_the_first_success_stays(env: Env) -> None:
    key = "ab" * 32
    first = ReuseEntry(key, EARLIER, "outputs/a/v.mp4", "outputs/a/m.json", 1, "modal", NOW)
    second = ReuseEntry(key, LATER, "outputs/b/v.mp4", "outputs/b/m.json", 2, "fal", NOW)
    assert env.store.record(first, 1_900_000_000)
    assert not env.store.record(second, 1_900_000_000)  # conditional: a live entry is kept

    calls: list[str] = []

    class Counting:
        def __getattr__(self, name: str) -> Any:
            calls.append(name)
            return getattr(env.ddb, name)

    assert ReuseStore(Counting(), TABLE).lookup(key) == first
    assert calls == ["get_item"]
    item = env.ddb.get_item(TableName=TABLE, Key={"job_id": {"S": ITEM_PREFIX + key}})["Item"]
    assert item["expires_at"] == {"N": "1900000000"}
    # No attribute a job index could pick up (state, backend, dispatched_at...).
    assert {k for k in item if not k.startswith("reuse_")} == {"job_id", "expires_at"}
    # Only the entry that was found can be marked stale (a newer one is never hidden by a late miss).
    assert not env.store.mark_stale(second, NOW)
    assert env.store.mark_stale(first, NOW)
    assert env.store.record(second, 1_900_000_000)
    assert env.store.lookup(key) == second
