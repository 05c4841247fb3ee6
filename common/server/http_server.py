"""The FastAPI app: guard middleware (drain, API keys, body size, crash net), OpenAI-style errors, routes.

`create_app(state, ...)` is reused by the prefill and decode servers with their own ServerState.

Access policy: /health and /metrics are open (probes and Prometheus scrapers carry no key; the
metrics hold counts, never request data); everything else needs `--api-key` when one is set. With
`--admin-api-key`, the admin operations need that key: /flush_cache, /eplb_rebalance, `abort_all`, and aborting a
request created with another key. Without it, the API key holder is the admin.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import secrets
import time

from disagg.common.server import native_api, openai_api
from disagg.common.server.protocol import SERVER_ERROR, APIError
from disagg.common.server.serving import IS_ADMIN, PRINCIPAL, ServerState, admin_required
from disagg.common.server.tokenizer_manager import REQUEST_ARRIVAL
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger(__name__)

OPEN_PATHS = {"/health", "/metrics"}  # reachable without a key (probes, Prometheus scrapers)
ADMIN_PATHS = {"/flush_cache", "/eplb_rebalance"}  # the admin key's alone when --admin-api-key is set


def error_response(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status)


class GuardMiddleware:
    """Plain ASGI: 503 while draining, 401 without a valid bearer token, 403 for admin paths without
    the admin key, 413 for oversized bodies; and a crash net: an unexpected exception answers an
    OpenAI-style 500 and keeps the keep-alive connection usable (Starlette's own handler re-raises,
    and uvicorn then closes the connection)."""

    def __init__(self, app, state: ServerState, api_key: str | None, max_body_size: int,
                 admin_api_key: str | None = None):  # fmt: skip
        self.app, self.state, self.api_key, self.max_body_size = app, state, api_key, max_body_size
        self.admin_api_key = admin_api_key

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        REQUEST_ARRIVAL.set(time.monotonic())  # TTFT and latency count from here (tokenizer_manager.py)
        err = self.check_headers(scope)
        if err is None and scope["method"] in ("POST", "PUT", "PATCH"):
            body, err = await self.read_body(receive)
            if err is None:
                receive = replay(body, receive)
                scope = as_json(scope)
        if err is not None:
            return await error_response(err)(scope, receive, send)
        return await self.call_app(scope, receive, send)

    async def call_app(self, scope, receive, send):
        started = False

        async def tracked_send(msg):
            nonlocal started
            started = started or msg["type"] == "http.response.start"
            await send(msg)

        try:
            await self.app(scope, receive, tracked_send)
        except Exception as exc:
            logger.exception("unhandled error on %s", scope["path"])
            if started:  # the head is out: nothing left to tell the client
                raise
            err = APIError(500, f"internal error: {type(exc).__name__}: {exc}", type=SERVER_ERROR,
                           code="internal_error")  # fmt: skip
            await error_response(err)(scope, receive, send)

    def check_headers(self, scope) -> APIError | None:
        if self.state.draining:
            return APIError(503, "the server is shutting down", type="service_unavailable")
        headers = dict(scope["headers"])
        given = headers.get(b"authorization", b"")
        has_admin_key = self.admin_api_key is not None and _matches(given, self.admin_api_key)
        is_client = has_admin_key or not self.api_key or _matches(given, self.api_key)
        is_admin = has_admin_key if self.admin_api_key else is_client
        if scope["path"] not in OPEN_PATHS and not is_client:
            return APIError(401, "invalid or missing API key (Authorization: Bearer ...)",
                            type="authentication_error")  # fmt: skip
        if scope["path"] in ADMIN_PATHS and not is_admin:
            return admin_required(scope["path"])
        scope[IS_ADMIN] = is_admin
        # requests are bound to the key that created them: only that key (or the admin) aborts them
        scope[PRINCIPAL] = hashlib.sha256(given).hexdigest()[:16] if given else None
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


def _matches(given: bytes, key: str) -> bool:
    return secrets.compare_digest(given, f"Bearer {key}".encode())


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


# pydantic's union members in an error's location ("stop", "list[str]", 0): not the client's names
_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none", "is-instance"}


def _param(loc) -> str | None:
    names = [
        str(x) for x in loc if x != "body" and not (isinstance(x, str) and ("[" in x or x in _TYPE_TAGS))
    ]
    return ".".join(names) or None


def validation_error(exc: RequestValidationError) -> APIError:
    """400 naming the parameter and the value sent; a union's members' complaints joined with "or"."""
    errors = exc.errors()
    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid":
        return APIError(400, f"invalid JSON body: {first.get('ctx', {}).get('error', first.get('msg'))}")
    # a union's members each complain; the one that got deepest into the value says most
    first = max(errors, key=lambda e: len((_param(e.get("loc", ())) or "").split(".")), default=first)
    param = _param(first.get("loc", ()))
    same = [e for e in errors if _param(e.get("loc", ())) == param] or [first]
    why = " or ".join(dict.fromkeys(e.get("msg", "invalid value") for e in same))
    message = f"{param or 'body'}: {why}"
    if "input" in first and first.get("type") != "missing":
        message += f", got {_short(first['input'])}"
    return APIError(400, message, param)


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:60]}... ({len(text)} characters)"


def create_app(state: ServerState, api_key: str | None = None, max_body_size: int = 32 << 20,
               admin_api_key: str | None = None) -> FastAPI:  # fmt: skip
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        await state.tm.start()
        yield
        await state.tm.stop()

    app = FastAPI(title="disagg", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = state
    app.add_middleware(GuardMiddleware, state=state, api_key=api_key, max_body_size=max_body_size,
                       admin_api_key=admin_api_key)  # fmt: skip

    @app.exception_handler(APIError)
    async def on_api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        detail = f"{request.method} {request.url.path}: {exc.detail}"
        return error_response(APIError(exc.status_code, detail, type=kind))

    app.include_router(openai_api.router)
    app.include_router(native_api.router)
    return app
