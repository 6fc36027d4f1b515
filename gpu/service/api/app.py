"""The GPU HTTP API (docs/contracts.md): submit, status, cancel, over an `Executor`.

The same FastAPI app serves on Modal (`ModalExecutor`) and locally (`LocalExecutor`), both in
`gpu.service.api.executors`.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable

from fastapi import FastAPI, HTTPException, Request, Response
from fastapi.responses import JSONResponse
from vap_shared.gpu_contract import CancelResponse, GpuJobRequest, StatusResponse, SubmitResponse

from gpu.service.api.executors import Executor
from gpu.service.routing import SubmitRejected

KEY_HEADER = "Modal-Key"
SECRET_HEADER = "Modal-Secret"  # noqa: S105 (a header name, not a secret)


def _authorized(request: Request, key: str, secret: str) -> bool:
    given_key = request.headers.get(KEY_HEADER, "").encode()
    given_secret = request.headers.get(SECRET_HEADER, "").encode()
    # Evaluate both comparisons (no short-circuit) and compare in constant time.
    key_ok = hmac.compare_digest(given_key, key.encode())
    secret_ok = hmac.compare_digest(given_secret, secret.encode())
    return key_ok & secret_ok


def create_app(executor: Executor, auth: tuple[str, str] | None = None) -> FastAPI:
    """The GPU API. `auth=(key, secret)` checks Modal-Key/Modal-Secret here (the local server);
    on Modal, `requires_proxy_auth=True` makes the proxy check them before the request arrives.
    """
    app = FastAPI(title="VAP GPU", docs_url=None, redoc_url=None, openapi_url=None)

    if auth is not None:
        key, secret = auth

        # A middleware (not a dependency) so auth runs before body parsing: an unauthenticated
        # caller gets 401, never a 422 that reveals the schema.
        @app.middleware("http")
        async def check_auth(
            request: Request, call_next: Callable[[Request], Awaitable[Response]]
        ) -> Response:
            if not _authorized(request, key, secret):
                return JSONResponse({"detail": "unauthorized"}, status_code=401)
            return await call_next(request)

    @app.post("/submit", status_code=202, response_model=SubmitResponse)
    def submit(body: GpuJobRequest) -> SubmitResponse:
        try:
            return SubmitResponse(call_id=executor.submit(body))
        except SubmitRejected as exc:
            raise HTTPException(status_code=exc.status_code, detail=exc.message) from exc

    @app.get("/status/{call_id}", response_model=StatusResponse)
    def status(call_id: str) -> StatusResponse:
        found = executor.status(call_id)
        if found is None:
            raise HTTPException(status_code=404, detail="unknown call_id")
        return found

    @app.post("/cancel/{call_id}", response_model=CancelResponse)
    def cancel(call_id: str) -> CancelResponse:
        cancelled = executor.cancel(call_id)
        if cancelled is None:
            raise HTTPException(status_code=404, detail="unknown call_id")
        return CancelResponse(call_id=call_id, cancelled=cancelled)

    return app
