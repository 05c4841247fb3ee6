"""One client request (`Call`), its upstream requests (`Leg`), and how one leg is sent and closed.

An attempt ends in one of three ways, each its own exception: `AttemptFailed` (worth a retry on
another worker: a connection error, a timeout, a 5xx), `NonRetryable` (a 4xx: the client's mistake,
passed through as is) or `NoWorker` (nothing to send to). `FinalAnswer` carries what the client
gets once every attempt is over.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import orjson
from disagg.router.upstream import UPSTREAM_ERRORS, AbortHandle, UpstreamPool, UpstreamResponse
from disagg.router.workers import Worker
from starlette.responses import Response

# NOTE: a 4xx is the client's mistake: passed through as is, never retried, never counted
RETRYABLE_STATUS = frozenset({500, 502, 503, 504})
ABORT_TIMEOUT_SECS = 2.0  # POST /abort_request to a leg's worker; a hung worker must not hold a retry
RID_PREFIX = {"/generate": "gen", "/v1/completions": "cmpl", "/v1/chat/completions": "chatcmpl"}


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


class NoWorker(Exception):
    pass


class NonRetryable(Exception):
    """A non-retryable worker answer (a 4xx): pass it to the client as is."""

    def __init__(self, worker: Worker, response: Response):
        super().__init__(f"{worker.url}: HTTP {response.status_code}")
        self.worker = worker
        self.response = response


class FinalAnswer(Exception):
    """Every attempt is over: `response` goes to the client."""

    def __init__(self, response: Response):
        super().__init__(response.status_code)
        self.response = response


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
            self.rid = f"{RID_PREFIX.get(self.path, 'req')}-{os.urandom(12).hex()}"
        n, self.attempts = self.attempts, self.attempts + 1
        return self.rid if n == 0 else f"{self.rid}-r{n}"


async def open_leg(client: UpstreamPool, leg: Leg, path: str, body: bytes, headers: dict[str, str]) -> None:
    """Send; wait for the first body chunk (a stream) or the whole body (JSON).

    Raises AttemptFailed when worth a retry elsewhere, NonRetryable for a non-retryable error status."""
    worker = leg.worker
    try:
        response = await client.request("POST", worker.url, path, headers, body, handle=leg.handle)
    except UPSTREAM_ERRORS as exc:
        code = leg.failure or failure_code(exc)
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
        code = leg.failure or failure_code(exc)
        raise AttemptFailed(
            worker, f"{worker.url}: {type(exc).__name__} before the answer", code=code
        ) from None
    if response.status >= 400:
        kept = Response(leg.first_chunk, response.status, media_type=response.headers.get("content-type"))
        if response.status in RETRYABLE_STATUS:
            raise AttemptFailed(worker, f"{worker.url}: HTTP {response.status}", kept)
        raise NonRetryable(worker, kept)


async def close_leg(leg: Leg) -> None:
    try:
        if leg.response is not None:
            leg.response.close()
    finally:
        leg.end()


def failure_code(exc: BaseException) -> str:
    return "worker_timeout" if isinstance(exc, TimeoutError) else "upstream_unavailable"


def loads_object(body: bytes) -> dict | None:
    """The JSON object in `body`, or None when it is not one."""
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
