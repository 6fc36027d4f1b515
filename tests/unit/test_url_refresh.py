"""`POST /callbacks/gpu/{job_id}/urls`: fresh presigned URLs (botocore's own presigning) for a run the
service still wants; 409 for one it does not; signed like GPU callbacks."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import ingest
import pytest
import webhook
from vap_shared import routes
from vap_shared.gpu_contract import GpuJobRequest, UrlRefreshResponse
from vap_shared.jobs import iso, utcnow
from vap_shared.naming import GPU_UPLOADS, RESUME_STATE
from vap_shared.signing import signed_headers
from vap_testkit import (
    BUCKET,
    FAL_EXAMPLE,
    MP4,
    PNG,
    WEBHOOK_BASE,
    FakeServices,
    Stack,
    call,
    handlers_on,
    s3_event,
    sqs_event,
    stack,
    url_event,
)

from local_stack.cfn import load_template


@pytest.fixture
def services() -> FakeServices:
    services = FakeServices()
    services.sent: list[dict[str, Any]] = []  # type: ignore[misc]
    services.on_modal_submit = services.sent.append  # type: ignore[attr-defined]
    return services


@pytest.fixture
def st(monkeypatch: pytest.MonkeyPatch, services: FakeServices) -> Iterator[Stack]:
    with stack(monkeypatch, services) as s, handlers_on(s):
        yield s


def _dispatch(st: Stack, image: str = "face.png", backend: str = "modal") -> Any:
    st.put("inbox/r/clip.mp4", MP4)
    st.put("inbox/r/face.png", PNG)
    raw = json.dumps({**FAL_EXAMPLE, "video_url": "clip.mp4", "image_url": image, "backend": backend})
    call(
        ingest.handler,
        sqs_event(s3_event("inbox/r/job.json", st.put("inbox/r/job.json", raw), size=len(raw))),
    )
    (job_id,) = st.job_ids()
    return st.store.get(job_id)


def _refresh(st: Stack, job_id: str, call_id: str, key: bytes | None = None, **body: Any) -> tuple[int, Any]:
    payload = {"job_id": job_id, "call_id": call_id, "purpose": "start", "sent_at": int(time.time()), **body}
    raw = json.dumps(payload).encode()
    headers = {k.lower(): v for k, v in signed_headers(key or st.gpu_key(job_id), raw).items()}
    response = call(webhook.handler, url_event(routes.path("urls", job_id), raw, headers))
    return response["statusCode"], json.loads(response["body"])


def _object_and_expiry(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    host = parts.hostname or ""
    bucket = host.split(".s3", 1)[0]
    return f"{bucket}{parts.path}", int(parse_qs(parts.query)["X-Amz-Expires"][0])


def test_the_dispatched_request_names_the_refresh_endpoint(st: Stack, services: FakeServices) -> None:
    job = _dispatch(st, image="https://storage.googleapis.com/falserverless/face.jpg")
    (sent,) = services.sent  # type: ignore[attr-defined]
    request = GpuJobRequest.model_validate({k: v for k, v in sent.items() if k != "call_id"})
    assert request.refresh_url == routes.url(WEBHOOK_BASE, "urls", job.job_id)
    # The user's https image is theirs: an error on it is an input error; ours are not (the
    # previews' PUTs included: a refresh renews them too).
    ours = ("video_url", "output_put_url", "poster_put_url", "preview_put_url")
    assert request.service_urls == ours
    assert job.service_urls == list(ours)


def test_a_wanted_run_gets_fresh_urls_for_the_jobs_own_objects(st: Stack) -> None:
    job = _dispatch(st)
    before = time.time()
    status, body = _refresh(st, job.job_id, job.backend_call_id, purpose="upload")
    assert status == 200
    urls = UrlRefreshResponse.model_validate(body)
    ttl = st.runtime.settings.budget.url_ttl_s
    assert int(before) + ttl <= urls.expires_at <= time.time() + ttl + 1
    assert urls.video_url and urls.image_url and urls.output_put_url
    assert _object_and_expiry(urls.video_url) == (f"{BUCKET}/inbox/r/clip.mp4", ttl)
    assert _object_and_expiry(urls.image_url) == (f"{BUCKET}/inbox/r/face.png", ttl)
    assert _object_and_expiry(urls.output_put_url) == (f"{BUCKET}/work/{job.job_id}/video.mp4", ttl)
    # The PUTs pin the content type; the previews' PUTs are renewed with the video's.
    assert "content-type" in parse_qs(urlsplit(urls.output_put_url).query)["X-Amz-SignedHeaders"][0]
    assert urls.poster_put_url and urls.preview_put_url
    assert _object_and_expiry(urls.poster_put_url) == (f"{BUCKET}/work/{job.job_id}/poster.jpg", ttl)
    assert _object_and_expiry(urls.preview_put_url) == (f"{BUCKET}/work/{job.job_id}/preview.webp", ttl)


def test_a_run_gets_a_get_and_a_put_for_its_saved_denoising_state(st: Stack) -> None:
    job = _dispatch(st)
    status, body = _refresh(st, job.job_id, job.backend_call_id)
    urls = UrlRefreshResponse.model_validate(body)
    ttl = st.runtime.settings.budget.url_ttl_s
    assert status == 200 and urls.resume_get_url and urls.resume_put_url
    state = f"{BUCKET}/work/{job.job_id}/resume.bin"
    assert _object_and_expiry(urls.resume_get_url) == _object_and_expiry(urls.resume_put_url) == (state, ttl)
    signed = parse_qs(urlsplit(urls.resume_put_url).query)["X-Amz-SignedHeaders"][0]
    assert "content-type" in signed and RESUME_STATE[1] == "application/octet-stream"


def test_pass_through_inputs_stay_and_previews_are_renewed_when_the_request_had_them(st: Stack) -> None:
    job = _dispatch(st, image="https://storage.googleapis.com/falserverless/face.jpg")
    st.store.update_fields(
        job.job_id,
        {"service_urls": ["video_url", "output_put_url", "poster_put_url", "preview_put_url"]},
        iso(utcnow()),
        only_if_absent="completed_at",
    )
    status, body = _refresh(st, job.job_id, job.backend_call_id)
    urls = UrlRefreshResponse.model_validate(body)
    assert status == 200 and urls.image_url is None and urls.video_url
    assert urls.poster_put_url and urls.preview_put_url
    assert _object_and_expiry(urls.poster_put_url)[0] == f"{BUCKET}/work/{job.job_id}/poster.jpg"
    assert _object_and_expiry(urls.preview_put_url)[0] == f"{BUCKET}/work/{job.job_id}/preview.webp"


def test_before_ingest_records_the_call_the_run_is_still_wanted(st: Stack) -> None:
    job = _dispatch(st)
    st.store.update_fields(
        job.job_id, {"backend_call_id": None, "backend": None}, iso(utcnow()), "completed_at"
    )
    assert _refresh(st, job.job_id, "fc-any")[0] == 200


@pytest.mark.parametrize(
    "change,call_id",
    [
        ({"state": "succeeded"}, None),  # finished meanwhile
        ({"backend": "fal"}, None),  # fell back to fal
        ({}, "fc-another"),  # another run of the job is recorded
    ],
)
def test_an_unwanted_run_gets_409_and_nothing_changes(
    st: Stack, change: dict[str, str], call_id: str | None
) -> None:
    job = _dispatch(st)
    if "state" in change:
        st.store.transition(job.job_id, change["state"], {}, iso(utcnow()))
    elif change:
        st.store.update_fields(job.job_id, change, iso(utcnow()), only_if_absent="completed_at")
    before = st.store.get(job.job_id)
    status, body = _refresh(st, job.job_id, call_id or job.backend_call_id)
    assert status == 409 and body["error"].startswith("superseded")
    assert st.store.get(job.job_id) == before


def test_bad_signature_unknown_job_and_mismatched_body(st: Stack) -> None:
    job = _dispatch(st)
    assert _refresh(st, job.job_id, job.backend_call_id, key=b"x" * 32)[0] == 401
    assert _refresh(st, "20261125T000000Z-0000000000", "fc-1")[0] == 404
    # Signed with this job's key, but the body names another job.
    raw = json.dumps({"job_id": "other", "call_id": "c", "purpose": "start", "sent_at": int(time.time())})
    headers = {k.lower(): v for k, v in signed_headers(st.gpu_key(job.job_id), raw.encode()).items()}
    response = call(webhook.handler, url_event(routes.path("urls", job.job_id), raw.encode(), headers))
    assert response["statusCode"] == 401


def test_the_webhook_may_sign_exactly_the_uploads_it_presigns() -> None:
    """Least privilege: a presigned PUT works only if the signer may PutObject there."""
    template = load_template(Path(__file__).resolve().parents[2] / "template.yaml")
    statements = template["Resources"]["WebhookRole"]["Properties"]["Policies"][0]["PolicyDocument"][
        "Statement"
    ]
    (uploads,) = [s for s in statements if s["Sid"] == "PresignGpuUploads"]
    assert uploads["Action"] == "s3:PutObject"
    assert {r["Fn::Sub"] for r in uploads["Resource"]} == {
        f"arn:${{AWS::Partition}}:s3:::${{Bucket}}/work/*/{name}"
        for name, _ in [*GPU_UPLOADS.values(), RESUME_STATE]
    }
