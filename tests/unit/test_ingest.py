import base64
import json
import time

import httpx
import ingest
import pytest
from vap_shared import routes
from vap_shared.ingest_logic import Ingestor, parse_sqs_body
from vap_shared.signing import derive_callback_key
from vap_testkit import (
    BUCKET,
    FAL_EXAMPLE,
    MODAL_URL,
    MP4,
    PNG,
    WEBHOOK_BASE,
    FakeServices,
    call,
    fal_token,
    s3_event,
    sqs_event,
    stack,
)


@pytest.fixture
def st(monkeypatch):
    with stack(monkeypatch) as s:
        ingest._ingestor = Ingestor(s.runtime)
        yield s
    ingest.reset()


def upload_job(st, name="inbox/set/job.json", sidecar=None, media=True):
    if media:
        st.put("inbox/set/clip.mp4", MP4)
        st.put("inbox/set/face.png", PNG)
    body = (
        sidecar
        if sidecar is not None
        else {
            "prompt": "a horse floats away",
            "video_description": "a shoe inflates",
            "video_url": "clip.mp4",
            "image_url": "face.png",
            "seed": 42,
        }
    )
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    etag = st.put(name, raw, "application/json")
    return s3_event(name, etag, size=len(raw))


def only_job(st):
    (job_id,) = st.job_ids()
    return st.store.get(job_id)


def test_happy_path_dispatches_to_modal_with_presigned_urls_and_callback_key(st):
    result = call(ingest.handler, sqs_event(upload_job(st)))
    assert result == {"batchItemFailures": []}
    job = only_job(st)
    assert job.state == "dispatched" and job.backend == "modal" and job.backend_call_id == "fc-1"
    assert job.name == "set/job" and job.output_prefix == f"outputs/set/job/{job.job_id}/"
    assert job.job_id.startswith("20261125T182301Z-") and len(job.job_id) == 27
    assert job.settings["seed"] == 42 and job.requested_backend == "auto"
    (request,) = st.services.calls("modal.test")
    assert str(request.url) == f"{MODAL_URL}/submit"
    body = json.loads(request.content)
    assert body["job_id"] == job.job_id
    assert body["callback_url"] == routes.url(WEBHOOK_BASE, "gpu", job.job_id)
    assert bytes.fromhex(body["callback_key"]) == derive_callback_key(
        b"test-stack-secret-0123456789abcdef", job.job_id
    )
    assert "inbox/set/clip.mp4" in body["video_url"] and "X-Amz-Signature" in body["video_url"]
    assert f"work/{job.job_id}/video.mp4" in body["output_put_url"]
    # URLs live the job budget; the GPU renews them at start and before upload.
    assert f"X-Amz-Expires={st.runtime.settings.budget.url_ttl_s}" in body["output_put_url"]
    assert body["refresh_url"] == routes.url(WEBHOOK_BASE, "urls", job.job_id)
    assert body["service_urls"] == [
        "video_url",
        "image_url",
        "output_put_url",
        "poster_put_url",
        "preview_put_url",
    ]
    # The GPU stores a poster and an animated preview next to the video (PUTs pinned to their type).
    assert f"work/{job.job_id}/poster.jpg" in body["poster_put_url"]
    assert f"work/{job.job_id}/preview.webp" in body["preview_put_url"]
    assert body["gpus"] == 1 and job.gpus == 1  # the stack's DefaultGpus
    deadline = body["deadline_unix"] - st.runtime.settings.budget.total_s
    assert abs(deadline - time.time()) < 60
    assert body["settings"]["prompt"] == "a horse floats away"
    # The secrets never travel in the request.
    assert "test-stack-secret" not in request.content.decode()
    assert st.notifications() == []


def test_moto_shaped_event_and_test_event(st):
    raw = json.dumps({**FAL_EXAMPLE, "video_url": "clip.mp4", "image_url": "face.png"}).encode()
    st.put("inbox/set/clip.mp4", MP4)
    st.put("inbox/set/face.png", PNG)
    etag = st.put("inbox/set/my job.json", raw)
    moto_event = s3_event("inbox/set/my job.json", etag, moto_shape=True)
    assert "%2F" in moto_event["Records"][0]["s3"]["object"]["key"]
    test_event = {"Service": "Amazon S3", "Event": "s3:TestEvent", "Time": "x", "Bucket": BUCKET}
    result = call(ingest.handler, sqs_event(test_event, moto_event))
    assert result == {"batchItemFailures": []}
    job = only_job(st)
    assert job.sidecar_key == "inbox/set/my job.json" and job.state == "dispatched"


def test_skips_keys_outside_the_inbox_filter():
    assert parse_sqs_body("not json") == []
    body = json.dumps(s3_event("outputs/x/job.json", "e"))
    assert parse_sqs_body(body)[0].key == "outputs/x/job.json"


def test_fal_example_dispatched_to_fal_with_urls_unchanged(st):
    event = upload_job(st, sidecar={**FAL_EXAMPLE, "backend": "fal"}, media=False)
    assert call(ingest.handler, sqs_event(event)) == {"batchItemFailures": []}
    job = only_job(st)
    assert job.backend == "fal" and job.backend_call_id == "req-1"
    assert job.fal_urls["status_url"].endswith("/requests/req-1/status")
    (request,) = st.services.calls("queue.fal.test")
    assert request.url.path == "/fal-ai/video-as-prompt"
    # The webhook URL carries the job's token (vap_shared.fal_token): only we and fal know it.
    assert (
        request.url.params["fal_webhook"]
        == f"{routes.url(WEBHOOK_BASE, 'fal', job.job_id)}?token={fal_token(job.job_id)}"
    )
    body = json.loads(request.content)
    assert body["video_url"] == FAL_EXAMPLE["video_url"] and body["image_url"] == FAL_EXAMPLE["image_url"]
    # No `backend`, nothing extra but the seed the service drew (fal's output reports none).
    assert set(body) == {*FAL_EXAMPLE, "seed"} and body["seed"] == job.seed


def test_duplicate_events_dispatch_once(st):
    event = upload_job(st)
    call(ingest.handler, sqs_event(event, event))
    call(ingest.handler, sqs_event(event))
    assert len(st.services.calls("modal.test")) == 1
    assert only_job(st).state == "dispatched"


def test_reupload_gets_a_new_job(st):
    first = upload_job(st)
    call(ingest.handler, sqs_event(first))
    second = upload_job(st, sidecar={**FAL_EXAMPLE})
    second["Records"][0]["s3"]["object"]["sequencer"] = "0065A1B2C3D4E5F699"
    call(ingest.handler, sqs_event(second))
    assert len(st.job_ids()) == 2


def test_bad_sidecar_fails_cleanly_without_retry(st):
    event = upload_job(st, sidecar={"prompt": "", "num_frames": True, "video_url": "../x.mp4", "colour": 1})
    assert call(ingest.handler, sqs_event(event)) == {"batchItemFailures": []}
    job = only_job(st)
    assert job.state == "failed" and job.backend is None
    fields = {e["field"] for e in job.errors}
    assert fields == {"prompt", "num_frames", "video_url", "colour", "video_description", "image_url"}
    report = st.get_json(f"outputs/set/job/{job.job_id}/error.json")
    assert report["errors"] == job.errors and report["status"] == "failed"
    (note,) = st.notifications()
    assert note["status"] == "failed" and note["errors"] == job.errors
    assert note["error_report_key"] == f"outputs/set/job/{job.job_id}/error.json"
    assert note["_subject"] == f"VAP video failed: {job.name} (job {job.job_id})"
    assert note["_attributes"] == {"status": "failed", "backend": "none"}
    assert st.services.requests == []
    # A redelivery changes nothing and does not notify again.
    call(ingest.handler, sqs_event(event))
    assert st.notifications() == []


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        (b"{nope", "not valid JSON"),
        (b"\xff\xfe", "not valid UTF-8"),
        (b"[]", "must be a JSON object"),
        (b"", "empty"),
    ],
)
def test_malformed_sidecars(st, raw, needle):
    call(ingest.handler, sqs_event(upload_job(st, sidecar=raw)))
    job = only_job(st)
    assert job.state == "failed" and needle in job.errors[0]["message"]


def test_oversized_sidecar(st):
    raw = json.dumps({**FAL_EXAMPLE, "prompt": "x" * 70000}).encode()
    call(ingest.handler, sqs_event(upload_job(st, sidecar=raw)))
    assert "at most 65,536 bytes" in only_job(st).errors[0]["message"]


def test_disallowed_schemes_and_hosts(st):
    sidecar = {**FAL_EXAMPLE, "video_url": "file:///etc/passwd", "image_url": "https://evil.test/a.png"}
    call(ingest.handler, sqs_event(upload_job(st, sidecar=sidecar)))
    messages = {e["field"]: e["message"] for e in only_job(st).errors}
    assert "file: scheme" in messages["video_url"] and "evil.test" in messages["image_url"]


def test_missing_media_is_retried_then_fails_clearly(st):
    event = upload_job(st, media=False)
    for attempt in (1, 2, 3):
        result = call(ingest.handler, sqs_event(event, receive_count=attempt))
        assert result == {"batchItemFailures": [{"itemIdentifier": "m-0"}]}
        assert only_job(st).state == "received"
    assert st.notifications() == []
    call(ingest.handler, sqs_event(event, receive_count=4))
    job = only_job(st)
    assert job.state == "failed"
    assert (
        "does not exist" in job.errors[0]["message"]
        and "Gave up after 4 attempts" in job.errors[-1]["message"]
    )
    assert len(st.notifications()) == 1


def test_media_arriving_late_is_picked_up_on_retry(st):
    event = upload_job(st, media=False)
    assert call(ingest.handler, sqs_event(event))["batchItemFailures"]
    st.put("inbox/set/clip.mp4", MP4)
    st.put("inbox/set/face.png", PNG)
    assert call(ingest.handler, sqs_event(event, receive_count=2)) == {"batchItemFailures": []}
    assert only_job(st).state == "dispatched"


def test_empty_media_is_permanent(st):
    st.put("inbox/set/clip.mp4", b"")
    st.put("inbox/set/face.png", PNG)
    call(ingest.handler, sqs_event(upload_job(st, media=False)))
    job = only_job(st)
    assert job.state == "failed" and "is empty" in job.errors[0]["message"]


def test_data_uri_media_is_stored_in_work(st):
    video = base64.b64encode(MP4).decode()
    image = base64.b64encode(PNG).decode()
    sidecar = {
        **FAL_EXAMPLE,
        "video_url": f"data:video/mp4;base64,{video}",
        "image_url": f"data:image/png;base64,{image}",
    }
    call(ingest.handler, sqs_event(upload_job(st, sidecar=sidecar, media=False)))
    job = only_job(st)
    assert job.state == "dispatched"
    assert job.inputs["video_url"]["key"] == f"work/{job.job_id}/input-video.mp4"
    assert st.s3.get_object(Bucket=BUCKET, Key=f"work/{job.job_id}/input-image.png")["Body"].read() == PNG
    body = json.loads(st.services.calls("modal.test")[0].content)
    assert f"work/{job.job_id}/input-video.mp4" in body["video_url"]


def test_oversize_data_uri(st):
    big = base64.b64encode(b"x" * 5000).decode()
    call(
        ingest.handler,
        sqs_event(upload_job(st, sidecar={**FAL_EXAMPLE, "video_url": f"data:video/mp4;base64,{big}"})),
    )
    assert "at most 4,096 bytes" in only_job(st).errors[0]["message"]


@pytest.mark.parametrize("failure", ["503", "401", "timeout", "connect"])
def test_auto_falls_back_to_fal_when_modal_cannot_take_the_job(monkeypatch, failure):
    services = FakeServices()
    if failure == "timeout":
        services.modal_error = httpx.ReadTimeout
    elif failure == "connect":
        services.modal_error = httpx.ConnectError
    else:
        services.modal_status = int(failure)
    with stack(monkeypatch, services) as st:
        ingest._ingestor = Ingestor(st.runtime)
        call(ingest.handler, sqs_event(upload_job(st)))
        job = only_job(st)
        assert job.state == "dispatched" and job.backend == "fal" and job.fallback_from == "modal"
        assert job.fallback_reason
        body = json.loads(st.services.calls("queue.fal.test")[0].content)
        assert "X-Amz-Signature" in body["video_url"]  # S3 media as presigned GETs
    ingest.reset()


def test_modal_only_does_not_fall_back_and_retries_transient(monkeypatch):
    services = FakeServices(modal_status=503)
    with stack(monkeypatch, services) as st:
        ingest._ingestor = Ingestor(st.runtime)
        sidecar = {**FAL_EXAMPLE, "backend": "modal"}
        event = upload_job(st, sidecar=sidecar, media=False)
        assert call(ingest.handler, sqs_event(event))["batchItemFailures"]
        assert st.services.calls("queue.fal.test") == []
        assert only_job(st).state == "received"
        # Out of attempts: failed, with the reason.
        call(ingest.handler, sqs_event(event, receive_count=4))
        job = only_job(st)
        assert job.state == "failed" and "HTTP 503" in job.errors[0]["message"]
    ingest.reset()


def test_both_backends_down_reports_both_reasons(monkeypatch):
    services = FakeServices(modal_status=500, fal_status=503)
    with stack(monkeypatch, services) as st:
        ingest._ingestor = Ingestor(st.runtime)
        event = upload_job(st)
        assert call(ingest.handler, sqs_event(event))["batchItemFailures"]
        call(ingest.handler, sqs_event(event, receive_count=4))
        job = only_job(st)
        text = " ".join(e["message"] for e in job.errors)
        assert job.state == "failed" and "Modal" in text and "fal.ai" in text
    ingest.reset()


def test_fal_422_maps_to_field_errors(monkeypatch):
    detail = [{"loc": ["body", "num_frames"], "msg": "must be at most 100", "type": "value_error"}]
    services = FakeServices(fal_status=422, fal_body={"detail": detail})
    with stack(monkeypatch, services) as st:
        ingest._ingestor = Ingestor(st.runtime)
        call(
            ingest.handler, sqs_event(upload_job(st, sidecar={**FAL_EXAMPLE, "backend": "fal"}, media=False))
        )
        job = only_job(st)
        assert job.state == "failed"
        assert job.errors == [
            {"field": "num_frames", "message": "fal.ai rejected `num_frames`: must be at most 100."}
        ]
    ingest.reset()


def test_concurrent_duplicates_dispatch_once(st):
    from concurrent.futures import ThreadPoolExecutor

    st.serialize_moto()
    event = upload_job(st)
    with ThreadPoolExecutor(max_workers=6) as pool:
        results = list(pool.map(lambda _: call(ingest.handler, sqs_event(event)), range(6)))
    assert all(r == {"batchItemFailures": []} for r in results)
    assert len(st.services.calls("modal.test")) == 1
    assert only_job(st).state == "dispatched"


@pytest.mark.parametrize(
    ("video", "image", "field", "needle"),
    [
        (b"<html><body>403 Forbidden</body></html>", None, "video_url", "does not look like a video"),
        (None, b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 40, "image_url", "does not look like an image"),
        (None, b"just some text, not a picture", "image_url", "does not look like an image"),
    ],
)
def test_media_that_is_not_a_video_or_image(st, video, image, field, needle):
    st.put("inbox/set/clip.mp4", video or MP4)
    st.put("inbox/set/face.png", image or PNG)
    call(ingest.handler, sqs_event(upload_job(st, media=False)))
    job = only_job(st)
    assert job.state == "failed" and [e["field"] for e in job.errors] == [field]
    assert needle in job.errors[0]["message"] and "inbox/set/" in job.errors[0]["message"]
    assert st.services.requests == []


@pytest.mark.parametrize(
    ("video", "image", "field", "needle"),
    [
        (
            MP4[: len(MP4) - 300],
            None,
            "video_url",
            "`video_url`: the MP4 is truncated: its `mdat` box runs to",
        ),
        (MP4[:200], None, "video_url", "`video_url`: the MP4 is truncated: its `moov` box runs to"),
        (None, PNG[:-12], "image_url", "`image_url`: the PNG is truncated"),
    ],
)
def test_damaged_media_fail_at_ingest_without_reaching_a_backend(st, video, image, field, needle):
    st.put("inbox/set/clip.mp4", video or MP4)
    st.put("inbox/set/face.png", image or PNG)
    call(ingest.handler, sqs_event(upload_job(st, media=False)))
    job = only_job(st)
    assert job.state == "failed" and [e["field"] for e in job.errors] == [field]
    (error,) = job.errors
    assert error["message"].startswith(needle) and "\n" not in error["message"]
    assert st.services.requests == []
    (note,) = st.notifications()
    assert note["errors"] == job.errors


def test_a_damaged_data_uri_fails_naming_its_field(st):
    video = base64.b64encode(MP4[:-50]).decode()
    sidecar = {**FAL_EXAMPLE, "video_url": f"data:video/mp4;base64,{video}"}
    call(ingest.handler, sqs_event(upload_job(st, sidecar=sidecar, media=False)))
    (error,) = only_job(st).errors
    assert error["field"] == "video_url" and "the MP4 is truncated" in error["message"]
    assert "the data: URI's content has" in error["message"]
    assert st.services.requests == []


def test_huge_media_is_refused(monkeypatch):
    with stack(monkeypatch, MAX_INPUT_BYTES="1000") as st:
        ingest._ingestor = Ingestor(st.runtime)
        st.put("inbox/set/clip.mp4", MP4 + b"\x00" * 1000)
        st.put("inbox/set/face.png", PNG)
        call(ingest.handler, sqs_event(upload_job(st, media=False)))
        job = only_job(st)
        assert job.state == "failed" and "at most 1,000 bytes" in job.errors[0]["message"]
    ingest.reset()


def test_s3_uri_in_another_bucket_and_absolute_key(st):
    sidecar = {
        **FAL_EXAMPLE,
        "video_url": "s3://someone-elses-bucket/inbox/clip.mp4",
        "image_url": "/inbox/a.png",
    }
    call(ingest.handler, sqs_event(upload_job(st, sidecar=sidecar, media=False)))
    messages = {e["field"]: e["message"] for e in only_job(st).errors}
    assert "someone-elses-bucket" in messages["video_url"] and "absolute path" in messages["image_url"]


@pytest.mark.parametrize("event_time", ["not-a-time", "", None])
def test_a_bad_event_time_still_makes_one_job_per_event(st, monkeypatch, event_time):
    """The job id follows from the event alone: a malformed or missing eventTime must not make a
    duplicate delivery (seconds later) a second job, nor may the sidecar be dropped."""
    from datetime import UTC, datetime, timedelta

    import vap_shared.naming as naming

    class LaterEachCall(datetime):
        calls = 0

        @classmethod
        def now(cls, tz=None):  # a clock that moves on between the two deliveries
            cls.calls += 1
            return datetime(2026, 11, 25, 18, 0, tzinfo=UTC) + timedelta(minutes=cls.calls)

    monkeypatch.setattr(naming, "datetime", LaterEachCall)
    event = upload_job(st)
    record = event["Records"][0]
    if event_time is None:
        del record["eventTime"]
    else:
        record["eventTime"] = event_time
    for _ in range(2):
        assert call(ingest.handler, sqs_event(event)) == {"batchItemFailures": []}
    job = only_job(st)
    assert job.state == "dispatched"
    assert job.job_id.startswith("19700101T000000Z-")
    # The sweeper's dead-letter drain parses the same event to the same id.
    (parsed,) = parse_sqs_body(json.dumps(event))
    from vap_shared.naming import job_id as make_job_id

    assert (
        make_job_id(parsed.event_time, parsed.bucket, parsed.key, parsed.etag, parsed.sequencer) == job.job_id
    )


def _crash_lines(out: str) -> list[dict]:
    lines = [json.loads(line) for line in out.splitlines() if line.startswith('{"_aws"')]
    return [line for line in lines if "IngestRecordCrashes" in line]


def test_a_record_that_crashes_is_retried_and_counted_for_the_alarm(st, monkeypatch, capsys):
    """Lambda's Errors metric cannot see a batch item failure: the handler counts it itself."""
    event = upload_job(st)

    def boom(*args, **kwargs):
        raise KeyError("a bug")

    monkeypatch.setattr(Ingestor, "handle_event", boom)
    capsys.readouterr()
    assert call(ingest.handler, sqs_event(event)) == {"batchItemFailures": [{"itemIdentifier": "m-0"}]}
    (line,) = _crash_lines(capsys.readouterr().out)
    assert line["IngestRecordCrashes"] == [1.0] and line["error"] == "KeyError"


def test_an_expected_retry_is_not_a_crash(st, capsys):
    event = upload_job(st, media=False)  # media not uploaded yet: retried, not a crash
    capsys.readouterr()
    assert call(ingest.handler, sqs_event(event)) == {"batchItemFailures": [{"itemIdentifier": "m-0"}]}
    assert _crash_lines(capsys.readouterr().out) == []
