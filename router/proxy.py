"""Forwarding one request: pick worker(s), send, retry on another pick, hand back the response.

Regular mode sends the body untouched to one worker. PD mode adds bootstrap_host/port/room to the
JSON body, POSTs it to a prefill and a decode worker at once and returns decode's response; the
prefill response is drained and dropped, but its failure before the client got a byte aborts the
decode leg and retries on another pair (as SGLang's router does).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass

import orjson
from disagg.router import metrics
from disagg.router.config import RouterConfig
from disagg.router.errors import error_response
from disagg.router.policies import Policy, request_text
from disagg.router.upstream import UPSTREAM_ERRORS, AbortHandle, UpstreamPool, UpstreamResponse
from disagg.router.workers import Role, Worker, WorkerRegistry
from starlette.responses import Response, StreamingResponse

logger = logging.getLogger("disagg.router")

RETRYABLE_STATUS = frozenset({408, 429, 500, 502, 503, 504})


class AttemptFailed(Exception):
    """One leg failed in a way worth retrying elsewhere; `response` is kept to answer with at the end."""

    def __init__(self, worker: Worker, message: str, response: Response | None = None):
        super().__init__(message)
        self.worker = worker
        self.response = response


@dataclass
class Leg:
    """One upstream request: its worker, its response once the head arrived."""

    worker: Worker
    response: UpstreamResponse | None = None
    first_chunk: bytes = b""  # a stream's first chunk, or the whole body of a JSON answer
    is_stream: bool = False
    answered: bool = False  # decode leg: the client's answer is on its way
    settled: bool = False  # prefill leg: its outcome was counted
    ended: bool = False

    def end(self) -> None:
        if not self.ended:
            self.ended = True
            self.worker.end()


@dataclass
class Call:
    """What the handler knows about one client request."""

    path: str
    body: bytes
    headers: dict[str, str]  # forwarded to workers
    request_id: str
    started: float
    parsed: dict | None = None  # the JSON body, parsed once when PD mode or the policy needs it
    rid: str | None = None  # the client's `rid`, used for /abort_request


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

    # ---- entry point -------------------------------------------------------------------------

    async def forward(self, call: Call, on_done) -> Response | BytesResponse:
        """Route `call`; `on_done(status)` runs once the response (or its stream) has finished."""
        text = request_text(call.parsed) if call.parsed is not None and self.needs_text else None
        tried: set[Worker] = set()
        last: AttemptFailed | None = None
        for attempt in range(self.config.max_attempts):
            if attempt:
                metrics.labelled(metrics.RETRIES, call.path).inc()
                await asyncio.sleep(self._backoff_secs(attempt))
            try:
                if self.config.pd_disaggregation:
                    return await self._attempt_pd(call, text, tried, on_done)
                return await self._attempt_regular(call, text, tried, on_done)
            except _Final as exc:
                on_done(exc.response.status_code)
                return exc.response
            except NoWorker as exc:
                if last is None:
                    on_done(503)
                    return error_response(503, str(exc), "service_unavailable")
                break
            except AttemptFailed as exc:
                last = exc
                tried.add(exc.worker)
                metrics.labelled(metrics.WORKER_ERRORS, exc.worker.url).inc()
                exc.worker.breaker.record_failure()
                logger.warning("request %s: %s (attempt %d)", call.request_id, exc, attempt + 1)
        if last.response is not None:
            on_done(last.response.status_code)
            return last.response
        on_done(502)
        return error_response(502, f"all attempts failed; last error: {last}", "bad_gateway")

    def _backoff_secs(self, attempt: int) -> float:
        c = self.config
        delay = min(
            c.retry_initial_backoff_ms * c.retry_backoff_multiplier ** (attempt - 1), c.retry_max_backoff_ms
        )
        return delay * (1.0 + random.uniform(-c.retry_jitter_factor, c.retry_jitter_factor)) / 1000.0

    def pick(self, role: Role, text: str | None, tried: set[Worker]) -> Worker:
        workers = self.registry.available(role)
        if not workers:
            raise NoWorker(f"no available {role.value} worker")
        fresh = [w for w in workers if w not in tried]
        return self.policies[role].select(fresh or workers, text)

    # ---- regular mode ------------------------------------------------------------------------

    async def _attempt_regular(self, call: Call, text: str | None, tried: set[Worker], on_done) -> Response:
        leg = Leg(self.pick(Role.REGULAR, text, tried))
        leg.worker.begin()
        try:
            await self._open(leg, call.path, call.body, call.headers)
        except asyncio.CancelledError:
            self._spawn(self._abort_legs(call, (leg,)))
            raise
        except BaseException:
            leg.end()
            raise
        leg.worker.breaker.record_success()
        return self._respond(call, leg, on_done, others=())

    # ---- PD mode -----------------------------------------------------------------------------

    async def _attempt_pd(self, call: Call, text: str | None, tried: set[Worker], on_done) -> Response:
        prefill = Leg(self.pick(Role.PREFILL, text, tried))
        decode = Leg(self.pick(Role.DECODE, text, tried))
        body = pd_body(call.parsed, prefill.worker)
        prefill.worker.begin()
        decode.worker.begin()
        # NOTE: the decode leg runs in this task, the prefill leg in its own; a prefill failure
        # before decode answered aborts the decode request through its handle, and the pair is retried
        decode_handle = AbortHandle()
        p_task = asyncio.create_task(self._open(prefill, call.path, body, call.headers))
        p_task.add_done_callback(lambda task: self._prefill_done(task, prefill, decode, decode_handle))
        try:
            # NOTE: one loop turn lets the prefill leg's request out first: its compute starts at
            # once (the decode's pre-allocation overlaps it), so the prefill is the critical path
            await asyncio.sleep(0)
            await self._open(decode, call.path, body, call.headers, decode_handle)
        except BaseException as exc:
            p_task.cancel()
            self._spawn(self._abort_legs(call, (prefill, decode)))
            if isinstance(exc, AttemptFailed | _Final) and decode_handle.aborted:
                raise p_task.exception() from None  # the prefill leg's failure, not the abort it caused
            raise
        decode.worker.breaker.record_success()
        decode.answered = True
        if p_task.done():
            self._prefill_settled(p_task, prefill)
        return self._respond(call, decode, on_done, others=(prefill,))

    def _prefill_done(
        self, task: asyncio.Task, prefill: Leg, decode: Leg, decode_handle: AbortHandle
    ) -> None:
        if decode.answered:
            self._prefill_settled(task, prefill)
        elif not task.cancelled() and task.exception() is not None:
            decode_handle.abort()

    def _prefill_settled(self, task: asyncio.Task, leg: Leg) -> None:
        """The prefill leg ended after decode answered: count it, drain a stream, free the worker."""
        if leg.settled:
            return
        leg.settled = True
        if task.cancelled():
            leg.end()
            return
        exc = task.exception()
        if exc is not None:
            metrics.labelled(metrics.WORKER_ERRORS, leg.worker.url).inc()
            leg.worker.breaker.record_failure()
            logger.warning("prefill leg failed after decode answered: %s", exc)
            leg.end()
        elif leg.is_stream:
            leg.worker.breaker.record_success()
            self._spawn(self._drain(leg))
        else:
            leg.worker.breaker.record_success()
            leg.end()

    async def _drain(self, leg: Leg) -> None:
        """Read the rest of a prefill answer and drop it (keeps the connection reusable)."""
        try:
            if leg.is_stream:
                await leg.response.read()
        except UPSTREAM_ERRORS:
            pass
        finally:
            await self._close(leg)

    # ---- one upstream request ----------------------------------------------------------------

    async def _open(
        self, leg: Leg, path: str, body: bytes, headers: dict[str, str], handle: AbortHandle | None = None
    ) -> None:
        """Send; wait for the first body chunk (a stream) or the whole body (JSON).

        Raises AttemptFailed when worth a retry elsewhere, _Final for a non-retryable error status."""
        worker = leg.worker
        try:
            response = await self.client.request("POST", worker.url, path, headers, body, handle=handle)
        except UPSTREAM_ERRORS as exc:
            raise AttemptFailed(worker, f"{worker.url}: {type(exc).__name__}: {exc}") from None
        leg.response = response
        leg.is_stream = response.status < 400 and response.content_type == "text/event-stream"
        try:
            if leg.is_stream:
                leg.first_chunk = await response.readany()
            else:
                leg.first_chunk = await response.read()
        except UPSTREAM_ERRORS as exc:
            response.close()
            raise AttemptFailed(worker, f"{worker.url}: {type(exc).__name__} before the answer") from None
        if response.status >= 400:
            kept = Response(leg.first_chunk, response.status, media_type=response.headers.get("content-type"))
            if response.status in RETRYABLE_STATUS:
                raise AttemptFailed(worker, f"{worker.url}: HTTP {response.status}", kept)
            raise _Final(worker, kept)

    def _respond(self, call: Call, leg: Leg, on_done, others: tuple[Leg, ...]) -> Response | BytesResponse:
        response = leg.response
        metrics.labelled(metrics.TTFT, call.path).observe(time.perf_counter() - call.started)
        headers = {"x-request-id": call.request_id}
        media_type = response.headers.get("content-type")
        if not leg.is_stream:
            leg.end()
            on_done(response.status)
            return BytesResponse(leg.first_chunk, response.status, media_type, call.request_id)
        return ProxyStreamingResponse(
            self._stream(call, leg, others, on_done),
            status_code=response.status,
            headers=headers,
            media_type=media_type,
        )

    async def _stream(self, call: Call, leg: Leg, others: tuple[Leg, ...], on_done):
        """Pass the worker's bytes through untouched; a client disconnect aborts every leg."""
        status, finished = leg.response.status, False
        read = leg.response.readany
        try:
            chunk = leg.first_chunk
            while chunk:
                yield chunk
                chunk = await read()
            finished = True
        except UPSTREAM_ERRORS as exc:
            logger.warning("request %s: stream from %s broke: %s", call.request_id, leg.worker.url, exc)
            metrics.labelled(metrics.WORKER_ERRORS, leg.worker.url).inc()
            status = 502
        finally:
            if finished:
                self._spawn(self._close(leg))
            else:  # client went away or the worker broke: abort everything still running
                self._spawn(self._abort_legs(call, (leg, *others)))
            on_done(status if finished or status == 502 else 499)

    # ---- cleanup -----------------------------------------------------------------------------

    async def _close(self, leg: Leg) -> None:
        try:
            if leg.response is not None:
                leg.response.close()
        finally:
            leg.end()

    async def _abort_legs(self, call: Call, legs) -> None:
        """Drop the upstream connections and, when the client gave a `rid`, POST /abort_request."""
        for leg in legs:
            if leg.ended:
                continue
            await self._close(leg)
            if call.rid is not None:
                body = orjson.dumps({"rid": call.rid})
                try:
                    await fetch(
                        self.client, "POST", leg.worker.url, "/abort_request", call.headers, 5.0, body
                    )
                except UPSTREAM_ERRORS as exc:
                    logger.info("abort_request to %s failed: %s", leg.worker.url, exc)

    def _spawn(self, coro) -> None:
        # NOTE: cleanup runs in its own task: the caller may be inside a cancelled scope
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background_done)

    def _background_done(self, task: asyncio.Task) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error("router cleanup task failed", exc_info=task.exception())


async def fetch(
    pool: UpstreamPool,
    method: str,
    url: str,
    path: str,
    headers: dict[str, str],
    timeout: float,
    body: bytes = b"",
) -> tuple[int, bytes, str | None]:
    """One small upstream call (health, info, abort): (status, body, content-type). Raises UPSTREAM_ERRORS."""
    response = await pool.request(method, url, path, headers, body, timeout=timeout)
    try:
        return response.status, await response.read(), response.headers.get("content-type")
    finally:
        response.close()


class NoWorker(Exception):
    pass


class _Final(Exception):
    """A non-retryable worker answer (a 4xx): pass it to the client as is."""

    def __init__(self, worker: Worker, response: Response):
        super().__init__(f"{worker.url}: HTTP {response.status_code}")
        self.worker = worker
        self.response = response


def pd_body(parsed: dict, prefill: Worker) -> bytes:
    """The client's JSON body plus the bootstrap fields both legs share."""
    body = dict(parsed)
    body["bootstrap_host"] = prefill.host
    body["bootstrap_port"] = prefill.bootstrap_port
    body["bootstrap_room"] = random.getrandbits(63)
    return orjson.dumps(body)


class BytesResponse:
    """A whole worker answer, sent as is: two ASGI messages, none of Response's header building."""

    __slots__ = ("body", "status_code", "raw_headers")

    def __init__(self, body: bytes, status: int, media_type: str | None, request_id: str):
        self.body = body
        self.status_code = status
        self.raw_headers = [
            (b"content-length", str(len(body)).encode()),
            (b"x-request-id", request_id.encode("latin-1")),
        ]
        if media_type:
            self.raw_headers.append((b"content-type", media_type.encode("latin-1")))

    async def __call__(self, scope, receive, send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        await send({"type": "http.response.body", "body": self.body})


class ProxyStreamingResponse(StreamingResponse):
    async def stream_response(self, send) -> None:
        try:
            await super().stream_response(send)
        finally:
            await self.body_iterator.aclose()
