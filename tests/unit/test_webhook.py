import json
import time

import ingest
import pytest
import webhook
from vap_shared import routes
from vap_shared.signing import signed_headers
from vap_testkit import (
    BUCKET,
    MP4,
    FakeServices,
    call,
    fal_webhook_event,
    gpu_callback_event,
    gpu_result,
    handlers_on,
    sqs_event,
    stack,
    upload_fal_example,
    url_event,
)


@pytest.fixture
def services():
    return FakeServices()


@pytest.fixture
def st(monkeypatch, services):
    with stack(monkeypatch, services) as s, handlers_on(s):
        yield s


def dispatch(st, backend="modal", name="inbox/set/job.json"):
    call(ingest.handler, sqs_event(upload_fal_example(st, name, backend)))
    (job_id,) = st.job_ids()
    return st.store.get(job_id)


def callback(job, event, **extra):
    return {
        "job_id": job.job_id,
        "call_id": job.backend_call_id,
        "event": event,
        "sent_at": int(time.time()),
        **extra,
    }


RESULT = gpu_result(
    1234,
    timings={"download_s": 0.1, "generate_s": 2.0, "encode_s": 0.2, "upload_s": 0.1, "total_s": 2.4},
)


def post(event):
    response = call(webhook.handler, event)
    return response["statusCode"], json.loads(response["body"] or "{}")


def test_gpu_progress_then_success_stores_once_and_notifies_once(st):
    job = dispatch(st)
    status, _ = post(
        gpu_callback_event(st, job.job_id, callback(job, "progress", progress={"step": 2, "total": 4}))
    )
    assert status == 200
    running = st.store.get(job.job_id)
    assert running.state == "running" and running.progress == {"step": 2, "total": 4}

    st.put(f"work/{job.job_id}/video.mp4", MP4, "video/mp4")
    event = gpu_callback_event(st, job.job_id, callback(job, "succeeded", result=RESULT))
    for _ in range(3):  # repeated deliveries: each answered at once, the result queued for storing
        status, body = post(event)
        assert status == 200 and body["note"] == "result queued for storing"
    assert st.store.get(job.job_id).state == "running"  # nothing stored by the webhook itself
    assert st.get_json(f"outputs/set/job/{job.job_id}/status.json")["phase"] == "storing"
    st.store_results()
    done = st.store.get(job.job_id)
    assert done.state == "succeeded" and done.seed == 1234
    prefix = f"outputs/set/job/{job.job_id}/"
    assert done.output_key == prefix + "video.mp4"
    assert st.s3.get_object(Bucket=BUCKET, Key=prefix + "video.mp4")["Body"].read() == MP4
    meta = st.get_json(prefix + "metadata.json")
    assert (
        meta["seed"] == 1234 and meta["backend"] == "modal" and meta["inputs"]["settings"]["num_frames"] == 49
    )
    assert meta["result"]["timings"]["generate_s"] == 2.0
    (note,) = st.notifications()
    assert note["status"] == "succeeded" and note["version"] == "1.1"
    assert note["output_key"] == prefix + "video.mp4" and note["metadata_key"] == prefix + "metadata.json"
    assert "X-Amz-Signature" in note["output_url"] and note["output_url_expires_at"]
    assert note["backend"] == "modal" and note["fallback_from"] is None and note["seed"] == 1234
    assert set(note["timings"]) == {
        "received_at",
        "dispatched_at",
        "completed_at",
        "queue_s",
        "generation_s",
        "total_s",
    }
    assert note["_attributes"] == {"status": "succeeded", "backend": "modal"}
    assert note["_subject"] == f"VAP video ready: {job.name} (job {job.job_id})"
    # Nothing written matches the ingest filter.
    assert not [
        k
        for k in st.object_keys()
        if k.startswith("inbox/") and k.endswith(".json") and k != "inbox/set/job.json"
    ]
    # A late progress callback does not leave the terminal state.
    post(gpu_callback_event(st, job.job_id, callback(job, "progress", progress={"step": 3, "total": 4})))
    assert st.store.get(job.job_id).state == "succeeded"


def test_gpu_success_base64_body(st):
    job = dispatch(st)
    st.put(f"work/{job.job_id}/video.mp4", MP4)
    assert (
        post(gpu_callback_event(st, job.job_id, callback(job, "succeeded", result=RESULT), base64_body=True))[
            0
        ]
        == 200
    )
    st.store_results()
    assert st.store.get(job.job_id).state == "succeeded"


def test_gpu_success_with_a_bad_upload_falls_back_to_fal(st):
    job = dispatch(st, backend="auto")
    st.put(f"work/{job.job_id}/video.mp4", b"<html>not a video</html>")
    post(gpu_callback_event(st, job.job_id, callback(job, "succeeded", result=RESULT)))
    after = st.store.get(job.job_id)
    assert after.state == "dispatched" and after.backend == "fal" and after.fallback_from == "modal"
    assert "not an MP4" in after.fallback_reason


def test_gpu_failure_falls_back_to_fal_once(st):
    job = dispatch(st, backend="auto")
    error = {"code": "internal", "message": "CUDA out of memory", "retryable": True}
    event = gpu_callback_event(st, job.job_id, callback(job, "failed", error=error))
    for _ in range(2):
        assert post(event)[0] == 200
    after = st.store.get(job.job_id)
    assert after.state == "dispatched" and after.backend == "fal" and after.fallback_from == "modal"
    assert "CUDA out of memory" in after.fallback_reason
    assert len(st.services.calls("queue.fal.test")) == 1
    assert st.notifications() == []


def test_gpu_failure_without_fallback_fails_with_report(st):
    job = dispatch(st, backend="modal")
    error = {"code": "safety", "message": "the image was flagged", "retryable": False}
    post(gpu_callback_event(st, job.job_id, callback(job, "failed", error=error)))
    after = st.store.get(job.job_id)
    assert after.state == "failed" and "the image was flagged" in after.errors[0]["message"]
    assert st.get_json(after.error_report_key)["errors"] == after.errors
    (note,) = st.notifications()
    assert note["status"] == "failed" and note["backend"] == "modal"


def test_gpu_input_error_in_auto_mode_does_not_fall_back(st):
    job = dispatch(st, backend="auto")
    error = {"code": "input", "message": "the reference video has no frames", "retryable": False}
    post(gpu_callback_event(st, job.job_id, callback(job, "failed", error=error)))
    assert st.store.get(job.job_id).state == "failed"
    assert st.services.calls("queue.fal.test") == []


def test_gpu_input_error_names_the_field_it_is_about(st):
    job = dispatch(st, backend="modal")
    message = "cannot read the reference video: partial file"
    error = {"code": "input", "message": message, "field": "video_url"}
    post(gpu_callback_event(st, job.job_id, callback(job, "failed", error=error)))
    after = st.store.get(job.job_id)
    assert after.state == "failed" and after.errors[0]["field"] == "video_url"
    (note,) = st.notifications()
    assert note["errors"][0]["field"] == "video_url" and "partial file" in note["errors"][0]["message"]


def _unsigned(st, job, body: bytes, headers):
    return url_event(routes.path("gpu", job.job_id), body, headers)


@pytest.mark.parametrize(
    "case", ["missing", "garbled", "wrong_key", "stale", "future", "tampered", "other_job"]
)
def test_gpu_signature_problems_are_401_and_change_nothing(st, case):
    job = dispatch(st)
    body = json.dumps(callback(job, "progress", progress={"step": 1, "total": 4})).encode()
    key = st.gpu_key(job.job_id)
    headers = {k.lower(): v for k, v in signed_headers(key, body).items()}
    if case == "missing":
        headers.pop("x-vap-signature")
    elif case == "garbled":
        headers["x-vap-signature"] = "v1=zz"
    elif case == "wrong_key":
        headers = {k.lower(): v for k, v in signed_headers(b"x" * 32, body).items()}
    elif case == "stale":
        headers = {k.lower(): v for k, v in signed_headers(key, body, now=time.time() - 301).items()}
    elif case == "future":
        headers = {k.lower(): v for k, v in signed_headers(key, body, now=time.time() + 301).items()}
    elif case == "tampered":
        body = body.replace(b'"step": 1', b'"step": 3')
    elif case == "other_job":
        # Signed correctly for another job id: the key is derived per job.
        headers = {
            k.lower(): v for k, v in signed_headers(st.gpu_key("20991231T000000Z-0000000000"), body).items()
        }
    status, _ = post(_unsigned(st, job, body, headers))
    assert status == 401
    assert st.store.get(job.job_id).state == "dispatched"
    assert st.notifications() == []


def test_gpu_body_for_another_job_is_rejected(st):
    job = dispatch(st)
    payload = {**callback(job, "progress", progress={"step": 1, "total": 4}), "job_id": "someone-else"}
    assert post(gpu_callback_event(st, job.job_id, payload))[0] == 401


def test_unknown_job_404_size_413_content_type_415(st):
    payload = {"job_id": "20991231T000000Z-0000000000", "call_id": "x", "event": "progress", "sent_at": 1}
    assert post(gpu_callback_event(st, "20991231T000000Z-0000000000", payload))[0] == 404
    path = routes.path("gpu", "j")
    big = url_event(path, b"{" + b" " * 300_000 + b"}", {"content-type": "application/json"})
    assert post(big)[0] == 413
    assert post(url_event(path, b"a=b", {"content-type": "application/x-www-form-urlencoded"}))[0] == 415
    assert post(url_event("/nope", b"{}", {"content-type": "application/json"}))[0] == 404
    # Only POST reaches a route; a trailing path segment is not a job id.
    get = url_event(path, b"{}", {"content-type": "application/json"})
    get["requestContext"]["http"]["method"] = "GET"
    assert post(get)[0] == 404
    extra = routes.path("fal", "j") + "/extra"
    assert post(url_event(extra, b"{}", {"content-type": "application/json"}))[0] == 404


def test_terminal_job_is_a_no_op(st):
    job = dispatch(st, backend="modal")
    error = {"code": "internal", "message": "x", "retryable": False}
    post(gpu_callback_event(st, job.job_id, callback(job, "failed", error=error)))
    st.notifications()
    st.put(f"work/{job.job_id}/video.mp4", MP4)
    status, body = post(gpu_callback_event(st, job.job_id, callback(job, "succeeded", result=RESULT)))
    assert status == 200 and body["state"] == "failed"
    assert st.notifications() == [] and not st.object_keys(f"outputs/set/job/{job.job_id}/video.mp4")


# ------------------------------------------------------------------------------------------- fal


def fal_event(st, job, delivery, token="derive", **kw):
    body = json.dumps(delivery).encode()
    headers = st.services.fal_keys.headers(delivery.get("request_id", job.backend_call_id), body, **kw)
    return fal_webhook_event(job.job_id, body, headers, token)


def ok_delivery(job, url="https://v3.fal.media/files/abc/out.mp4"):
    return {
        "request_id": job.backend_call_id,
        "gateway_request_id": job.backend_call_id,
        "status": "OK",
        "payload": {
            "video": {"url": url, "content_type": "video/mp4", "file_name": "out.mp4", "file_size": len(MP4)}
        },
    }


def test_fal_success_streams_the_video_and_notifies_once(st):
    job = dispatch(st, backend="fal")
    event = fal_event(st, job, ok_delivery(job))
    for _ in range(3):
        assert post(event)[0] == 200
    assert st.services.calls("v3.fal.media") == []  # answered before anything is downloaded
    st.store_results()
    done = st.store.get(job.job_id)
    assert done.state == "succeeded" and done.backend == "fal"
    assert st.s3.get_object(Bucket=BUCKET, Key=done.output_key)["Body"].read() == MP4
    meta = st.get_json(done.metadata_key)
    assert meta["backend"] == "fal" and meta["backend_call_id"] == job.backend_call_id
    assert "url" not in meta["result"]["video"]
    assert len(st.services.calls("v3.fal.media")) == 1
    (note,) = st.notifications()
    assert note["status"] == "succeeded" and note["_attributes"]["backend"] == "fal"


def test_fal_error_with_422_detail_fails_with_field_errors(st):
    job = dispatch(st, backend="fal")
    delivery = {
        "request_id": job.backend_call_id,
        "status": "ERROR",
        "error": "Invalid status code: 422",
        "payload": {
            "detail": [{"loc": ["body", "image_url"], "msg": "Could not download the file", "type": "x"}]
        },
    }
    assert post(fal_event(st, job, delivery))[0] == 200
    after = st.store.get(job.job_id)
    assert after.state == "failed"
    assert after.errors == [
        {"field": "image_url", "message": "fal.ai rejected `image_url`: Could not download the file."}
    ]
    (note,) = st.notifications()
    assert note["errors"] == after.errors


def test_fal_payload_error(st):
    job = dispatch(st, backend="fal")
    delivery = {
        "request_id": job.backend_call_id,
        "status": "OK",
        "payload": None,
        "payload_error": "too large",
    }
    post(fal_event(st, job, delivery))
    after = st.store.get(job.job_id)
    assert after.state == "failed" and "too large" in after.errors[0]["message"]


def test_fal_result_from_a_disallowed_host_is_not_fetched(st):
    job = dispatch(st, backend="fal")
    post(fal_event(st, job, ok_delivery(job, url="https://evil.test/x.mp4")))
    st.store_results()
    after = st.store.get(job.job_id)
    assert after.state == "failed" and "not on the allow-list" in after.errors[0]["message"]
    assert st.services.calls("evil.test") == []


def test_fal_cdn_outage_is_retried_from_the_store_queue(st, services):
    job = dispatch(st, backend="fal")
    services.cdn_status = 502
    assert post(fal_event(st, job, ok_delivery(job)))[0] == 200
    (answer,) = st.store_results().values()
    assert answer["batchItemFailures"]  # handed back to SQS, to be tried again
    assert st.store.get(job.job_id).state == "dispatched"
    # Only the live status object (docs/contracts.md): no video, metadata or error report.
    assert [k.rsplit("/", 1)[1] for k in st.object_keys("outputs/")] == ["status.json"]
    assert st.store_requests_waiting() == 1
    services.cdn_status = 200
    assert st.store_results() == {}  # not before its retry delay
    st.end_store_retry_delays()
    st.store_results()
    assert st.store.get(job.job_id).state == "succeeded"
    assert st.store_requests_waiting() == 0


@pytest.mark.parametrize("case", ["stale", "wrong_key", "tampered", "missing"])
def test_fal_signature_problems_are_401(st, case):
    job = dispatch(st, backend="fal")
    delivery = ok_delivery(job)
    body = json.dumps(delivery).encode()
    if case == "stale":
        headers = st.services.fal_keys.headers(job.backend_call_id, body, now=time.time() - 400)
    elif case == "wrong_key":
        from vap_testkit import FalKeys

        headers = FalKeys().headers(job.backend_call_id, body)
    elif case == "tampered":
        headers = st.services.fal_keys.headers(job.backend_call_id, body)
        body = body.replace(b"out.mp4", b"evil.mp4")
    else:
        headers = {"content-type": "application/json"}
    assert post(fal_webhook_event(job.job_id, body, headers))[0] == 401
    assert st.store.get(job.job_id).state == "dispatched" and st.notifications() == []


def test_fal_delivery_for_a_superseded_request_is_ignored(st):
    job = dispatch(st, backend="fal")
    delivery = {**ok_delivery(job), "request_id": "req-other"}
    assert post(fal_event(st, job, delivery))[0] == 200
    assert st.store.get(job.job_id).state == "dispatched"


def test_callback_overtaking_the_dispatch_write_keeps_both(st, services):
    # The GPU reports progress before ingest has recorded the dispatch.
    def on_submit(request):
        cb = {
            "job_id": request["job_id"],
            "call_id": request["call_id"],
            "event": "progress",
            "sent_at": int(time.time()),
            "progress": {"step": 1, "total": 4},
        }
        assert post(gpu_callback_event(st, request["job_id"], cb))[0] == 200

    services.on_modal_submit = on_submit
    job = dispatch(st)
    assert job.state == "running" and job.backend == "modal" and job.backend_call_id == "fc-1"
    assert job.dispatched_at and job.progress == {"step": 1, "total": 4}


def test_secrets_never_reach_the_logs(st):
    import io
    import logging

    from vap_testkit import FAKE_FAL_API_KEY, MODAL_SECRET, SIGNING_SECRET

    # Powertools binds its handlers' streams at import time: point them at a buffer.
    sink = io.StringIO()
    # A handler can hang on several loggers: swap each one once, or its restore would be undone.
    handlers = {
        id(h): h
        for logger in [logging.getLogger(n) for n in list(logging.root.manager.loggerDict)]
        for h in getattr(logger, "handlers", [])
        if isinstance(h, logging.StreamHandler)
    }
    swapped = [(handler, handler.stream) for handler in handlers.values()]
    for handler, _ in swapped:
        handler.setStream(sink)

    job = dispatch(st, backend="auto")
    error = {"code": "internal", "message": "boom", "retryable": True}
    post(gpu_callback_event(st, job.job_id, callback(job, "failed", error=error)))
    fal_job = st.store.get(job.job_id)
    post(fal_event(st, fal_job, ok_delivery(fal_job)))
    st.store_results()
    assert st.store.get(job.job_id).state == "succeeded"
    for handler, stream in swapped:
        handler.stream = stream  # setStream() would flush the old stream, possibly closed by now
    logs = sink.getvalue()
    assert "job dispatched" in logs
    from vap_testkit import fal_token

    for secret in (
        FAKE_FAL_API_KEY,
        MODAL_SECRET,
        SIGNING_SECRET,
        st.gpu_key(job.job_id).hex(),
        fal_token(job.job_id),
    ):
        assert secret not in logs


def test_concurrent_success_deliveries_notify_once(st):
    from concurrent.futures import ThreadPoolExecutor

    st.serialize_moto()
    job = dispatch(st)
    st.put(f"work/{job.job_id}/video.mp4", MP4)
    event = gpu_callback_event(st, job.job_id, callback(job, "succeeded", result=RESULT))
    with ThreadPoolExecutor(max_workers=6) as pool:
        statuses = [r[0] for r in pool.map(lambda _: post(event), range(6))]
    assert statuses == [200] * 6
    st.store_results()  # six requests for one result: stored once, the others find it done
    assert st.store.get(job.job_id).state == "succeeded"
    assert len(st.notifications()) == 1


def _before_the_dispatch_write(st, job, intent="fal"):
    """As if ingest had written its intent to dispatch to fal, submitted, and not yet recorded it."""
    st.store._client.update_item(
        TableName="vap-jobs",
        Key={"job_id": {"S": job.job_id}},
        UpdateExpression="SET #s = :r, dispatch_intent = :i REMOVE backend, backend_call_id",
        ExpressionAttributeNames={"#s": "state"},
        ExpressionAttributeValues={":r": {"S": "received"}, ":i": {"S": intent}},
    )


def test_fal_delivery_overtaking_the_dispatch_write(st):
    job = dispatch(st, backend="fal")
    _before_the_dispatch_write(st, job)
    assert post(fal_event(st, job, ok_delivery(job)))[0] == 200
    st.store_results()
    done = st.store.get(job.job_id)
    assert done.state == "succeeded" and done.backend == "fal" and done.backend_call_id == job.backend_call_id
    (note,) = st.notifications()
    assert note["backend"] == "fal"


def test_fal_error_overtaking_the_dispatch_write_reports_fal(st):
    job = dispatch(st, backend="fal")
    _before_the_dispatch_write(st, job)
    delivery = {
        "request_id": job.backend_call_id,
        "status": "ERROR",
        "error": "runner crashed",
        "payload": None,
    }
    assert post(fal_event(st, job, delivery))[0] == 200
    (note,) = st.notifications()
    assert note["status"] == "failed" and note["backend"] == "fal"


def test_status_object_follows_the_job(st, services):
    from vap_shared.status_object import progress_worth_writing

    job = dispatch(st, backend="fal")
    key = f"{job.output_prefix}status.json"
    status = json.loads(
        st.runtime.s3.get_object(Bucket=st.runtime.settings.bucket_name, Key=key)["Body"].read()
    )
    assert status["job_id"] == job.job_id and status["phase"] == "dispatched" and status["backend"] == "fal"
    assert post(fal_event(st, job, ok_delivery(job)))[0] == 200
    status = json.loads(
        st.runtime.s3.get_object(Bucket=st.runtime.settings.bucket_name, Key=key)["Body"].read()
    )
    assert status["phase"] == "storing"
    st.store_results()
    status = json.loads(
        st.runtime.s3.get_object(Bucket=st.runtime.settings.bucket_name, Key=key)["Body"].read()
    )
    assert status["state"] == status["phase"] == "succeeded"
    assert status["output_key"] == f"{job.output_prefix}video.mp4"
    assert progress_worth_writing(None, {"step": 1, "total": 50})
    assert not progress_worth_writing({"step": 1, "total": 50}, {"step": 2, "total": 50})
    assert progress_worth_writing({"step": 4, "total": 50}, {"step": 5, "total": 50})
    assert progress_worth_writing({"step": 49, "total": 50}, {"step": 50, "total": 50})
