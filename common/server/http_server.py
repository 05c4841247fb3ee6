"""The FastAPI app: guard middleware (drain, API key, body size), OpenAI-style errors, all routes.

`create_app(state, ...)` is reused by the prefill and decode servers with their own ServerState.
"""

from __future__ import annotations

import contextlib
import logging
import secrets

from disagg.common.server import native_api, openai_api
from disagg.common.server.protocol import APIError
from disagg.common.server.serving import ServerState
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger(__name__)

OPEN_PATHS = {"/health"}  # reachable without the API key (load balancers, k8s probes)


def error_response(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status)


class GuardMiddleware:
    """Plain ASGI: 503 while draining, 401 without the bearer token, 413 for oversized bodies."""

    def __init__(self, app, state: ServerState, api_key: str | None, max_body_size: int):
        self.app, self.state, self.api_key, self.max_body_size = app, state, api_key, max_body_size

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        err = self.check_headers(scope)
        if err is None and scope["method"] in ("POST", "PUT", "PATCH"):
            body, err = await self.read_body(receive)
            if err is None:
                receive = replay(body, receive)
                scope = as_json(scope)
        if err is not None:
            return await error_response(err)(scope, receive, send)
        return await self.app(scope, receive, send)

    def check_headers(self, scope) -> APIError | None:
        if self.state.draining:
            return APIError(503, "the server is shutting down", type="service_unavailable")
        headers = dict(scope["headers"])
        if self.api_key and scope["path"] not in OPEN_PATHS:
            given = headers.get(b"authorization", b"").decode("latin-1")
            if not secrets.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
                return APIError(401, "invalid or missing API key (Authorization: Bearer ...)",
                                type="authentication_error")  # fmt: skip
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_size:
            return self.too_large()
        return None

    def too_large(self) -> APIError:
        return APIError(413, f"the request body is larger than {self.max_body_size} bytes",
                        type="invalid_request_error")  # fmt: skip

    async def read_body(self, receive) -> tuple[bytes, APIError | None]:
        """Read the whole body, stopping as soon as it is too large (chunked uploads included)."""
        chunks, size = [], 0
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return b"", APIError(400, "client disconnected")
            size += len(msg.get("body", b""))
            if size > self.max_body_size:
                return b"", self.too_large()
            chunks.append(msg.get("body", b""))
            if not msg.get("more_body", False):
                return b"".join(chunks), None


def as_json(scope):
    """Bodies are JSON whatever the Content-Type says (`curl -d` sends form-urlencoded)."""
    headers = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
    return {**scope, "headers": [*headers, (b"content-type", b"application/json")]}


def replay(body: bytes, receive):
    sent = False

    async def receive_again():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # then the real channel: http.disconnect

    return receive_again


def validation_error(exc: RequestValidationError) -> APIError:
    first = exc.errors()[0] if exc.errors() else {}
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    if first.get("type") == "json_invalid":
        return APIError(400, f"invalid JSON body: {first.get('ctx', {}).get('error', first.get('msg'))}")
    param = ".".join(loc) or None
    return APIError(400, f"{param or 'body'}: {first.get('msg', 'invalid value')}", param)


def create_app(state: ServerState, api_key: str | None = None, max_body_size: int = 32 << 20) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        await state.tm.start()
        yield
        await state.tm.stop()

    app = FastAPI(title="disagg", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = state
    app.add_middleware(GuardMiddleware, state=state, api_key=api_key, max_body_size=max_body_size)

    @app.exception_handler(APIError)
    async def on_api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return error_response(APIError(exc.status_code, str(exc.detail), type=kind))

    @app.exception_handler(Exception)
    async def on_crash(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error on %s", request.url.path)
        return error_response(
            APIError(500, f"internal error: {exc}", type="internal_error", code="internal_error")
        )

    app.include_router(openai_api.router)
    app.include_router(native_api.router)
    return app
