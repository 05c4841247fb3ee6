"""The router's HTTP app: inference routes, worker admin routes, health and metrics.

Hot routes are plain Starlette endpoints on the FastAPI app (no pydantic, no middleware): the body is
read once, parsed only when PD mode or the policy needs it, and forwarded as bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import time

import orjson
from disagg.router import metrics
from disagg.router.admission import AdmissionGate, Rejected
from disagg.router.config import RouterConfig
from disagg.router.errors import error_response
from disagg.router.health import HealthChecker
from disagg.router.policies import Policy, create_policy
from disagg.router.proxy import Call, Proxy, ProxyStreamingResponse, fetch
from disagg.router.upstream import UPSTREAM_ERRORS, UpstreamPool
from disagg.router.workers import CircuitBreaker, Role, Worker, WorkerRegistry
from fastapi import FastAPI
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

logger = logging.getLogger("disagg.router")

INFERENCE_PATHS = ("/generate", "/v1/completions", "/v1/chat/completions")
INFO_PATHS = ("/v1/models", "/server_info", "/get_server_info", "/model_info", "/get_model_info")


class RouterState:
    """The router's long-lived pieces; started and stopped by the app's lifespan."""

    def __init__(self, config: RouterConfig):
        config.validate()
        self.config = config
        self.registry = WorkerRegistry(self._make_breaker)
        self.policies = self._make_policies()
        metrics.ACTIVE_REQUESTS.workers = self.registry.all
        for policy in self.policies.values():
            self.registry.on_remove(policy.on_worker_removed)
        self.gate = AdmissionGate(
            config.max_concurrent_requests, config.queue_size, config.queue_timeout_secs
        )
        # headers the hot path reads, as raw ASGI names
        self.request_id_names = tuple(h.encode("latin-1") for h in config.request_id_headers)
        self.wanted_headers = frozenset({b"authorization", b"content-length", *self.request_id_names})
        key = config.effective_worker_api_key
        self.worker_headers = {"authorization": f"Bearer {key}"} if key else {}
        self.client: UpstreamPool | None = None
        self.proxy: Proxy | None = None
        self.health: HealthChecker | None = None
        self._tasks: list[asyncio.Task] = []
        for url in config.worker_urls:
            self.registry.add(url, Role.REGULAR)
        for spec in config.prefill:
            self.registry.add(spec.url, Role.PREFILL, spec.bootstrap_port)
        for url in config.decode:
            self.registry.add(url, Role.DECODE)

    @property
    def roles(self) -> tuple[Role, ...]:
        return (Role.PREFILL, Role.DECODE) if self.config.pd_disaggregation else (Role.REGULAR,)

    def _make_breaker(self, url: str) -> CircuitBreaker:
        c = self.config
        return CircuitBreaker(
            url,
            c.cb_failure_threshold,
            c.cb_success_threshold,
            c.cb_timeout_duration_secs,
            enabled=not c.disable_circuit_breaker,
        )

    def _make_policies(self) -> dict[Role, Policy]:
        c = self.config
        if not c.pd_disaggregation:
            return {Role.REGULAR: create_policy(c.policy, c)}
        return {
            Role.PREFILL: create_policy(c.prefill_policy or c.policy, c),
            Role.DECODE: create_policy(c.decode_policy or c.policy, c),
        }

    async def start(self) -> None:
        c = self.config
        # NOTE: one pooled client for every upstream call; no connection cap (the gate limits load)
        # NOTE: one pool of keep-alive connections for every upstream call
        self.client = UpstreamPool(
            connect_timeout=min(10.0, c.request_timeout_secs), read_timeout=c.request_timeout_secs
        )
        self.proxy = Proxy(c, self.registry, self.policies, self.client)
        self.health = HealthChecker(c, self.registry, self.client, self.worker_headers)
        await self.health.check_all()
        self._tasks.append(asyncio.create_task(self.health.run()))
        self._tasks.append(asyncio.create_task(self._evict_loop()))
        # NOTE: start-up objects never die; keep the collector off them, and collect young objects
        # less often: the proxy allocates a few hundred objects per request
        gc.collect()
        gc.freeze()
        gc.set_threshold(50_000, 20, 100)
        if c.service_discovery:
            from disagg.router.discovery import PodDiscovery

            discovery = PodDiscovery(c, self)
            self._tasks.append(asyncio.create_task(discovery.run()))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self.client is not None:
            await self.client.close()

    async def _evict_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.eviction_interval_secs)
            for policy in self.policies.values():
                policy.evict()

    async def add_worker(self, url: str, role: Role, bootstrap_port: int | None = None) -> Worker:
        """Register a worker and probe it at once (it serves traffic after its first passing check)."""
        worker = self.registry.add(url, role, bootstrap_port)
        if self.health is not None:
            await self.health.check(worker)
        return worker

    def worker_request_headers(self, request_id: str, client_auth: str | None) -> dict[str, str]:
        headers = {"content-type": "application/json", "x-request-id": request_id, **self.worker_headers}
        if "authorization" not in headers and client_auth:
            headers["authorization"] = (
                client_auth  # no key configured here: let the worker judge the client's
            )
        return headers


class RouterApp:
    """ASGI entry: the inference routes go straight to their handler, past FastAPI's middleware stack
    (about 10% of the router's CPU per request); everything else goes to the FastAPI app."""

    def __init__(self, api: FastAPI, state: RouterState):
        self.api = api
        self.state = state

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"] in INFERENCE_PATHS and scope["method"] == "POST":
            response = await _inference_with(self.state, scope, receive)
            await response(scope, receive, send)
        else:
            await self.api(scope, receive, send)


def create_app(config: RouterConfig) -> RouterApp:
    state = RouterState(config)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        await state.start()
        try:
            yield
        finally:
            await state.stop()

    app = FastAPI(title="disagg router", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.router = state
    for path in INFERENCE_PATHS:
        app.add_route(path, _inference, methods=["POST"])
    for path in INFO_PATHS:
        app.add_route(path, _info, methods=["GET"])
    app.add_route("/health", _health, methods=["GET"])
    app.add_route("/readiness", _health, methods=["GET"])
    app.add_route("/liveness", _liveness, methods=["GET"])
    app.add_route("/health_generate", _health_generate, methods=["GET"])
    app.add_route("/abort_request", _abort_request, methods=["POST"])
    app.add_route("/metrics", _metrics, methods=["GET"])
    from disagg.router.admin import add_admin_routes

    add_admin_routes(app, state)
    return RouterApp(app, state)


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


# ---- inference -----------------------------------------------------------------------------------


async def _inference(request: Request) -> Response:
    return await _inference_with(request.app.state.router, request.scope, request.receive)


async def _inference_with(state: RouterState, scope, receive) -> Response:
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
        response = await self.state.proxy.forward(self.call, self.on_done)
        if isinstance(response, Response):
            response.headers.setdefault("x-request-id", self.call.request_id)
        if isinstance(response, ProxyStreamingResponse):
            await response.stream_response(send)
        else:
            await response(scope, receive, send)


# ---- info, health, metrics -----------------------------------------------------------------------


async def _info(request: Request) -> Response:
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


async def _health(request: Request) -> Response:
    state: RouterState = request.app.state.router
    missing = [role.value for role in state.roles if not state.registry.available(role)]
    if missing:
        return error_response(503, f"no healthy {' or '.join(missing)} worker", "service_unavailable")
    return JSONResponse({"status": "ok"})


async def _liveness(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def _health_generate(request: Request) -> Response:
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


async def _abort_request(request: Request) -> Response:
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


async def _metrics(request: Request) -> Response:
    metrics.QUEUE_SIZE.set(request.app.state.router.gate.queued)
    return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)
