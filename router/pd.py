"""The PD two-leg request: one prefill and one decode worker, one body for both.

The router adds bootstrap_host/port/room and a `rid` to the client's JSON body, POSTs it to a
prefill and a decode worker at once and returns decode's response; the prefill response is
drained and dropped, but its failure before the client got a byte aborts the decode leg and the
pair is retried (as SGLang's router does).
"""

from __future__ import annotations

import asyncio
import logging
import random
from typing import TYPE_CHECKING

import orjson
from disagg.router.legs import AttemptFailed, Call, Leg, NonRetryable, NoWorker, close_leg, open_leg
from disagg.router.streams import is_batch
from disagg.router.upstream import UPSTREAM_ERRORS
from disagg.router.workers import Role, Worker, pd_mismatch

if TYPE_CHECKING:
    from disagg.router.proxy import Proxy

logger = logging.getLogger("disagg.router")


def pick_pair(proxy: Proxy, text: str | None, tried: set[Worker]) -> tuple[Worker, Worker]:
    """A prefill and a decode that can exchange KV pages (same model, weights, layout: the
    identities their /server_info publishes); a request never reaches an incompatible pair."""
    registry = proxy.registry
    decodes = registry.available(Role.DECODE)
    if not decodes:
        raise NoWorker("no available decode worker")
    prefills = [p for p in registry.available(Role.PREFILL) if any(not pd_mismatch(p, d) for d in decodes)]
    if not prefills and registry.available(Role.PREFILL) and decodes:
        raise NoWorker("no decode worker is compatible with any available prefill worker (model, weights or "
                       "KV layout differ: see the router's log and /workers)")  # fmt: skip
    prefill = proxy.select(Role.PREFILL, prefills, text, tried)
    decode = proxy.select(Role.DECODE, [d for d in decodes if not pd_mismatch(prefill, d)], text, tried)
    return prefill, decode


async def attempt_pd(proxy: Proxy, call: Call, text: str | None, tried: set[Worker]) -> tuple[Leg, tuple]:
    """One attempt on a pair: (the decode leg, which answers the client, (the prefill leg,))."""
    prefill_worker, decode_worker = pick_pair(proxy, text, tried)
    # NOTE: a batch body keeps the client's rids (one per prompt) or none; abort then relies
    # on the closed connection alone
    rid = None if is_batch(call.parsed) else call.next_rid()
    prefill, decode = Leg(prefill_worker, rid), Leg(decode_worker, rid)
    body = pd_body(call.parsed, prefill.worker, rid)
    prefill.start()
    decode.start()
    # NOTE: the decode leg runs in this task, the prefill leg in its own; a prefill failure
    # before decode answered aborts the decode request through its handle, and the pair is retried
    p_task = asyncio.create_task(open_leg(proxy.client, prefill, call.path, body, call.headers))
    p_task.add_done_callback(lambda task: _prefill_done(proxy, task, prefill, decode))
    try:
        # NOTE: one loop turn lets the prefill leg's request out first: its compute starts at
        # once (the decode's pre-allocation overlaps it), so the prefill is the critical path
        await asyncio.sleep(0)
        await open_leg(proxy.client, decode, call.path, body, call.headers)
    except BaseException as exc:
        prefill_error = p_task.exception() if p_task.done() and not p_task.cancelled() else None
        p_task.cancel()
        cleanup = proxy.spawn(proxy.abort_legs((prefill, decode), call.headers))
        if isinstance(exc, AttemptFailed | NonRetryable):
            # NOTE: one request, one prefill computation: the next attempt starts only once
            # both legs of this one were told to stop (the prefill frees its room at once)
            await asyncio.shield(cleanup)
            if prefill_error is not None:
                raise prefill_error from None  # the prefill leg's failure, not the abort it caused
        raise
    decode.worker.breaker.record_success()
    decode.answered = True
    if p_task.done():
        _prefill_settled(proxy, p_task, prefill)
    return decode, (prefill,)


def _prefill_done(proxy: Proxy, task: asyncio.Task, prefill: Leg, decode: Leg) -> None:
    if decode.answered:
        _prefill_settled(proxy, task, prefill)
    elif not task.cancelled() and task.exception() is not None:
        decode.handle.abort()


def _prefill_settled(proxy: Proxy, task: asyncio.Task, leg: Leg) -> None:
    """The prefill leg ended after decode answered: count it, drain a stream, free the worker."""
    if leg.settled:
        return
    leg.settled = True
    if task.cancelled():
        leg.end()
        return
    exc = task.exception()
    if exc is not None and leg.ended:  # the router aborted it (e.g. its client left): not the worker's fault
        return
    if exc is not None:
        proxy.worker_failed(leg.worker)
        logger.warning("prefill leg failed after decode answered: %s", exc)
        leg.end()
    elif leg.is_stream:
        leg.worker.breaker.record_success()
        proxy.spawn(_drain(leg))
    else:
        leg.worker.breaker.record_success()
        leg.end()


async def _drain(leg: Leg) -> None:
    """Read the rest of a prefill answer and drop it (keeps the connection reusable)."""
    try:
        if leg.is_stream:
            await leg.response.read()
    except UPSTREAM_ERRORS:
        pass
    finally:
        await close_leg(leg)


def pd_body(parsed: dict, prefill: Worker, rid: str | None = None) -> bytes:
    """The client's JSON body plus the bootstrap fields and the rid both legs share."""
    body = dict(parsed)
    body["bootstrap_host"] = prefill.host
    body["bootstrap_port"] = prefill.bootstrap_port
    body["bootstrap_room"] = random.getrandbits(63)
    if rid is not None:
        body["rid"] = rid
    return orjson.dumps(body)
