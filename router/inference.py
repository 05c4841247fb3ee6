"""The hot path: POST /generate, /v1/completions, /v1/chat/completions.

Raw ASGI headers and body (no Request object), the JSON parsed only when PD mode or the policy
needs it, admission and routing run inside the ASGI call so a client that disconnects at any point
cancels the work.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import TYPE_CHECKING

import orjson
from disagg.router import metrics
from disagg.router.admission import Rejected
from disagg.router.config import RouterConfig
from disagg.router.errors import error_response
from disagg.router.legs import Call
from disagg.router.responses import ProxyStreamingResponse
from starlette.requests import Request
from starlette.responses import Response

if TYPE_CHECKING:
    from disagg.router.app import RouterState

logger = logging.getLogger("disagg.router")

INFERENCE_PATHS = ("/generate", "/v1/completions", "/v1/chat/completions")


async def inference_route(request: Request) -> Response:
    return await handle_inference(request.app.state.router, request.scope, request.receive)


async def handle_inference(state: RouterState, scope, receive) -> Response:
    """The hot path: raw ASGI headers and body (no Request object), parse only when needed."""
    config = state.config
    started = time.perf_counter()
    wanted = state.wanted_headers
    headers = {k: v.decode("latin-1") for k, v in scope["headers"] if k in wanted}
    request_id = (
        next((headers[n] for n in state.request_id_names if n in headers), None) or os.urandom(16).hex()
    )
    rid_header = {"x-request-id": request_id}
    client_auth = headers.get(b"authorization")
    if config.api_key and client_auth != f"Bearer {config.api_key}":
        metrics.REJECTED.labels(reason="unauthorized").inc()
        return error_response(401, "invalid or missing API key", "authentication_error", headers=rid_header)
    length = headers.get(b"content-length")
    if length is not None and length.isdigit() and int(length) > config.max_payload_size:
        return _too_large(config, rid_header)
    body = await _read_body(receive)
    if len(body) > config.max_payload_size:
        return _too_large(config, rid_header)
    parsed = None
    if state.proxy.needs_json:
        try:
            parsed = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            return error_response(
                400, f"request body is not valid JSON: {exc}", "invalid_request_error", headers=rid_header
            )
        if not isinstance(parsed, dict):
            return error_response(
                400, "request body must be a JSON object", "invalid_request_error", headers=rid_header
            )
    upstream_headers = state.worker_request_headers(request_id, client_auth)
    rid = parsed.get("rid") if parsed is not None and isinstance(parsed.get("rid"), str) else None
    call = Call(scope["path"], body, upstream_headers, request_id, started, parsed, rid)
    return _ProxiedResponse(state, call)


async def _read_body(receive) -> bytes:
    message = await receive()
    body = message.get("body", b"")
    if not message.get("more_body", False):
        return body
    parts = [body]
    while message.get("more_body", False):
        message = await receive()
        parts.append(message.get("body", b""))
    return b"".join(parts)


def _too_large(config: RouterConfig, headers: dict[str, str]) -> Response:
    metrics.REJECTED.labels(reason="payload_too_large").inc()
    return error_response(
        413,
        f"request body larger than --max-payload-size ({config.max_payload_size} bytes)",
        "invalid_request_error",
        headers=headers,
    )


class _ProxiedResponse(Response):
    """Runs admission + routing inside the ASGI call, so a client that disconnects at any point
    (queued, waiting for the first byte, streaming) cancels the work and aborts the legs."""

    def __init__(self, state: RouterState, call: Call):
        self.state = state
        self.call = call
        self.acquired = False
        self.finished = False
        self.client_gone = False

    def on_done(self, status: int) -> None:
        if self.finished:
            return
        self.finished = True
        if self.acquired:
            self.state.gate.release()
        route = self.call.path
        metrics.labelled(metrics.REQUESTS, route, str(status)).inc()
        metrics.labelled(metrics.REQUEST_DURATION, route).observe(time.perf_counter() - self.call.started)

    async def __call__(self, scope, receive, send) -> None:
        # NOTE: the work runs in this task; a watcher task cancels it if the client disconnects
        listener = asyncio.create_task(self._cancel_on_disconnect(receive, asyncio.current_task()))
        try:
            await self._run(scope, receive, send)
        except asyncio.CancelledError:
            if not self.client_gone:
                raise
        finally:
            listener.cancel()
            self.on_done(499)  # no-op unless the client went away before the end

    async def _cancel_on_disconnect(self, receive, task: asyncio.Task) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        self.client_gone = True
        task.cancel()

    async def _run(self, scope, receive, send) -> None:
        try:
            await self.state.gate.acquire()
        except Rejected as exc:
            metrics.REJECTED.labels(reason=exc.reason).inc()
            self.on_done(exc.status)
            response = error_response(
                exc.status,
                str(exc),
                "rate_limit_error" if exc.status == 429 else "timeout",
                headers={"x-request-id": self.call.request_id},
            )
            await response(scope, receive, send)
            return
        self.acquired = True
        try:
            response = await self.state.proxy.forward(self.call, self.on_done)
        except Exception as exc:  # a router bug: still an error object for the client, and counted
            logger.exception("request %s: router error", self.call.request_id)
            self.on_done(500)
            response = error_response(
                500, f"router internal error: {type(exc).__name__}: {exc}", "internal_error"
            )
        if isinstance(response, Response):
            response.headers.setdefault("x-request-id", self.call.request_id)
        if isinstance(response, ProxyStreamingResponse):
            await response.stream_response(send)
        else:
            await response(scope, receive, send)
