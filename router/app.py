"""The router's process state (`RouterState`) and its ASGI app (`create_app`).

The inference routes (router/inference.py) are dispatched straight from `RouterApp`, past FastAPI's
middleware stack; the small routes (router/routes.py, router/admin.py) go through FastAPI.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging

from disagg.router import metrics, routes
from disagg.router.admission import AdmissionGate
from disagg.router.config import RouterConfig
from disagg.router.errors import call_guarded, error_response
from disagg.router.health import HealthChecker
from disagg.router.inference import INFERENCE_PATHS, handle_inference, inference_route
from disagg.router.policies import Policy, create_policy
from disagg.router.proxy import Proxy
from disagg.router.routes import INFO_PATHS
from disagg.router.upstream import UpstreamPool
from disagg.router.workers import CircuitBreaker, Role, Worker, WorkerRegistry
from fastapi import FastAPI
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import Response

logger = logging.getLogger("disagg.router")


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
            response = await handle_inference(self.state, scope, receive)
            await response(scope, receive, send)
        elif scope["type"] == "http":
            await call_guarded(self.api, scope, receive, send)
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
    app.add_exception_handler(StarletteHTTPException, _http_error)
    for path in INFERENCE_PATHS:
        app.add_route(path, inference_route, methods=["POST"])
    for path in INFO_PATHS:
        app.add_route(path, routes.info, methods=["GET"])
    app.add_route("/health", routes.health, methods=["GET"])
    app.add_route("/readiness", routes.health, methods=["GET"])
    app.add_route("/liveness", routes.liveness, methods=["GET"])
    app.add_route("/health_generate", routes.health_generate, methods=["GET"])
    app.add_route("/abort_request", routes.abort_request, methods=["POST"])
    app.add_route("/flush_cache", routes.flush_cache, methods=["POST"])
    app.add_route("/eplb_rebalance", routes.eplb_rebalance, methods=["POST"])
    app.add_route("/metrics", routes.metrics_route, methods=["GET"])
    from disagg.router.admin import add_admin_routes

    add_admin_routes(app, state)
    return RouterApp(app, state)


async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
    """The router's own 404 / 405 as OpenAI-style error objects."""
    kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    message = f"{request.method} {request.url.path}: {exc.detail}"
    return error_response(exc.status_code, message, kind, headers=exc.headers)
