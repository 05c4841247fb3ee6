"""Forwarding one request: pick worker(s), send, retry on another pick, hand back the response.

Regular mode sends the body untouched to one worker (`Proxy._attempt_regular`). PD mode sends one
body to a prefill and a decode worker at once (router/pd.py). The response for the client is
assembled in router/responses.py; a stream is relayed by router/relay.py and, when it breaks,
continued elsewhere by router/migration.py. Requests and legs: router/legs.py.

Failures (docs/failures.md): only connection errors, timeouts and 5xx are retried and counted
against a worker, never a 4xx. When an attempt fails, both legs are told to stop
(POST /abort_request with the attempt's rid) before the next attempt starts, so a prompt is never
computed twice at once. A stream that breaks, stalls (--worker-stall-timeout) or ends without
`[DONE]` continues on another worker (`/generate`, up to --max-migrations) or ends with an error
event then `[DONE]`: never a silent truncation.
"""

from __future__ import annotations

import asyncio
import logging
import random

import orjson
from disagg.router import metrics
from disagg.router.config import RouterConfig
from disagg.router.errors import error_response
from disagg.router.legs import (
    ABORT_TIMEOUT_SECS,
    AttemptFailed,
    Call,
    FinalAnswer,
    Leg,
    NonRetryable,
    NoWorker,
    close_leg,
    fetch,
    loads_object,
    open_leg,
)
from disagg.router.openai_streams import OPENAI_PATHS, can_move, with_token_ids
from disagg.router.pd import attempt_pd
from disagg.router.policies import Policy, request_text
from disagg.router.responses import BytesResponse, respond
from disagg.router.streams import failure_response
from disagg.router.upstream import UPSTREAM_ERRORS, UpstreamPool
from disagg.router.workers import Role, Worker, WorkerRegistry
from starlette.responses import Response

logger = logging.getLogger("disagg.router")


class Proxy:
    def __init__(
        self,
        config: RouterConfig,
        registry: WorkerRegistry,
        policies: dict[Role, Policy],
        client: UpstreamPool,
    ):
        self.config = config
        self.registry = registry
        self.policies = policies
        self.client = client
        self._background: set[asyncio.Task] = set()
        self.needs_text = any(p.needs_text for p in policies.values())
        self.needs_json = config.pd_disaggregation or self.needs_text
        self.context_length: int | None = None  # the model's, read from a worker when a chat moves

    # ---- entry point -------------------------------------------------------------------------

    async def forward(self, call: Call, on_done) -> Response | BytesResponse:
        """Route `call`; `on_done(status)` runs once the response (or its stream) has finished."""
        self._ask_token_ids(call)
        try:
            leg, others = await self.connect(call, set())
        except FinalAnswer as answer:
            on_done(answer.response.status_code)
            return answer.response
        return respond(self, call, leg, others, on_done)

    def _ask_token_ids(self, call: Call) -> None:
        """An OpenAI stream that could move asks its workers for token ids (what a continuation needs)."""
        if self.config.max_migrations <= 0 or call.path not in OPENAI_PATHS:
            return
        parsed = call.parsed if call.parsed is not None else loads_object(call.body)
        if can_move(call.path, parsed):
            call.movable, call.parsed = parsed, with_token_ids(parsed)
            call.body = orjson.dumps(call.parsed)

    async def connect(self, call: Call, tried: set[Worker]) -> tuple[Leg, tuple[Leg, ...]]:
        """Attempts until a worker answered (its head and first bytes): (answering leg, other legs).
        Raises FinalAnswer with the response for the client when every attempt failed."""
        text = request_text(call.parsed) if call.parsed is not None and self.needs_text else None
        last: AttemptFailed | None = None
        for attempt in range(self.config.max_attempts):
            if attempt:
                metrics.labelled(metrics.RETRIES, call.path).inc()
                await asyncio.sleep(self._backoff_secs(attempt))
            try:
                if self.config.pd_disaggregation:
                    return await attempt_pd(self, call, text, tried)
                return await self._attempt_regular(call, text, tried)
            except NonRetryable as exc:
                raise FinalAnswer(exc.response) from None
            except NoWorker as exc:
                if last is None:
                    raise FinalAnswer(error_response(503, str(exc), "service_unavailable")) from None
                break
            except AttemptFailed as exc:
                last = exc
                tried.add(exc.worker)
                self.worker_failed(exc.worker)
                logger.warning("request %s: %s (attempt %d)", call.request_id, exc, attempt + 1)
        if last.response is not None:
            raise FinalAnswer(last.response)
        raise FinalAnswer(failure_response(last.code, f"all attempts failed; last error: {last}"))

    def worker_failed(self, worker: Worker) -> None:
        metrics.labelled(metrics.WORKER_ERRORS, worker.url).inc()
        worker.breaker.record_failure()
        self.registry.suspect(worker)  # probe it now: a dead worker is marked down within a tick

    def _backoff_secs(self, attempt: int) -> float:
        c = self.config
        delay = min(
            c.retry_initial_backoff_ms * c.retry_backoff_multiplier ** (attempt - 1), c.retry_max_backoff_ms
        )
        return delay * (1.0 + random.uniform(-c.retry_jitter_factor, c.retry_jitter_factor)) / 1000.0

    def pick(self, role: Role, text: str | None, tried: set[Worker]) -> Worker:
        return self.select(role, self.registry.available(role), text, tried)

    def select(self, role: Role, workers: list[Worker], text: str | None, tried: set[Worker]) -> Worker:
        """The policy's pick among `workers`, preferring those this request has not tried yet."""
        if not workers:
            raise NoWorker(f"no available {role.value} worker")
        fresh = [w for w in workers if w not in tried]
        return self.policies[role].select(fresh or workers, text)

    # ---- regular mode ------------------------------------------------------------------------

    async def _attempt_regular(self, call: Call, text: str | None, tried: set[Worker]) -> tuple[Leg, tuple]:
        leg = Leg(self.pick(Role.REGULAR, text, tried), rid=call.rid)
        leg.start()
        try:
            await open_leg(self.client, leg, call.path, call.body, call.headers)
        except asyncio.CancelledError:
            self.spawn(self.abort_legs((leg,), call.headers))
            raise
        except BaseException:
            leg.end()
            raise
        leg.worker.breaker.record_success()
        return leg, ()

    # ---- cleanup -----------------------------------------------------------------------------

    async def abort_legs(self, legs, headers: dict[str, str]) -> None:
        """Drop the upstream connections now and POST /abort_request {rid} to each leg's worker, so it
        frees the request's pages and bootstrap room at once instead of at a timeout."""
        posts = []
        for leg in legs:
            if leg.ended:
                continue
            leg.handle.abort()
            await close_leg(leg)
            if leg.rid is not None:
                posts.append(self._post_abort(leg, headers))
        await asyncio.gather(*posts)

    async def _post_abort(self, leg: Leg, headers: dict[str, str]) -> None:
        metrics.labelled(metrics.LEG_ABORTS, leg.worker.role.value).inc()
        body = orjson.dumps({"rid": leg.rid})
        try:
            await fetch(
                self.client, "POST", leg.worker.url, "/abort_request", headers, ABORT_TIMEOUT_SECS, body
            )
        except UPSTREAM_ERRORS as exc:
            logger.info("abort_request to %s failed: %s", leg.worker.url, exc)

    def spawn(self, coro) -> asyncio.Task:
        """Run `coro` in its own task, kept until it ends; its failure is logged."""
        # NOTE: cleanup runs in its own task: the caller may be inside a cancelled scope
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background_done)
        return task

    def _background_done(self, task: asyncio.Task) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error("router cleanup task failed", exc_info=task.exception())
