"""What a backend's answer to a submit means for the job.

Only a validation rejection of the request itself (422) is permanent. A 404/405/410 or a non-JSON
(HTML) answer from Modal is a stopped app or a wrong `ModalEndpointUrl`: an `auto` job falls back to
fal, and a `modal` job is retried by SQS and then fails with a reason that says what to check.
"""

from __future__ import annotations

from dataclasses import dataclass

import httpx
import ingest
import pytest
from vap_shared.ingest_logic import Ingestor
from vap_testkit import MODAL_KEY, FakeServices, call, sqs_event, stack, upload_fal_example

STOPPED_APP = "modal-http: app for invoked web endpoint is stopped"
HTML = "<!doctype html><html><body><h1>Not Found</h1></body></html>"


@dataclass
class ModalAnswers(FakeServices):
    """Modal's `/submit` answers one fixed response (status, content type, body)."""

    answer: tuple[int, str, str] = (404, "application/json", '{"detail": "Not Found"}')

    def handler(self, request: httpx.Request) -> httpx.Response:
        if request.url.host == "modal.test" and request.headers.get("modal-key") == MODAL_KEY:
            self.requests.append(request)
            status, content_type, body = self.answer
            return httpx.Response(status, headers={"content-type": content_type}, content=body.encode())
        return super().handler(request)


ENDPOINT_GONE = "is the app deployed and running, and is the endpoint URL right?"
CASES = {
    # FastAPI's own 404/405 for a path the app does not serve (an old app version, a wrong URL).
    "404-json": ((404, "application/json", '{"detail": "Not Found"}'), "HTTP 404"),
    "405": ((405, "application/json", '{"detail": "Method Not Allowed"}'), "HTTP 405"),
    "410": ((410, "text/plain", "gone"), "HTTP 410, text/plain"),
    # Modal's proxy for a stopped app / a wrong workspace URL: plain text or an HTML page.
    "404-stopped-app": ((404, "text/plain", STOPPED_APP), "HTTP 404, text/plain"),
    "404-html": ((404, "text/html", HTML), "HTTP 404, text/html"),
    "200-html": ((200, "text/html", HTML), "answered without a call_id"),
    "400-html": ((400, "text/html", HTML), "answered HTTP 400, text/html"),
}


def job_of(st):  # type: ignore[no-untyped-def]
    (job_id,) = st.job_ids()
    return st.store.get(job_id)


@pytest.mark.parametrize(("answer", "reason"), list(CASES.values()), ids=list(CASES))
def test_auto_job_falls_back_to_fal_when_modal_has_no_such_endpoint(monkeypatch, answer, reason):
    services = ModalAnswers(answer=answer)
    with stack(monkeypatch, services) as st:
        ingest._ingestor = Ingestor(st.runtime)
        try:
            assert call(ingest.handler, sqs_event(upload_fal_example(st, backend="auto"))) == {
                "batchItemFailures": []
            }
            job = job_of(st)
            assert (job.state, job.backend, job.fallback_from) == ("dispatched", "fal", "modal")
            assert reason in job.fallback_reason
            if answer[0] in (404, 405, 410):
                assert ENDPOINT_GONE in job.fallback_reason
            assert len(services.calls("queue.fal.test")) == 1
        finally:
            ingest.reset()


@pytest.mark.parametrize(("answer", "reason"), list(CASES.values()), ids=list(CASES))
def test_modal_only_job_is_retried_then_fails_saying_what_to_check(monkeypatch, answer, reason):
    services = ModalAnswers(answer=answer)
    with stack(monkeypatch, services) as st:
        ingest._ingestor = Ingestor(st.runtime)
        try:
            event = upload_fal_example(st, backend="modal")
            # Retried by SQS (the app may be redeployed meanwhile), never sent to fal.
            for attempt in (1, 2, 3):
                result = call(ingest.handler, sqs_event(event, receive_count=attempt))
                assert result == {"batchItemFailures": [{"itemIdentifier": "m-0"}]}
                assert job_of(st).state == "received"
            call(ingest.handler, sqs_event(event, receive_count=4))  # INGEST_MAX_ATTEMPTS
            job = job_of(st)
            assert job.state == "failed" and services.calls("queue.fal.test") == []
            messages = [e["message"] for e in job.errors]
            assert any(
                m.startswith("The Modal backend could not take the job") and reason in m for m in messages
            )
            if answer[0] in (404, 405, 410):
                assert any(ENDPOINT_GONE in m for m in messages)
            assert messages[-1] == "Gave up after 4 attempts."
            assert len(services.calls("modal.test")) == 4
        finally:
            ingest.reset()


def test_a_422_from_modal_is_the_only_permanent_rejection(monkeypatch):
    services = ModalAnswers(answer=(422, "application/json", '{"detail": [{"loc": ["body"], "msg": "x"}]}'))
    with stack(monkeypatch, services) as st:
        ingest._ingestor = Ingestor(st.runtime)
        try:
            sidecar_event = upload_fal_example(st, backend="auto")
            assert call(ingest.handler, sqs_event(sidecar_event)) == {"batchItemFailures": []}
            job = job_of(st)
            assert job.state == "failed" and services.calls("queue.fal.test") == []
            assert "rejected the request (HTTP 422)" in job.errors[0]["message"]
        finally:
            ingest.reset()
