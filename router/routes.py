"""The router's small routes: model/server info passthrough, health, abort and flush broadcasts, metrics.

Open without a key: /health, /readiness, /liveness, /health_generate, /metrics (probes and
scrapers). Client key: info passthrough, /abort_request by rid. Admin key: abort_all, /flush_cache, /eplb_rebalance.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from typing import TYPE_CHECKING

import orjson
from disagg.router import metrics
from disagg.router.admin import BadBody, admin_denied, has_key, json_object
from disagg.router.config import RouterConfig
from disagg.router.errors import error_response
from disagg.router.legs import fetch
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
    key, admin = state.config.api_key, state.config.effective_admin_api_key
    if key and not (
        has_key(request, key) or (admin and has_key(request, admin))
    ):  # the admin is a client too
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
    """Broadcast to every worker (the router does not remember where a rid went). By rid: any client
    that knows the id (it got it back; ids are unguessable unless the client chose its own).
    `abort_all`: the admin only."""
    state: RouterState = request.app.state.router
    request_id = _request_id(request, state.config)
    denied = _client_auth_error(request, state, request_id)
    if denied is not None:
        return denied
    try:
        spec = _abort_spec(await json_object(request))
    except BadBody as exc:
        return exc.response()
    if spec.get("abort_all") and (denied := admin_denied(request, state, "abort_all")) is not None:
        return denied
    headers = state.worker_request_headers(request_id, request.headers.get("authorization"))
    if spec.get("abort_all"):
        headers = _admin_worker_headers(request, state, headers)
    results = await _broadcast(state, "/abort_request", headers, orjson.dumps(spec), 5.0)
    aborted = sum(
        body.get("aborted", 0) for _, status, body in results if status == 200 and isinstance(body, dict)
    )
    return JSONResponse({"status": "ok", "aborted": aborted})


def _abort_spec(body: dict) -> dict:
    rid, abort_all = body.get("rid"), body.get("abort_all", False)
    if abort_all not in (True, False, None):
        raise BadBody(f"abort_all must be a boolean, got {abort_all!r}", "abort_all")
    if abort_all:
        return {"abort_all": True}
    if not isinstance(rid, str) or not rid:
        raise BadBody(f"give `rid` (a string) or `abort_all: true`, got rid={rid!r}", "rid")
    return {"rid": rid}


async def flush_cache(request: Request) -> Response:
    """SGLang router's /flush_cache: every worker drops its prefix cache (admin only). 200 when all
    did; else the first worker's refusal (400 while it runs requests) or 502, with each worker's status."""
    return await _admin_broadcast(request, "/flush_cache", 30.0, "flush_failed", "flush their cache")


async def eplb_rebalance(request: Request) -> Response:
    """/eplb_rebalance on every worker (admin only): each MoE server re-places its experts from the
    load it counted (`--enable-eplb`). 200 with each worker's placement summary (`answer`) when all
    did; else the first refusal (400: no counted load, no MoE layers) or 502. The servers take up to
    120 s to answer, so the wait is longer than for a flush."""
    return await _admin_broadcast(
        request, "/eplb_rebalance", 150.0, "rebalance_failed", "rebalance their experts"
    )


async def _admin_broadcast(request: Request, path: str, timeout: float, code: str, what: str) -> Response:
    """An admin command sent to every worker with the client's body: {"status": "ok", "workers":
    [{url, status, answer}]}, or an error object naming the workers that failed."""
    state: RouterState = request.app.state.router
    if (denied := admin_denied(request, state, path)) is not None:
        return denied
    headers = _admin_worker_headers(request, state, dict(state.worker_headers))
    results = await _broadcast(state, path, headers, await request.body(), timeout)
    workers = [{"url": url, "status": status, "answer": body} for url, status, body in results]
    failed = [status for _, status, _ in results if status != 200]
    if not failed:
        return JSONResponse({"status": "ok", "workers": workers})
    status = next((s for s in failed if 400 <= s < 500), 502)
    message = f"some workers did not {what}: " + ", ".join(
        f"{w['url']} ({w['status'] or 'unreachable'})" for w in workers if w["status"] != 200
    )
    kind = "invalid_request_error" if status < 500 else "bad_gateway"
    error = {"message": message, "type": kind, "param": None, "code": code}
    return Response(orjson.dumps({"error": error, "workers": workers}), status, media_type="application/json")


def _admin_worker_headers(request: Request, state: RouterState, headers: dict) -> dict:
    """An admin broadcast carries the admin's own key when the router has a separate admin key
    (servers started with the same --admin-api-key need it); else the worker key."""
    if state.config.admin_api_key:
        return {**headers, "authorization": request.headers.get("authorization", "")}
    return headers


async def _broadcast(state: RouterState, path: str, headers: dict, body: bytes, timeout: float):
    """POST to every worker at once: [(url, status or 0 if unreachable, parsed JSON body or None)]."""
    headers = {"content-type": "application/json", **headers}

    async def send(worker: Worker):
        try:
            status, data, _ = await fetch(state.client, "POST", worker.url, path, headers, timeout, body)
        except UPSTREAM_ERRORS:
            return worker.url, 0, None
        with contextlib.suppress(orjson.JSONDecodeError):
            return worker.url, status, orjson.loads(data)
        return worker.url, status, None

    return await asyncio.gather(*(send(w) for w in state.registry.all()))


async def metrics_route(request: Request) -> Response:
    metrics.QUEUE_SIZE.set(request.app.state.router.gate.queued)
    return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)
