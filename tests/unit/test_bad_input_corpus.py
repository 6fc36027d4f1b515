"""The bad-input corpus: every case end to end through the Lambda handlers, each with its expected
outcome.

The parser/resolver unit tests (test_sidecar.py, test_media.py, test_signatures.py) check the
wording of single functions; this corpus checks what the *service* does with the same inputs:

- a bad sidecar → the job fails with a specific error naming the field, `error.json` holds the same
  errors, exactly one failure notification, the SQS message is consumed (no retry loop, nothing
  for the DLQ), no backend is called and nothing but the report lands in the outputs folder;
  media that may still be uploading is retried first and fails clearly after the last attempt;
- a bad webhook → a specific HTTP status, the job unchanged, nothing stored, no notification
  (a replayed valid delivery is a 200 no-op).

Plus the GPU downloader and the fal result download: DNS names resolving to private addresses and
redirects to private addresses are refused.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import ingest
import pytest
import webhook
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from vap_shared import routes
from vap_shared.config import Settings
from vap_shared.ingest_logic import Ingestor
from vap_shared.s3io import StoreError, stream_url_to_s3
from vap_shared.signing import signed_headers
from vap_testkit import (
    BUCKET,
    FAL_EXAMPLE,
    MP4,
    PNG,
    FakeServices,
    FalKeys,
    call,
    s3_event,
    sqs_event,
    stack,
    url_event,
)

MAX_SIDECAR = 2 * 1024 * 1024  # so a 1 MB prompt reaches the field check
MAX_INPUT = 64 * 1024
OVERRIDES = {"MAX_SIDECAR_BYTES": str(MAX_SIDECAR), "MAX_INPUT_BYTES": str(MAX_INPUT)}
ATTEMPTS = Settings.from_env({"BUCKET_NAME": "b", "JOBS_TABLE": "t", "TOPIC_ARN": "a"}).ingest_max_attempts


def doc(**changes: Any) -> dict[str, Any]:
    """A valid sidecar (media `clip.mp4` / `face.png` next to it) with `changes` (... = remove)."""
    base = {**FAL_EXAMPLE, "video_url": "clip.mp4", "image_url": "face.png", "backend": "modal"}
    base.update(changes)
    return {k: v for k, v in base.items() if v is not ...}


def data_uri(mime: str, payload: bytes) -> str:
    return f"data:{mime};base64,{base64.b64encode(payload).decode()}"


@dataclass(frozen=True)
class SidecarCase:
    body: bytes | dict[str, Any]
    field: str | None  # the field the error names (None: the document as a whole)
    needle: str  # part of the error message
    media: dict[str, bytes] = field(default_factory=dict)  # extra files next to the sidecar
    retried: bool = False  # may still be uploading: retried, then failed after the last attempt


VALID_RAW = json.dumps(doc()).encode()

SIDECARS: dict[str, SidecarCase] = {
    # --- the document
    "empty file": SidecarCase(b"", None, "empty"),
    "whitespace only": SidecarCase(b"  \n ", None, "empty"),
    "not UTF-8": SidecarCase(b"\xff\xfe{}", None, "not valid UTF-8"),
    "not JSON": SidecarCase(b'{"prompt": "a horse", "video_url": ', None, "not valid JSON"),
    "JSON array": SidecarCase(b'["prompt", "video_url"]', None, "must be a JSON object"),
    "JSON string": SidecarCase(b'"a horse"', None, "must be a JSON object"),
    "JSON null": SidecarCase(b"null", None, "must be a JSON object"),
    "duplicate keys": SidecarCase(VALID_RAW[:-1] + b', "seed": 1, "seed": 2}', "seed", "more than once"),
    "NaN": SidecarCase(VALID_RAW[:-1] + b', "seed": NaN}', None, "NaN"),
    "Infinity": SidecarCase(VALID_RAW[:-1] + b', "guidance_scale": Infinity}', None, "Infinity"),
    "-Infinity": SidecarCase(VALID_RAW[:-1] + b', "guidance_scale": -Infinity}', None, "Infinity"),
    "oversized sidecar": SidecarCase(
        VALID_RAW[:-1] + b" " * (MAX_SIDECAR + 1) + b"}", None, f"at most {MAX_SIDECAR:,} bytes"
    ),
    # --- fields: types, ranges, boundaries, enums, unknowns
    "missing prompt": SidecarCase(doc(prompt=...), "prompt", "required but missing"),
    "empty prompt": SidecarCase(doc(prompt="   "), "prompt", "is empty"),
    "1 MB prompt": SidecarCase(doc(prompt="x" * 1_000_000), "prompt", "1,000,000 characters long"),
    "prompt one over": SidecarCase(doc(prompt="x" * 5001), "prompt", "5,001 characters long"),
    "prompt not text": SidecarCase(doc(prompt=5), "prompt", "must be text"),
    "num_frames text": SidecarCase(doc(num_frames="49"), "num_frames", 'got the text "49"'),
    "num_frames bool": SidecarCase(doc(num_frames=True), "num_frames", "boolean true"),
    "num_frames float": SidecarCase(doc(num_frames=49.5), "num_frames", "49.5"),
    "num_frames below": SidecarCase(doc(num_frames=8), "num_frames", "out of range"),
    "num_frames above": SidecarCase(doc(num_frames=122), "num_frames", "out of range"),
    "fps zero": SidecarCase(doc(fps=0), "fps", "from 1 to 60"),
    "fps above": SidecarCase(doc(fps=61), "fps", "from 1 to 60"),
    "seed negative": SidecarCase(doc(seed=-1), "seed", "4,294,967,295"),
    "seed 2**32": SidecarCase(doc(seed=2**32), "seed", "out of range"),
    "seed huge": SidecarCase(doc(seed=10**400), "seed", "out of range"),
    "guidance 1": SidecarCase(doc(guidance_scale=1), "guidance_scale", "greater than 1"),
    "guidance above": SidecarCase(doc(guidance_scale=20.5), "guidance_scale", "out of range"),
    "unknown aspect": SidecarCase(doc(aspect_ratio="4:3"), "aspect_ratio", '"16:9", "9:16"'),
    "unknown resolution": SidecarCase(doc(resolution="1080p"), "resolution", '"720p"'),
    "unknown backend": SidecarCase(doc(backend="runpod"), "backend", '"auto", "modal", "fal"'),
    "safety as text": SidecarCase(doc(enable_safety_checker="yes"), "enable_safety_checker", "true or false"),
    "unknown field": SidecarCase(doc(num_frame=49), "num_frame", "Did you mean `num_frames`?"),
    "null image_url": SidecarCase(doc(image_url=None), "image_url", "got null"),
    # --- media in S3
    "media missing": SidecarCase(
        doc(video_url="not-uploaded.mp4"), "video_url", "does not exist", retried=True
    ),
    "media empty": SidecarCase(doc(video_url="empty.mp4"), "video_url", "empty", {"empty.mp4": b""}),
    "video not a video": SidecarCase(
        doc(video_url="fake.mp4"), "video_url", "does not look like a video", {"fake.mp4": PNG}
    ),
    "image not an image": SidecarCase(
        doc(image_url="fake.png"), "image_url", "does not look like an image", {"fake.png": b"hello " * 20}
    ),
    "media huge": SidecarCase(
        doc(video_url="huge.mp4"),
        "video_url",
        f"at most {MAX_INPUT:,}",
        {"huge.mp4": MP4 + b"\0" * MAX_INPUT},
    ),
    "../ key": SidecarCase(doc(video_url="../other/clip.mp4"), "video_url", "contains '..'"),
    "absolute key": SidecarCase(doc(video_url="/etc/passwd"), "video_url", "absolute path"),
    "other bucket": SidecarCase(
        doc(video_url="s3://other-bucket/inbox/clip.mp4"), "video_url", "other-bucket"
    ),
    "outputs key": SidecarCase(doc(video_url=f"s3://{BUCKET}/outputs/x/video.mp4"), "video_url", "inbox/"),
    # --- URLs
    "file://": SidecarCase(doc(image_url="file:///etc/passwd"), "image_url", "file: scheme"),
    "http://": SidecarCase(doc(image_url="http://storage.googleapis.com/x.png"), "image_url", "http: scheme"),
    "ftp://": SidecarCase(doc(image_url="ftp://example.org/x.png"), "image_url", "ftp: scheme"),
    "gs://": SidecarCase(doc(image_url="gs://bucket/x.png"), "image_url", "gs: scheme"),
    "loopback IP": SidecarCase(doc(image_url="https://127.0.0.1/x.png"), "image_url", "not allowed"),
    "loopback IPv6": SidecarCase(doc(image_url="https://[::1]/x.png"), "image_url", "not allowed"),
    "localhost": SidecarCase(doc(image_url="https://localhost/x.png"), "image_url", "not allowed"),
    "private IP": SidecarCase(doc(image_url="https://10.0.0.7/x.png"), "image_url", "not allowed"),
    "link-local metadata": SidecarCase(
        doc(image_url="https://169.254.169.254/latest/meta-data/"), "image_url", "not allowed"
    ),
    "metadata DNS name": SidecarCase(
        doc(image_url="https://metadata.google.internal/computeMetadata/v1/"), "image_url", "not allowed"
    ),
    # Names that resolve to private/loopback addresses are never on the allow-list (only DNS names
    # the operator lists are; the GPU side re-checks every resolved address, below).
    "DNS name → loopback": SidecarCase(
        doc(image_url="https://127.0.0.1.nip.io/x.png"), "image_url", "not allowed"
    ),
    "allow-list suffix trick": SidecarCase(
        doc(image_url="https://storage.googleapis.com.evil.test/x.png"), "image_url", "not allowed"
    ),
    "URL credentials": SidecarCase(
        doc(image_url="https://user:pw@storage.googleapis.com/x.png"), "image_url", "credentials"
    ),
    "URL odd port": SidecarCase(
        doc(image_url="https://storage.googleapis.com:8443/x.png"), "image_url", "port"
    ),
    # --- data: URIs (MAX_DATA_URI_BYTES is 4096 in the test environment)
    "data: oversize": SidecarCase(
        doc(image_url=data_uri("image/png", PNG + b"\0" * 5000)), "image_url", "at most"
    ),
    "data: wrong type": SidecarCase(
        doc(image_url=data_uri("video/mp4", MP4)), "image_url", "must be a image/*"
    ),
    "data: bad base64": SidecarCase(doc(image_url="data:image/png;base64,@@@"), "image_url", "not valid"),
    "data: not an image": SidecarCase(
        doc(image_url=data_uri("image/png", b"hello world, not a picture")), "image_url", "does not look like"
    ),
}


@pytest.fixture(scope="module")
def st() -> Iterator[Any]:
    """One emulated account for the whole corpus (each case has its own folder and job)."""
    with pytest.MonkeyPatch.context() as mp, stack(mp, FakeServices(), **OVERRIDES) as s:
        ingest._ingestor = Ingestor(s.runtime)
        webhook._runtime = s.runtime
        yield s
    ingest.reset()
    webhook.reset()


def _notes_for(st: Any, key: str, seen: list[dict[str, Any]]) -> list[dict[str, Any]]:
    seen.extend(st.notifications())
    return [n for n in seen if n["sidecar_key"] == key]


_NOTES: list[dict[str, Any]] = []


def _deliver(st: Any, key: str, etag: str, size: int, receive_count: int = 1) -> list[str]:
    event = sqs_event(s3_event(key, etag, size=size), receive_count=receive_count)
    return [f["itemIdentifier"] for f in call(ingest.handler, event)["batchItemFailures"]]


@pytest.mark.parametrize("case", list(SIDECARS))
def test_bad_sidecar(st: Any, case: str) -> None:
    spec = SIDECARS[case]
    folder = f"inbox/corpus/{abs(hash(case)):x}"
    st.put(f"{folder}/clip.mp4", MP4)
    st.put(f"{folder}/face.png", PNG)
    for name, data in spec.media.items():
        st.put(f"{folder}/{name}", data)
    raw = spec.body if isinstance(spec.body, bytes) else json.dumps(spec.body).encode()
    key = f"{folder}/job.json"
    etag = st.put(key, raw)
    backend_calls = len(st.services.requests)

    if spec.retried:
        assert _deliver(st, key, etag, len(raw)) == ["m-0"]  # SQS redelivers it
        assert _notes_for(st, key, _NOTES) == []
        failures = _deliver(st, key, etag, len(raw), receive_count=ATTEMPTS)
    else:
        failures = _deliver(st, key, etag, len(raw))
    assert failures == [], "a permanent error must not be retried (it would end in the DLQ)"

    (job_id,) = [j for j in st.job_ids() if st.store.get(j).sidecar_key == key]
    job = st.store.get(job_id)
    assert job.state == "failed"
    errors = job.errors or []
    assert any(e["field"] == spec.field and spec.needle in e["message"] for e in errors), errors
    assert all(e["message"] and "Input should" not in e["message"] for e in errors)
    assert st.get_json(job.error_report_key)["errors"] == errors
    stored = {k.rsplit("/", 1)[1] for k in st.object_keys(job.output_prefix)}
    assert stored <= {"error.json", "status.json"}, stored
    (note,) = _notes_for(st, key, _NOTES)
    assert note["status"] == "failed" and note["errors"] == errors and note["backend"] is None
    assert len(st.services.requests) == backend_calls, "no backend may see a rejected job"
    # A duplicate delivery of the same event changes nothing and notifies nobody.
    assert _deliver(st, key, etag, len(raw)) == []
    assert len(_notes_for(st, key, _NOTES)) == 1


def test_corpus_is_big_enough() -> None:
    assert len(SIDECARS) + len(WEBHOOKS) + len(DOWNLOADS) >= 40


# ---------------------------------------------------------------------------------------------- webhooks


@dataclass
class Delivery:
    kind: routes.RouteName  # "gpu" | "fal"
    job_id: str
    path_job_id: str
    body: bytes
    headers: dict[str, str]

    def event(self) -> dict[str, Any]:
        return url_event(routes.path(self.kind, self.path_job_id), self.body, self.headers)


def _dispatched(st: Any, backend: str, name: str) -> Any:
    folder = f"inbox/hooks/{name}"
    st.put(f"{folder}/clip.mp4", MP4)
    st.put(f"{folder}/face.png", PNG)
    raw = json.dumps(doc(backend=backend)).encode()
    key = f"{folder}/job.json"
    etag = st.put(key, raw)
    assert _deliver(st, key, etag, len(raw)) == []
    (job_id,) = [j for j in st.job_ids() if st.store.get(j).sidecar_key == key]
    job = st.store.get(job_id)
    assert job.state == "dispatched"
    return job


def _gpu(st: Any, job: Any, now: float | None = None, key: bytes | None = None, **body: Any) -> Delivery:
    payload = {
        "job_id": job.job_id,
        "call_id": job.backend_call_id,
        "event": "progress",
        "sent_at": int(time.time()),
        "progress": {"step": 1, "total": 4},
        **body,
    }
    raw = json.dumps(payload).encode()
    signing_key = key if key is not None else st.gpu_key(job.job_id)
    headers = {k.lower(): v for k, v in signed_headers(signing_key, raw, now=now).items()}
    return Delivery("gpu", job.job_id, job.job_id, raw, {**headers, "content-type": "application/json"})


_OTHER_FAL_KEYS = FalKeys(Ed25519PrivateKey.generate())


def _fal(st: Any, job: Any, now: float | None = None, keys: FalKeys | None = None) -> Delivery:
    payload = {"request_id": job.backend_call_id, "status": "OK", "payload": {"video": {"url": "x"}}}
    raw = json.dumps(payload).encode()
    headers = (keys or st.services.fal_keys).headers(job.backend_call_id, raw, now=now)
    return Delivery("fal", job.job_id, job.job_id, raw, headers)


def _set(d: Delivery, **changes: Any) -> Delivery:
    for k, v in changes.items():
        setattr(d, k, v)
    return d


Mutation = Callable[[Any, Any], Delivery]

# case -> (backend, build the delivery from (st, job), expected HTTP status)
WEBHOOKS: dict[str, tuple[str, Mutation, int]] = {
    "gpu: missing signature": (
        "modal",
        lambda st, j: _set(
            d := _gpu(st, j), headers={k: v for k, v in d.headers.items() if k != "x-vap-signature"}
        ),
        401,
    ),
    "gpu: missing timestamp": (
        "modal",
        lambda st, j: _set(
            d := _gpu(st, j), headers={k: v for k, v in d.headers.items() if k != "x-vap-timestamp"}
        ),
        401,
    ),
    "gpu: garbled signature": (
        "modal",
        lambda st, j: _set(d := _gpu(st, j), headers={**d.headers, "x-vap-signature": "v1=zz"}),
        401,
    ),
    "gpu: wrong key": ("modal", lambda st, j: _gpu(st, j, key=b"k" * 32), 401),
    "gpu: another job's key": ("modal", lambda st, j: _gpu(st, j, key=st.gpu_key(j.job_id + "0")), 401),
    "gpu: stale timestamp": ("modal", lambda st, j: _gpu(st, j, now=time.time() - 301), 401),
    "gpu: future timestamp": ("modal", lambda st, j: _gpu(st, j, now=time.time() + 301), 401),
    "gpu: body changed after signing": (
        "modal",
        lambda st, j: _set(d := _gpu(st, j), body=d.body.replace(b'"step": 1', b'"step": 3')),
        401,
    ),
    "gpu: body names another job": (
        "modal",
        lambda st, j: _set(_gpu(st, j), path_job_id=j.job_id[:-1] + ("0" if j.job_id[-1] != "0" else "1")),
        401,
    ),
    "gpu: unknown job": (
        "modal",
        lambda st, j: _gpu(st, j.model_copy(update={"job_id": "20991231T000000Z-0000000000"})),
        404,
    ),
    "gpu: signed garbage": (
        "modal",
        lambda st, j: _set(
            _gpu(st, j),
            body=b"[1,2]",
            headers={
                **{k.lower(): v for k, v in signed_headers(st.gpu_key(j.job_id), b"[1,2]").items()},
                "content-type": "application/json",
            },
        ),
        400,
    ),
    "gpu: oversized body": ("modal", lambda st, j: _set(_gpu(st, j), body=b"{" + b" " * 300_000 + b"}"), 413),
    "gpu: wrong content type": (
        "modal",
        lambda st, j: _set(d := _gpu(st, j), headers={**d.headers, "content-type": "text/plain"}),
        415,
    ),
    "fal: forged signature": (
        "fal",
        lambda st, j: _set(d := _fal(st, j), headers={**d.headers, "x-fal-webhook-signature": "00" * 64}),
        401,
    ),
    "fal: wrong key": ("fal", lambda st, j: _fal(st, j, keys=_OTHER_FAL_KEYS), 401),
    "fal: stale timestamp": ("fal", lambda st, j: _fal(st, j, now=time.time() - 3600), 401),
    "fal: future timestamp": ("fal", lambda st, j: _fal(st, j, now=time.time() + 3600), 401),
    "fal: body changed after signing": (
        "fal",
        lambda st, j: _set(d := _fal(st, j), body=d.body.replace(b'"OK"', b'"ERROR"')),
        401,
    ),
    "fal: missing headers": (
        "fal",
        lambda st, j: _set(_fal(st, j), headers={"content-type": "application/json"}),
        401,
    ),
    "fal: wrong content type": (
        "fal",
        lambda st, j: _set(d := _fal(st, j), headers={**d.headers, "content-type": "application/xml"}),
        415,
    ),
}


@pytest.mark.parametrize("case", list(WEBHOOKS))
def test_bad_webhook(st: Any, case: str) -> None:
    backend, build, expected = WEBHOOKS[case]
    job = _dispatched(st, backend, f"{abs(hash(case)):x}")
    before = st.store.get(job.job_id)
    delivery = build(st, job)
    response = call(webhook.handler, delivery.event())
    assert response["statusCode"] == expected, response
    after = st.store.get(job.job_id)
    assert after == before, "a rejected webhook must change nothing"
    assert not [k for k in st.object_keys(job.output_prefix) if not k.endswith("status.json")]
    assert _notes_for(st, job.sidecar_key, _NOTES) == []


def test_replayed_delivery_and_callback_for_a_terminal_job_are_no_ops(st: Any) -> None:
    job = _dispatched(st, "modal", "replay")
    st.put(f"work/{job.job_id}/video.mp4", MP4, "video/mp4")
    result = {"seed": 1, "width": 8, "height": 8, "num_frames": 9, "fps": 16, "bytes": len(MP4)}
    done = _gpu(st, job, event="succeeded", result={**result, "gpu": "cpu", "steps": 1, "timings": {}})
    for _ in range(3):  # the valid delivery, then two replays
        assert call(webhook.handler, done.event())["statusCode"] == 200
    st.store_results()  # three store requests for one result: stored once
    for _ in range(2):  # replays after it was stored
        assert call(webhook.handler, done.event())["statusCode"] == 200
    assert st.store_requests_waiting() == 0  # a finished job queues nothing
    finished = st.store.get(job.job_id)
    assert finished.state == "succeeded"
    # A (validly signed) failure callback for the finished job changes nothing either.
    late = _gpu(st, job, event="failed", error={"code": "internal", "message": "late", "retryable": True})
    assert call(webhook.handler, late.event())["statusCode"] == 200
    assert st.store.get(job.job_id).model_dump(exclude={"updated_at"}) == finished.model_dump(
        exclude={"updated_at"}
    )
    assert [n["status"] for n in _notes_for(st, job.sidecar_key, _NOTES)] == ["succeeded"]


# ---------------------------------------------------------------------------------------------- downloads

PRIVATE_DNS = {
    "internal.example": ["10.0.0.5"],
    "metadata.example": ["169.254.169.254"],
    "loopback.example": ["127.0.0.1"],
    "cgnat.example": ["100.64.0.1"],
    "v6.example": ["fd00::1"],
    "mapped.example": ["::ffff:192.168.1.1"],
    "rebind.example": ["93.184.216.34", "127.0.0.1"],  # every address must be public
}


def _resolver(host: str, port: int) -> list[str]:
    return PRIVATE_DNS.get(host, ["93.184.216.34"])


# case -> URL the GPU downloader is handed (presigned inputs / pass-through https media)
DOWNLOADS: dict[str, str] = {f"GPU: {host}": f"https://{host}/x.mp4" for host in PRIVATE_DNS}
DOWNLOADS["GPU: redirect to metadata"] = "https://redirect.example/to-metadata"
DOWNLOADS["GPU: redirect to a private name"] = "https://redirect.example/to-internal"


@pytest.mark.parametrize("case", list(DOWNLOADS))
def test_gpu_downloader_refuses_private_destinations(case: str) -> None:
    pytest.importorskip("numpy")
    from gpu.service.runner.config import JobFailed, RunnerConfig
    from gpu.service.runner.transport import UnsafeUrl, check_url, download

    config = RunnerConfig(allow_http_loopback=False, resolver=_resolver)
    url = DOWNLOADS[case]
    fetched: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        # The URL as the server sees it (the connection goes to the pinned, checked address).
        assert request.url.host == "93.184.216.34"
        fetched.append(f"{request.url.scheme}://{request.headers['host']}{request.url.raw_path.decode()}")
        target = {
            "/to-metadata": "https://169.254.169.254/latest/meta-data/",
            "/to-internal": "https://internal.example/x.mp4",
        }.get(request.url.path)
        if target:
            return httpx.Response(302, headers={"location": target})
        return httpx.Response(200, content=MP4)

    http = httpx.Client(transport=httpx.MockTransport(handler))
    if "redirect" in case:
        check_url(url, config)  # the first hop is fine ...
        with pytest.raises(JobFailed) as failed:
            download(http, url, "reference video", 1 << 20, config)
        # ... but redirects are never followed, so the private target is never requested.
        assert fetched == [url]
        assert failed.value.error.code == "input" and "HTTP 302" in failed.value.error.message
    else:
        with pytest.raises(UnsafeUrl, match="non-public"):
            check_url(url, config)


@pytest.mark.parametrize(
    "location",
    [
        "https://169.254.169.254/latest/meta-data/",
        "https://10.0.0.5/out.mp4",
        "http://v3.fal.media/out.mp4",
        "https://internal.example/out.mp4",
        "file:///etc/passwd",
    ],
)
def test_fal_result_redirects_to_private_or_unlisted_places_are_refused(st: Any, location: str) -> None:
    fetched: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        fetched.append(str(request.url))
        if request.url.host == "v3.fal.media" and request.url.path == "/files/out.mp4":
            return httpx.Response(302, headers={"location": location})
        return httpx.Response(200, content=MP4)

    http = httpx.Client(transport=httpx.MockTransport(handler))
    key = f"outputs/redirect/{abs(hash(location)):x}/video.mp4"
    with pytest.raises(StoreError, match="refusing to download"):
        stream_url_to_s3(
            http,
            st.s3,
            "https://v3.fal.media/files/out.mp4",
            BUCKET,
            key,
            allowed_hosts=("*.fal.media",),
            max_bytes=1 << 20,
            timeout_s=5,
        )
    assert fetched == ["https://v3.fal.media/files/out.mp4"]
    assert st.object_keys(key) == []
