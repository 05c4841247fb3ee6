"""The router's small routes: model/server info passthrough, health, abort broadcast, metrics."""

from __future__ import annotations

import asyncio
import contextlib
import os
from typing import TYPE_CHECKING

from disagg.router import metrics
from disagg.router.config import RouterConfig
from disagg.router.errors import error_response
from disagg.router.proxy import fetch
from disagg.router.upstream import UPSTREAM_ERRORS
from disagg.router.workers import Worker
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

if TYPE_CHECKING:
    from disagg.router.app import RouterState

INFO_PATHS = ("/v1/models", "/server_info", "/get_server_info", "/model_info", "/get_model_info")


# ---- request helpers -----------------------------------------------------------------------------


def _request_id(request: Request, config: RouterConfig) -> str:
    for name in config.request_id_headers:
        value = request.headers.get(name)
        if value:
            return value
    return os.urandom(16).hex()


def _client_auth_error(request: Request, state: RouterState, request_id: str) -> Response | None:
    key = state.config.api_key
    if key and request.headers.get("authorization") != f"Bearer {key}":
        metrics.REJECTED.labels(reason="unauthorized").inc()
        return error_response(
            401, "invalid or missing API key", "authentication_error", headers={"x-request-id": request_id}
        )
    return None


# ---- info, health, metrics -----------------------------------------------------------------------


async def info(request: Request) -> Response:
    """GET passthrough to the first worker that answers (decode first in PD mode)."""
    state: RouterState = request.app.state.router
    request_id = _request_id(request, state.config)
    denied = _client_auth_error(request, state, request_id)
    if denied is not None:
        return denied
    headers = state.worker_request_headers(request_id, request.headers.get("authorization"))
    for role in reversed(state.roles):
        for worker in state.registry.available(role):
            try:
                status, body, media_type = await fetch(
                    state.client, "GET", worker.url, request.scope["path"], headers, 10.0
                )
            except UPSTREAM_ERRORS:
                continue
            return Response(body, status, headers={"x-request-id": request_id}, media_type=media_type)
    return error_response(
        503, "no available worker", "service_unavailable", headers={"x-request-id": request_id}
    )


async def health(request: Request) -> Response:
    state: RouterState = request.app.state.router
    missing = [role.value for role in state.roles if not state.registry.available(role)]
    if missing:
        return error_response(503, f"no healthy {' or '.join(missing)} worker", "service_unavailable")
    return JSONResponse({"status": "ok"})


async def liveness(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def health_generate(request: Request) -> Response:
    """One real generation check per role: GET /health_generate on one available worker of each."""
    state: RouterState = request.app.state.router
    picks = []
    for role in state.roles:
        workers = state.registry.available(role)
        if not workers:
            return error_response(503, f"no healthy {role.value} worker", "service_unavailable")
        picks.append(min(workers, key=lambda w: w.outstanding))

    async def probe(worker: Worker) -> str | None:
        # NOTE: a real generation: allow more than a /health probe
        timeout = max(state.config.health_check_timeout_secs, 30.0)
        try:
            status, _, _ = await fetch(
                state.client, "GET", worker.url, "/health_generate", state.worker_headers, timeout
            )
        except UPSTREAM_ERRORS as exc:
            return f"{worker.url}: {type(exc).__name__}"
        return None if status == 200 else f"{worker.url}: HTTP {status}"

    failures = [f for f in await asyncio.gather(*(probe(w) for w in picks)) if f]
    if failures:
        return error_response(503, "health_generate failed: " + "; ".join(failures), "service_unavailable")
    return JSONResponse({"status": "ok"})


async def abort_request(request: Request) -> Response:
    """Broadcast to every worker: the router does not remember where a rid went."""
    state: RouterState = request.app.state.router
    denied = _client_auth_error(request, state, _request_id(request, state.config))
    if denied is not None:
        return denied
    body = await request.body()
    headers = {"content-type": "application/json", **state.worker_headers}

    async def send(worker: Worker) -> None:
        with contextlib.suppress(*UPSTREAM_ERRORS):
            await fetch(state.client, "POST", worker.url, "/abort_request", headers, 5.0, body)

    await asyncio.gather(*(send(w) for w in state.registry.all()))
    return JSONResponse({"status": "ok"})


async def metrics_route(request: Request) -> Response:
    metrics.QUEUE_SIZE.set(request.app.state.router.gate.queued)
    return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)
