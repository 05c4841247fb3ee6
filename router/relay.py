"""Passing a worker's stream to the client, and what happens when it breaks.

A stream that breaks, stalls (--worker-stall-timeout) or ends without `[DONE]` continues on
another worker (router/migration.py, up to --max-migrations) or ends with an error event then
`[DONE]`: never a silent truncation. A client that goes away aborts every leg.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from disagg.router import metrics
from disagg.router.config import RouterConfig
from disagg.router.legs import Call, Leg, close_leg
from disagg.router.migration import migrate
from disagg.router.openai_streams import OpenAIStreamState
from disagg.router.streams import DONE, StreamState, error_event, failure_status
from disagg.router.upstream import UPSTREAM_ERRORS
from disagg.router.workers import Worker

if TYPE_CHECKING:
    from disagg.router.proxy import Proxy

logger = logging.getLogger("disagg.router")


async def relay_stream(proxy: Proxy, call: Call, leg: Leg, others: tuple[Leg, ...], on_done):
    """Pass the worker's events through; a break, a stall or a missing `[DONE]` continues the
    stream elsewhere or ends it with an error event. A client disconnect aborts every leg."""
    state = stream_state(call)
    legs, status, outcome = (leg, *others), leg.response.status, None
    tried: set[Worker] = set()
    try:
        chunk = leg.first_chunk
        while True:
            if out := state.feed(chunk):
                yield out
            leg.response.set_read_timeout(read_timeout(proxy.config, leg))
            got = await next_chunk(proxy.config, leg, state)
            if isinstance(got, bytes):
                chunk = got
                continue
            if got is None:
                outcome = "ok"
                break
            moved = await after_break(proxy, call, state, legs, tried, got)
            if isinstance(moved, bytes):  # the stream's last event
                yield moved
                outcome, status = ("ok", status) if moved == DONE else ("error", failure_status(got[0]))
                break
            leg, others = moved
            legs, chunk = (leg, *others), leg.first_chunk
    finally:
        if outcome == "ok":
            proxy.spawn(close_leg(leg))
        elif outcome is None:  # the client went away: abort everything still running
            proxy.spawn(proxy.abort_legs(legs, call.headers))
        on_done(status if outcome else 499)


def stream_state(call: Call) -> StreamState:
    """What the relay tracks of the stream, to tell a whole answer and to continue it elsewhere."""
    if call.movable is not None:
        return OpenAIStreamState(call.path, call.movable)
    return StreamState(native=call.path == "/generate")


async def after_break(proxy: Proxy, call: Call, state: StreamState, legs: tuple[Leg, ...], tried: set[Worker],
                      failure: tuple[str, str]) -> tuple[Leg, tuple[Leg, ...]] | bytes:  # fmt: skip
    """legs[0]'s worker broke the stream with `failure` (code, message): counted against it, every
    leg aborted. Then the legs the stream continues on, or its last event: `[DONE]` when the answer
    was whole (only `[DONE]` went missing), else an error event."""
    code, message = failure
    logger.warning("request %s: %s", call.request_id, message)
    tried.add(legs[0].worker)
    proxy.worker_failed(legs[0].worker)
    proxy.spawn(proxy.abort_legs(legs, call.headers))
    if state.finished:
        return DONE
    moved = await migrate(proxy, call, state, tried)
    if isinstance(moved, tuple) and isinstance(moved[0], Leg):
        state.tail = b""  # the broken worker's half event is dropped, not glued to the next
        return moved
    if moved:  # the stream's own failure types the error; the continuation's is told too
        message = f"{message}; continuing on another worker failed: {moved[1]}"
    metrics.labelled(metrics.STREAM_ERRORS, code).inc()
    return error_event(message, code)


async def next_chunk(config: RouterConfig, leg: Leg, state: StreamState) -> bytes | tuple[str, str] | None:
    """The next bytes; None at a clean end; (code, message) when the stream failed."""
    url = leg.worker.url
    try:
        chunk = await leg.response.readany()
    except TimeoutError:
        return stalled(config, leg)
    except UPSTREAM_ERRORS as exc:
        return leg.failure or "upstream_unavailable", f"stream from {url} broke: {exc}"
    if chunk:
        leg.got_bytes()
        return chunk
    if state.done:
        return None
    return "upstream_unavailable", f"stream from {url} ended before its [DONE]"


def read_timeout(config: RouterConfig, leg: Leg) -> float:
    """How long the next read may wait: until the leg's worker has been silent on all its streams
    for --worker-stall-timeout. A stream that waited out a stall while another stream of the same
    worker still got bytes wakes when the worker's silence reaches the bound, not a full stall
    later (a partition is reported after one stall timeout, not up to two)."""
    last = max(leg.last_byte, leg.worker.last_bytes)
    return max(0.1, last + config.worker_stall_timeout - time.monotonic())


def stalled(config: RouterConfig, leg: Leg) -> bytes | tuple[str, str]:
    """A stream got nothing for --worker-stall-timeout: its worker is hung when none of its streams
    got bytes either (marked down: (code, message)); else this request waits in the worker's
    queue (e.g. for KV pages under load): b"", keep reading, up to --request-timeout-secs."""
    stall, worker, now = config.worker_stall_timeout, leg.worker, time.monotonic()
    if now - worker.last_bytes >= stall:
        logger.warning("worker %s is hung: its streams got nothing for %.1f s", worker.url, stall)
        worker.mark_down("stream_stall", "worker_timeout", silent_for=stall)
        return (
            "worker_timeout",
            f"worker {worker.url} sent nothing for {stall:g} s (--worker-stall-timeout)",
        )
    if now - leg.last_byte >= config.request_timeout_secs:
        timeout = config.request_timeout_secs
        return (
            "worker_timeout",
            f"{worker.url} sent this request nothing for {timeout:g} s (--request-timeout-secs)",
        )
    return b""
