"""moto in server mode, with AWS's own failures injectable where they happen: at the API.

`MotoServer` is moto's `ThreadedMotoServer` with one WSGI layer in front of moto's app. Tests add
`AwsFault`s to `faults`: a matching request is answered with the error AWS would send (e.g. S3's
500 InternalError) instead of reaching moto, so every client (a function's, the harness's) sees the
fault exactly as it would see AWS's, retries included.
"""

from __future__ import annotations

import io
import json
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, unquote

from moto.moto_server.threaded_moto_server import ThreadedMotoServer
from moto.moto_server.werkzeug_app import (
    DomainDispatcherApplication,
    MotoRequestHandler,
    create_backend_app,
)
from werkzeug.serving import make_server

WsgiApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


@dataclass(frozen=True)
class AwsRequest:
    """What a fault matches on: the service (from the signature's scope), the operation, and for
    S3 the bucket and key."""

    service: str
    operation: str
    bucket: str = ""
    key: str = ""
    body: bytes = b""


@dataclass
class AwsFault:
    """Answer matching requests with an AWS error. `times`: how many (None: until removed)."""

    service: str
    operation: str
    match: Callable[[AwsRequest], bool] = lambda request: True
    status: int = 500
    code: str = "InternalError"
    message: str = "We encountered an internal error. Please try again."
    times: int | None = None
    hits: list[AwsRequest] = field(default_factory=list)

    def applies(self, request: AwsRequest) -> bool:
        if (request.service, request.operation) != (self.service, self.operation):
            return False
        if self.times is not None and len(self.hits) >= self.times:
            return False
        return self.match(request)


def _credential_scope_service(environ: dict[str, Any]) -> str:
    auth = environ.get("HTTP_AUTHORIZATION", "")
    if "Credential=" in auth:
        scope = auth.split("Credential=", 1)[1].split(",", 1)[0].split("/")
        return scope[3] if len(scope) > 3 else ""
    credential = parse_qs(environ.get("QUERY_STRING", "")).get("X-Amz-Credential", [""])[0]
    parts = credential.split("/")
    return parts[3] if len(parts) > 3 else ""


def _s3_operation(environ: dict[str, Any], key: str) -> str:
    method = environ["REQUEST_METHOD"]
    query = parse_qs(environ.get("QUERY_STRING", ""), keep_blank_values=True)
    if not key:
        return {"GET": "ListObjects", "HEAD": "HeadBucket", "PUT": "CreateBucket"}.get(method, method)
    if method == "PUT":
        if "partNumber" in query:
            return "UploadPart"
        return "CopyObject" if environ.get("HTTP_X_AMZ_COPY_SOURCE") else "PutObject"
    if method == "POST":
        return "CreateMultipartUpload" if "uploads" in query else "CompleteMultipartUpload"
    if method == "DELETE":
        return "AbortMultipartUpload" if "uploadId" in query else "DeleteObject"
    return {"GET": "GetObject", "HEAD": "HeadObject"}.get(method, method)


def describe(environ: dict[str, Any], body: bytes) -> AwsRequest:
    service = _credential_scope_service(environ)
    if service == "s3":
        path = unquote(environ.get("PATH_INFO", "")).lstrip("/")
        bucket, _, key = path.partition("/")
        return AwsRequest("s3", _s3_operation(environ, key), bucket, key)
    target = environ.get("HTTP_X_AMZ_TARGET", "")
    if target:
        return AwsRequest(service, target.rsplit(".", 1)[-1], body=body)
    action = parse_qs(body.decode("utf-8", "replace")).get("Action", [""])[0]
    action = action or parse_qs(environ.get("QUERY_STRING", "")).get("Action", [""])[0]
    return AwsRequest(service, action, body=body)


def _error_response(fault: AwsFault, request: AwsRequest) -> tuple[str, list[tuple[str, str]], bytes]:
    status = f"{fault.status} Error"
    if request.service == "s3" or not request.body.startswith(b"{"):
        body = (
            f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{fault.code}</Code>'
            f"<Message>{fault.message}</Message><RequestId>injected</RequestId></Error>"
        ).encode()
        return status, [("Content-Type", "application/xml")], body
    body = json.dumps({"__type": fault.code, "message": fault.message}).encode()
    return status, [("Content-Type", "application/x-amz-json-1.0")], body


class FaultInjector:
    """The WSGI layer: answers with an injected fault, or passes the request to moto unchanged."""

    def __init__(self, app: WsgiApp) -> None:
        self.app = app
        self.faults: list[AwsFault] = []
        self._lock = threading.Lock()
        # moto's backends are not thread-safe: in a chaos run a DynamoDB query racing a write
        # answered 500 ("dictionary changed size during iteration"), which DynamoDB never does for
        # that. DynamoDB requests are quick and never long-poll, so they are served one at a time.
        self._dynamodb = threading.Lock()

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if self.faults and not environ.get("PATH_INFO", "").startswith("/moto-api"):
            length = int(environ.get("CONTENT_LENGTH") or 0)
            body = environ["wsgi.input"].read(length) if length else b""
            environ["wsgi.input"] = io.BytesIO(body)
            request = describe(environ, body)
            with self._lock:
                fault = next((f for f in self.faults if f.applies(request)), None)
                if fault is not None:
                    fault.hits.append(request)
            if fault is not None:
                status, headers, payload = _error_response(fault, request)
                start_response(status, [*headers, ("Content-Length", str(len(payload)))])
                return [payload]
        if _credential_scope_service(environ) == "dynamodb":
            with self._dynamodb:
                return list(self.app(environ, start_response))
        return self.app(environ, start_response)


class MotoServer(ThreadedMotoServer):
    """`ThreadedMotoServer` with the fault layer in front of moto's app."""

    def __init__(self, ip_address: str, port: int) -> None:
        super().__init__(ip_address=ip_address, port=port, verbose=False)
        self.injector = FaultInjector(DomainDispatcherApplication(create_backend_app))

    def _server_entry(self) -> None:
        self._server = make_server(
            self._ip_address, self._port, self.injector, True, request_handler=MotoRequestHandler
        )
        self._server_ready_event.set()
        self._server.serve_forever()

    @contextmanager
    def fault(self, fault: AwsFault) -> Iterator[AwsFault]:
        """Inject `fault` for the duration of the block."""
        with self.injector._lock:
            self.injector.faults.append(fault)
        try:
            yield fault
        finally:
            with self.injector._lock:
                self.injector.faults.remove(fault)
