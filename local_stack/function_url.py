"""A Lambda Function URL on a loopback port: HTTP requests become payload-2.0 events.

Mirrors what AWS does for a BUFFERED Function URL with AuthType NONE: lower-cased headers,
text bodies passed as-is and others base64-encoded, a 6 MB request cap, 429 when the
function's reserved concurrency is used up, 502 when the invocation fails (the handler raises,
is killed at its Timeout, or its environment crashes).
"""

from __future__ import annotations

import base64
import json
import logging
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from local_stack.lambda_runtime import LambdaFunction
from local_stack.net import LoopbackServer

log = logging.getLogger("local_stack.function_url")

MAX_PAYLOAD_BYTES = 6 * 1024 * 1024
_TEXT_TYPES = ("text/", "application/json", "application/xml", "application/javascript", "+json", "+xml")
_URL_ID = "localfunctionurl0000000000000000"


def _is_text(content_type: str) -> bool:
    lowered = content_type.lower()
    return any(marker in lowered for marker in _TEXT_TYPES) or "x-www-form-urlencoded" in lowered


def build_event(
    method: str, target: str, headers: list[tuple[str, str]], body: bytes, source_ip: str
) -> dict[str, Any]:
    """The payload-2.0 event Lambda builds for a Function URL request."""
    parts = urlsplit(target)
    merged: dict[str, str] = {}
    cookies: list[str] = []
    for name, value in headers:
        key = name.lower()
        if key == "cookie":
            cookies.extend(c.strip() for c in value.split(";") if c.strip())
            continue
        merged[key] = f"{merged[key]},{value}" if key in merged else value
    query: dict[str, str] = {}
    for name, value in parse_qsl(parts.query, keep_blank_values=True):
        query[name] = f"{query[name]},{value}" if name in query else value
    is_text = _is_text(merged.get("content-type", "text/plain"))
    if is_text:
        try:
            body_text, encoded = body.decode("utf-8"), False
        except UnicodeDecodeError:
            body_text, encoded = base64.b64encode(body).decode("ascii"), True
    else:
        body_text, encoded = base64.b64encode(body).decode("ascii"), True
    now = time.time()
    domain = merged.get("host", "127.0.0.1")
    event: dict[str, Any] = {
        "version": "2.0",
        "routeKey": "$default",
        "rawPath": parts.path or "/",
        "rawQueryString": parts.query,
        "headers": merged,
        "requestContext": {
            "accountId": "anonymous",
            "apiId": _URL_ID,
            "domainName": domain,
            "domainPrefix": _URL_ID,
            "http": {
                "method": method,
                "path": parts.path or "/",
                "protocol": "HTTP/1.1",
                "sourceIp": source_ip,
                "userAgent": merged.get("user-agent", ""),
            },
            "requestId": str(uuid.uuid4()),
            "routeKey": "$default",
            "stage": "$default",
            "time": time.strftime("%d/%b/%Y:%H:%M:%S +0000", time.gmtime(now)),
            "timeEpoch": int(now * 1000),
        },
        "isBase64Encoded": encoded,
    }
    if cookies:
        event["cookies"] = cookies
    if query:
        event["queryStringParameters"] = query
    if body:
        event["body"] = body_text
    return event


def render_response(result: Any) -> tuple[int, dict[str, str], bytes]:
    """Lambda's Function URL response mapping (a dict with statusCode, or anything as JSON)."""
    if isinstance(result, dict) and "statusCode" in result:
        headers = {str(k): str(v) for k, v in (result.get("headers") or {}).items()}
        raw = result.get("body") or ""
        body = base64.b64decode(raw) if result.get("isBase64Encoded") else str(raw).encode("utf-8")
        return int(result["statusCode"]), headers, body
    # Without statusCode, Lambda infers 200 and a JSON body.
    return 200, {"content-type": "application/json"}, json.dumps(result).encode("utf-8")


class FunctionUrlServer:
    """Serves one function as its Function URL at `url` (with the trailing slash AWS shows)."""

    def __init__(self, function: LambdaFunction, port: int = 0) -> None:
        self.function = function
        self.requests: list[dict[str, Any]] = []  # (method, path, status) of each request, for tests
        self.dropped: list[dict[str, Any]] = []  # events of the requests lost on their way
        self._drops: list[Callable[[dict[str, Any]], bool]] = []
        # Chaos (bench.chaos; off by default): seconds to hold back this answer, drawn per request
        # (None: answer at once). The function has run; only its answer is late for the caller.
        self.answer_delay: Callable[[], float | None] | None = None
        self.slow_answers = 0
        self._server = LoopbackServer(self._handler_class(), port)

    @contextmanager
    def dropping(self, predicate: Callable[[dict[str, Any]], bool]) -> Iterator[list[dict[str, Any]]]:
        """Lose the requests whose event matches `predicate` on the network: the connection is closed
        without an answer and the function never sees them (the sender sees a connection error).
        Yields the list of the events lost so far."""
        self._drops.append(predicate)
        try:
            yield self.dropped
        finally:
            self._drops.remove(predicate)

    def _dropped(self, event: dict[str, Any]) -> bool:
        if any(predicate(event) for predicate in list(self._drops)):
            self.dropped.append(event)
            return True
        return False

    @property
    def port(self) -> int:
        return self._server.port

    @property
    def url(self) -> str:
        return self._server.url + "/"

    def start(self) -> None:
        self._server.start()

    def stop(self) -> None:
        self._server.stop()

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                log.debug("function url: " + format, *args)

            def _serve(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                if length > MAX_PAYLOAD_BYTES:
                    self._reply(413, {"content-type": "application/json"}, b'{"Message":"Request too large"}')
                    return
                body = self.rfile.read(length) if length else b""
                event = build_event(
                    self.command, self.path, list(self.headers.items()), body, self.client_address[0]
                )
                if outer._dropped(event):
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                try:
                    ran, result = outer.function.try_invoke(event)
                except Exception:
                    # A function error, a timeout or a crash: the caller gets a bare 502.
                    self._reply(
                        502, {"content-type": "application/json"}, b'{"Message":"Internal Server Error"}'
                    )
                    return
                if not ran:
                    self._reply(429, {"content-type": "application/json"}, b'{"Message":"Rate Exceeded."}')
                    return
                status, headers, payload = render_response(result)
                delay = outer.answer_delay() if outer.answer_delay is not None else None
                if delay:
                    outer.slow_answers += 1
                    time.sleep(delay)
                self._reply(status, headers, payload)

            def _reply(self, status: int, headers: dict[str, str], payload: bytes) -> None:
                outer.requests.append({"method": self.command, "path": self.path, "status": status})
                self.send_response(status)
                for name, value in headers.items():
                    if name.lower() not in ("content-length", "connection", "transfer-encoding"):
                        self.send_header(name, value)
                self.send_header("Content-Length", str(len(payload)))
                try:
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    # The caller stopped waiting (fal's delivery timeout): it never sees this answer.
                    self.close_connection = True

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _serve

        return Handler
