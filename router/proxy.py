"""Forwarding one request: pick worker(s), send, retry on another pick, hand back the response.

Regular mode sends the body untouched to one worker. PD mode adds bootstrap_host/port/room and a
`rid` to the JSON body, POSTs it to a prefill and a decode worker at once and returns decode's
response; the prefill response is drained and dropped, but its failure before the client got a
byte aborts the decode leg and retries on another pair (as SGLang's router does).

Failures (docs/failures.md): only connection errors, timeouts and 5xx are retried and counted
against a worker, never a 4xx. When an attempt fails, both legs are told to stop
(POST /abort_request with the attempt's rid) before the next attempt starts, so a prompt is never
computed twice at once. A stream that breaks, stalls (--worker-stall-timeout) or ends without
`[DONE]` continues on another worker (`/generate`, up to --max-migrations) or ends with an error
event then `[DONE]`: never a silent truncation.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import random
import time
from dataclasses import dataclass, field

import orjson
from disagg.router import metrics
from disagg.router.config import RouterConfig
from disagg.router.errors import error_response
from disagg.router.openai_streams import OPENAI_PATHS, OpenAIStreamState, can_move, with_token_ids
from disagg.router.policies import Policy, request_text
from disagg.router.streams import (
    DONE,
    StreamState,
    answer_failure,
    continuation,
    error_event,
    failure_response,
    failure_status,
    is_batch,
)
from disagg.router.upstream import UPSTREAM_ERRORS, AbortHandle, UpstreamPool, UpstreamResponse
from disagg.router.workers import Role, Worker, WorkerRegistry, pd_mismatch
from starlette.responses import Response, StreamingResponse

logger = logging.getLogger("disagg.router")

# NOTE: a 4xx is the client's mistake: passed through as is, never retried, never counted
RETRYABLE_STATUS = frozenset({500, 502, 503, 504})
ABORT_TIMEOUT_SECS = 2.0  # POST /abort_request to a leg's worker; a hung worker must not hold a retry
_RID_PREFIX = {"/generate": "gen", "/v1/completions": "cmpl", "/v1/chat/completions": "chatcmpl"}


class AttemptFailed(Exception):
    """One leg failed in a way worth retrying elsewhere; `response` is kept to answer with at the end.

    `code` types the failure for the client when no attempt succeeds: upstream_unavailable (502)
    or worker_timeout (504)."""

    def __init__(
        self,
        worker: Worker,
        message: str,
        response: Response | None = None,
        code: str = "upstream_unavailable",
    ):
        super().__init__(message)
        self.worker = worker
        self.response = response
        self.code = code


@dataclass(eq=False)
class Leg:
    """One upstream request: its worker, its response once the head arrived."""

    worker: Worker
    rid: str | None = None  # the body's rid: what /abort_request names
    response: UpstreamResponse | None = None
    first_chunk: bytes = b""  # a stream's first chunk, or the whole body of a JSON answer
    is_stream: bool = False
    answered: bool = False  # decode leg: the client's answer is on its way
    settled: bool = False  # prefill leg: its outcome was counted
    ended: bool = False
    failure: str | None = None  # set when the router aborted the leg (its worker was marked down)
    handle: AbortHandle = field(default_factory=AbortHandle)
    last_byte: float = 0.0  # monotonic time of the start, then of the last bytes received

    def start(self) -> None:
        self.last_byte = time.monotonic()
        self.worker.begin()
        self.worker.inflight.add(self)

    def got_bytes(self) -> None:
        self.last_byte = self.worker.last_bytes = time.monotonic()

    def end(self) -> None:
        if not self.ended:
            self.ended = True
            self.worker.end()
            self.worker.inflight.discard(self)

    def abort(self, code: str) -> None:
        """Fail this leg now (whoever waits on it gets an UpstreamError); `code` tells the client why."""
        if self.failure is None:
            self.failure = code
        self.handle.abort()


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
    attempts: int = 0  # PD attempts made so far (each gets its own rid)
    migrations: int = 0  # times the stream moved to another worker
    movable: dict | None = None  # an OpenAI stream that can move: the client's own body

    def next_rid(self) -> str:
        """The rid of the next PD attempt: the client's (or a fresh one) first, then `<rid>-r<n>`
        (still matched by an /abort_request for the client's rid: servers abort `rid-*` too)."""
        if self.rid is None:
            self.rid = f"{_RID_PREFIX.get(self.path, 'req')}-{os.urandom(12).hex()}"
        n, self.attempts = self.attempts, self.attempts + 1
        return self.rid if n == 0 else f"{self.rid}-r{n}"


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
        self._context_length: int | None = None  # the model's, read from a worker when a chat moves

    # ---- entry point -------------------------------------------------------------------------

    async def forward(self, call: Call, on_done) -> Response | BytesResponse:
        """Route `call`; `on_done(status)` runs once the response (or its stream) has finished."""
        self._ask_token_ids(call)
        try:
            leg, others = await self._connect(call, set())
        except _Answer as answer:
            on_done(answer.response.status_code)
            return answer.response
        return self._respond(call, leg, others, on_done)

    def _ask_token_ids(self, call: Call) -> None:
        """An OpenAI stream that could move asks its workers for token ids (what a continuation needs)."""
        if self.config.max_migrations <= 0 or call.path not in OPENAI_PATHS:
            return
        parsed = call.parsed if call.parsed is not None else _loads(call.body)
        if can_move(call.path, parsed):
            call.movable, call.parsed = parsed, with_token_ids(parsed)
            call.body = orjson.dumps(call.parsed)

    async def _connect(self, call: Call, tried: set[Worker]) -> tuple[Leg, tuple[Leg, ...]]:
        """Attempts until a worker answered (its head and first bytes): (answering leg, other legs).
        Raises _Answer with the response for the client when every attempt failed."""
        text = request_text(call.parsed) if call.parsed is not None and self.needs_text else None
        last: AttemptFailed | None = None
        for attempt in range(self.config.max_attempts):
            if attempt:
                metrics.labelled(metrics.RETRIES, call.path).inc()
                await asyncio.sleep(self._backoff_secs(attempt))
            try:
                if self.config.pd_disaggregation:
                    return await self._attempt_pd(call, text, tried)
                return await self._attempt_regular(call, text, tried)
            except _Final as exc:
                raise _Answer(exc.response) from None
            except NoWorker as exc:
                if last is None:
                    raise _Answer(error_response(503, str(exc), "service_unavailable")) from None
                break
            except AttemptFailed as exc:
                last = exc
                tried.add(exc.worker)
                self._worker_failed(exc.worker)
                logger.warning("request %s: %s (attempt %d)", call.request_id, exc, attempt + 1)
        if last.response is not None:
            raise _Answer(last.response)
        raise _Answer(failure_response(last.code, f"all attempts failed; last error: {last}"))

    def _worker_failed(self, worker: Worker) -> None:
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
        return self._select(role, self.registry.available(role), text, tried)

    def _pick_pair(self, text: str | None, tried: set[Worker]) -> tuple[Worker, Worker]:
        """A prefill and a decode that can exchange KV pages (same model, weights, layout: the
        identities their /server_info publishes); a request never reaches an incompatible pair."""
        decodes = self.registry.available(Role.DECODE)
        if not decodes:
            raise NoWorker("no available decode worker")
        prefills = [
            p for p in self.registry.available(Role.PREFILL) if any(not pd_mismatch(p, d) for d in decodes)
        ]
        if not prefills and self.registry.available(Role.PREFILL) and decodes:
            raise NoWorker("no decode worker is compatible with any available prefill worker (model, weights or "
                           "KV layout differ: see the router's log and /workers)")  # fmt: skip
        prefill = self._select(Role.PREFILL, prefills, text, tried)
        decode = self._select(Role.DECODE, [d for d in decodes if not pd_mismatch(prefill, d)], text, tried)
        return prefill, decode

    def _select(self, role: Role, workers: list[Worker], text: str | None, tried: set[Worker]) -> Worker:
        if not workers:
            raise NoWorker(f"no available {role.value} worker")
        fresh = [w for w in workers if w not in tried]
        return self.policies[role].select(fresh or workers, text)

    # ---- regular mode ------------------------------------------------------------------------

    async def _attempt_regular(self, call: Call, text: str | None, tried: set[Worker]) -> tuple[Leg, tuple]:
        leg = Leg(self.pick(Role.REGULAR, text, tried), rid=call.rid)
        leg.start()
        try:
            await self._open(leg, call.path, call.body, call.headers)
        except asyncio.CancelledError:
            self._spawn(self._abort_legs((leg,), call.headers))
            raise
        except BaseException:
            leg.end()
            raise
        leg.worker.breaker.record_success()
        return leg, ()

    # ---- PD mode -----------------------------------------------------------------------------

    async def _attempt_pd(self, call: Call, text: str | None, tried: set[Worker]) -> tuple[Leg, tuple]:
        prefill_worker, decode_worker = self._pick_pair(text, tried)
        # NOTE: a batch body keeps the client's rids (one per prompt) or none; abort then relies
        # on the closed connection alone
        rid = None if is_batch(call.parsed) else call.next_rid()
        prefill, decode = Leg(prefill_worker, rid), Leg(decode_worker, rid)
        body = pd_body(call.parsed, prefill.worker, rid)
        prefill.start()
        decode.start()
        # NOTE: the decode leg runs in this task, the prefill leg in its own; a prefill failure
        # before decode answered aborts the decode request through its handle, and the pair is retried
        p_task = asyncio.create_task(self._open(prefill, call.path, body, call.headers))
        p_task.add_done_callback(lambda task: self._prefill_done(task, prefill, decode))
        try:
            # NOTE: one loop turn lets the prefill leg's request out first: its compute starts at
            # once (the decode's pre-allocation overlaps it), so the prefill is the critical path
            await asyncio.sleep(0)
            await self._open(decode, call.path, body, call.headers)
        except BaseException as exc:
            prefill_error = p_task.exception() if p_task.done() and not p_task.cancelled() else None
            p_task.cancel()
            cleanup = self._spawn(self._abort_legs((prefill, decode), call.headers))
            if isinstance(exc, AttemptFailed | _Final):
                # NOTE: one request, one prefill computation: the next attempt starts only once
                # both legs of this one were told to stop (the prefill frees its room at once)
                await asyncio.shield(cleanup)
                if prefill_error is not None:
                    raise prefill_error from None  # the prefill leg's failure, not the abort it caused
            raise
        decode.worker.breaker.record_success()
        decode.answered = True
        if p_task.done():
            self._prefill_settled(p_task, prefill)
        return decode, (prefill,)

    def _prefill_done(self, task: asyncio.Task, prefill: Leg, decode: Leg) -> None:
        if decode.answered:
            self._prefill_settled(task, prefill)
        elif not task.cancelled() and task.exception() is not None:
            decode.handle.abort()

    def _prefill_settled(self, task: asyncio.Task, leg: Leg) -> None:
        """The prefill leg ended after decode answered: count it, drain a stream, free the worker."""
        if leg.settled:
            return
        leg.settled = True
        if task.cancelled():
            leg.end()
            return
        exc = task.exception()
        if (
            exc is not None and leg.ended
        ):  # the router aborted it (e.g. its client left): not the worker's fault
            return
        if exc is not None:
            self._worker_failed(leg.worker)
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

    async def _open(self, leg: Leg, path: str, body: bytes, headers: dict[str, str]) -> None:
        """Send; wait for the first body chunk (a stream) or the whole body (JSON).

        Raises AttemptFailed when worth a retry elsewhere, _Final for a non-retryable error status."""
        worker = leg.worker
        try:
            response = await self.client.request("POST", worker.url, path, headers, body, handle=leg.handle)
        except UPSTREAM_ERRORS as exc:
            code = leg.failure or _failure_code(exc)
            raise AttemptFailed(worker, f"{worker.url}: {type(exc).__name__}: {exc}", code=code) from None
        leg.response = response
        leg.is_stream = response.status < 400 and response.content_type == "text/event-stream"
        try:
            if leg.is_stream:
                leg.first_chunk = await response.readany()
            else:
                leg.first_chunk = await response.read()
            leg.got_bytes()
        except UPSTREAM_ERRORS as exc:
            response.close()
            code = leg.failure or _failure_code(exc)
            raise AttemptFailed(
                worker, f"{worker.url}: {type(exc).__name__} before the answer", code=code
            ) from None
        if response.status >= 400:
            kept = Response(leg.first_chunk, response.status, media_type=response.headers.get("content-type"))
            if response.status in RETRYABLE_STATUS:
                raise AttemptFailed(worker, f"{worker.url}: HTTP {response.status}", kept)
            raise _Final(worker, kept)

    def _respond(self, call: Call, leg: Leg, others: tuple[Leg, ...], on_done) -> Response | BytesResponse:
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

    # ---- streams -----------------------------------------------------------------------------

    async def _stream(self, call: Call, leg: Leg, others: tuple[Leg, ...], on_done):
        """Pass the worker's events through; a break, a stall or a missing `[DONE]` continues the
        stream elsewhere or ends it with an error event. A client disconnect aborts every leg."""
        if call.movable is not None:
            state = OpenAIStreamState(call.path, call.movable)
        else:
            state = StreamState(native=call.path == "/generate")
        legs, status, outcome = (leg, *others), leg.response.status, None
        tried: set[Worker] = set()
        try:
            chunk = leg.first_chunk
            while True:
                if out := state.feed(chunk):
                    yield out
                leg.response.set_read_timeout(self._read_timeout(leg))
                got = await self._next_chunk(leg, state)
                if isinstance(got, bytes):
                    chunk = got
                    continue
                if got is None:
                    outcome = "ok"
                    break
                code, message = got
                logger.warning("request %s: %s", call.request_id, message)
                tried.add(leg.worker)
                self._worker_failed(leg.worker)
                self._spawn(self._abort_legs(legs, call.headers))
                if state.finished:  # the answer was whole; only `[DONE]` went missing
                    yield DONE
                    outcome = "ok"
                    break
                moved = await self._migrate(call, state, tried)
                if isinstance(moved, tuple) and isinstance(moved[0], Leg):
                    leg, others = moved
                    state.tail = b""  # the broken worker's half event is dropped, not glued to the next
                    legs, chunk = (leg, *others), leg.first_chunk
                    continue
                if moved:  # the stream's own failure types the error; the continuation's is told too
                    message = f"{message}; continuing on another worker failed: {moved[1]}"
                metrics.labelled(metrics.STREAM_ERRORS, code).inc()
                yield error_event(message, code)
                outcome, status = "error", failure_status(code)
                break
        finally:
            if outcome == "ok":
                self._spawn(self._close(leg))
            elif outcome is None:  # the client went away: abort everything still running
                self._spawn(self._abort_legs(legs, call.headers))
            on_done(status if outcome else 499)

    async def _next_chunk(self, leg: Leg, state: StreamState) -> bytes | tuple[str, str] | None:
        """The next bytes; None at a clean end; (code, message) when the stream failed."""
        url = leg.worker.url
        try:
            chunk = await leg.response.readany()
        except TimeoutError:
            return self._stalled(leg)
        except UPSTREAM_ERRORS as exc:
            return leg.failure or "upstream_unavailable", f"stream from {url} broke: {exc}"
        if chunk:
            leg.got_bytes()
            return chunk
        if state.done:
            return None
        return "upstream_unavailable", f"stream from {url} ended before its [DONE]"

    def _read_timeout(self, leg: Leg) -> float:
        """How long the next read may wait: until the leg's worker has been silent on all its streams
        for --worker-stall-timeout. A stream that waited out a stall while another stream of the same
        worker still got bytes wakes when the worker's silence reaches the bound, not a full stall
        later (a partition is reported after one stall timeout, not up to two)."""
        last = max(leg.last_byte, leg.worker.last_bytes)
        return max(0.1, last + self.config.worker_stall_timeout - time.monotonic())

    def _stalled(self, leg: Leg) -> bytes | tuple[str, str]:
        """A stream got nothing for --worker-stall-timeout: its worker is hung when none of its streams
        got bytes either (marked down: (code, message)); else this request waits in the worker's
        queue (e.g. for KV pages under load): b"", keep reading, up to --request-timeout-secs."""
        stall, worker, now = self.config.worker_stall_timeout, leg.worker, time.monotonic()
        if now - worker.last_bytes >= stall:
            logger.warning("worker %s is hung: its streams got nothing for %.1f s", worker.url, stall)
            worker.mark_down("stream_stall", "worker_timeout", silent_for=stall)
            return (
                "worker_timeout",
                f"worker {worker.url} sent nothing for {stall:g} s (--worker-stall-timeout)",
            )
        if now - leg.last_byte >= self.config.request_timeout_secs:
            timeout = self.config.request_timeout_secs
            return (
                "worker_timeout",
                f"{worker.url} sent this request nothing for {timeout:g} s (--request-timeout-secs)",
            )
        return b""

    async def _migrate(self, call: Call, state: StreamState | OpenAIStreamState, tried: set[Worker]):
        """Continue a broken stream on another worker: (leg, other legs), or (code, message)
        when it cannot move, or None when migration does not apply."""
        if call.migrations >= self.config.max_migrations:
            return None
        if isinstance(state, OpenAIStreamState):
            resumed = await self._resume_openai(call, state, tried)
        else:
            parsed = call.parsed if call.parsed is not None else _loads(call.body)
            body = continuation(parsed, state) if parsed is not None else None
            resumed = ("/generate", body) if body is not None else None
        if resumed is None:
            logger.info(
                "request %s: cannot continue: %s", call.request_id, getattr(state, "why_not", "") or "-"
            )
            return None
        path, body = resumed
        call.migrations += 1
        base = call.rid or f"{_RID_PREFIX[call.path]}-{os.urandom(12).hex()}"
        rid = f"{base}-m{call.migrations}"
        if not self.config.pd_disaggregation:
            body["rid"] = rid
        moved = dataclasses.replace(
            call, path=path, body=orjson.dumps(body), parsed=body, rid=rid, attempts=0
        )
        logger.info("request %s: continuing after %d tokens as %s", call.request_id, len(state.sent_ids), rid)
        try:
            leg, others = await self._connect(moved, tried)
        except _Answer as answer:
            metrics.labelled(metrics.MIGRATIONS, "failed").inc()
            return answer_failure(answer.response)
        if not leg.is_stream:
            self._spawn(self._abort_legs((leg, *others), call.headers))
            metrics.labelled(metrics.MIGRATIONS, "failed").inc()
            return (
                "upstream_unavailable",
                f"continuation answered HTTP {leg.response.status} without a stream",
            )
        metrics.labelled(metrics.MIGRATIONS, "ok").inc()
        return leg, others

    async def _resume_openai(self, call: Call, state: OpenAIStreamState, tried: set[Worker]):
        """The continuation of an OpenAI stream, and the text its old worker held back."""
        parsed = call.movable
        ctx = None
        if state.chat and not (parsed.get("max_tokens") or parsed.get("max_completion_tokens")):
            ctx = await self._model_context_length(call, tried)
        resumed = state.resume(parsed, ctx)
        stops = [parsed["stop"]] if isinstance(parsed.get("stop"), str) else parsed.get("stop") or []
        if resumed is not None and state.sent_ids and stops:  # text may be held back: ask what it was
            decoded = await self._worker_json(call, tried, "POST", "/detokenize", {"tokens": state.sent_ids})
            if isinstance(decoded, dict) and isinstance(decoded.get("text"), str):
                state.prefix = state.held_text(decoded["text"], [s for s in stops if isinstance(s, str)])
        return resumed

    async def _model_context_length(self, call: Call, tried: set[Worker]) -> int | None:
        if self._context_length is None:
            models = await self._worker_json(call, tried, "GET", "/v1/models")
            try:
                self._context_length = int(models["data"][0]["max_model_len"])
            except (TypeError, KeyError, IndexError, ValueError):
                return None
        return self._context_length

    async def _worker_json(self, call: Call, tried: set[Worker], method: str, path: str, body=None):
        """A small JSON call to one healthy worker that serves the model (None when none answers)."""
        roles = (Role.DECODE, Role.PREFILL) if self.config.pd_disaggregation else (Role.REGULAR,)
        workers = [w for role in roles for w in self.registry.available(role) if w not in tried]
        for worker in workers[:2]:
            try:
                headers = {**call.headers, "content-type": "application/json"}
                status, data, _ = await fetch(self.client, method, worker.url, path, headers,
                                              ABORT_TIMEOUT_SECS, orjson.dumps(body) if body else b"")  # fmt: skip
                if status == 200:
                    return orjson.loads(data)
            except (*UPSTREAM_ERRORS, orjson.JSONDecodeError):
                continue
        return None

    # ---- cleanup -----------------------------------------------------------------------------

    async def _close(self, leg: Leg) -> None:
        try:
            if leg.response is not None:
                leg.response.close()
        finally:
            leg.end()

    async def _abort_legs(self, legs, headers: dict[str, str]) -> None:
        """Drop the upstream connections now and POST /abort_request {rid} to each leg's worker, so it
        frees the request's pages and bootstrap room at once instead of at a timeout."""
        posts = []
        for leg in legs:
            if leg.ended:
                continue
            leg.handle.abort()
            await self._close(leg)
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

    def _spawn(self, coro) -> asyncio.Task:
        # NOTE: cleanup runs in its own task: the caller may be inside a cancelled scope
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background_done)
        return task

    def _background_done(self, task: asyncio.Task) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error("router cleanup task failed", exc_info=task.exception())


def _failure_code(exc: BaseException) -> str:
    return "worker_timeout" if isinstance(exc, TimeoutError) else "upstream_unavailable"


def _loads(body: bytes) -> dict | None:
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    return parsed if isinstance(parsed, dict) else None


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


class _Answer(Exception):
    """Every attempt is over: `response` goes to the client."""

    def __init__(self, response: Response):
        super().__init__(response.status_code)
        self.response = response


def pd_body(parsed: dict, prefill: Worker, rid: str | None = None) -> bytes:
    """The client's JSON body plus the bootstrap fields and the rid both legs share."""
    body = dict(parsed)
    body["bootstrap_host"] = prefill.host
    body["bootstrap_port"] = prefill.bootstrap_port
    body["bootstrap_room"] = random.getrandbits(63)
    if rid is not None:
        body["rid"] = rid
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
