"""Continuing a broken stream on another worker (--max-migrations).

A `/generate` stream continues from the ids already sent (`streams.continuation`); an OpenAI
stream from its state (`openai_streams.OpenAIStreamState.resume`), asking a healthy worker for the
model's context length and for the text a stop string may have held back. The continuation is a
fresh request through the same retry loop (`Proxy.connect`), with its own rid `<rid>-m<n>`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import TYPE_CHECKING

import orjson
from disagg.router import metrics
from disagg.router.legs import ABORT_TIMEOUT_SECS, RID_PREFIX, Call, FinalAnswer, fetch, loads_object
from disagg.router.openai_streams import OpenAIStreamState
from disagg.router.streams import StreamState, answer_failure, continuation
from disagg.router.upstream import UPSTREAM_ERRORS
from disagg.router.workers import Role, Worker

if TYPE_CHECKING:
    from disagg.router.proxy import Proxy

logger = logging.getLogger("disagg.router")


async def migrate(proxy: Proxy, call: Call, state: StreamState | OpenAIStreamState, tried: set[Worker]):
    """Continue a broken stream on another worker: (leg, other legs), or (code, message)
    when it cannot move, or None when migration does not apply."""
    if call.migrations >= proxy.config.max_migrations:
        return None
    if isinstance(state, OpenAIStreamState):
        resumed = await _resume_openai(proxy, call, state, tried)
    else:
        parsed = call.parsed if call.parsed is not None else loads_object(call.body)
        body = continuation(parsed, state) if parsed is not None else None
        resumed = ("/generate", body) if body is not None else None
    if resumed is None:
        logger.info("request %s: cannot continue: %s", call.request_id, getattr(state, "why_not", "") or "-")
        return None
    path, body = resumed
    call.migrations += 1
    base = call.rid or f"{RID_PREFIX[call.path]}-{os.urandom(12).hex()}"
    rid = f"{base}-m{call.migrations}"
    if not proxy.config.pd_disaggregation:
        body["rid"] = rid
    moved = dataclasses.replace(call, path=path, body=orjson.dumps(body), parsed=body, rid=rid, attempts=0)
    logger.info("request %s: continuing after %d tokens as %s", call.request_id, len(state.sent_ids), rid)
    try:
        leg, others = await proxy.connect(moved, tried)
    except FinalAnswer as answer:
        metrics.labelled(metrics.MIGRATIONS, "failed").inc()
        return answer_failure(answer.response)
    if not leg.is_stream:
        proxy.spawn(proxy.abort_legs((leg, *others), call.headers))
        metrics.labelled(metrics.MIGRATIONS, "failed").inc()
        return (
            "upstream_unavailable",
            f"continuation answered HTTP {leg.response.status} without a stream",
        )
    metrics.labelled(metrics.MIGRATIONS, "ok").inc()
    return leg, others


async def _resume_openai(proxy: Proxy, call: Call, state: OpenAIStreamState, tried: set[Worker]):
    """The continuation of an OpenAI stream, and the text its old worker held back."""
    parsed = call.movable
    ctx = None
    if state.chat and not (parsed.get("max_tokens") or parsed.get("max_completion_tokens")):
        ctx = await _model_context_length(proxy, call, tried)
    resumed = state.resume(parsed, ctx)
    stops = [parsed["stop"]] if isinstance(parsed.get("stop"), str) else parsed.get("stop") or []
    if resumed is not None and state.sent_ids and stops:  # text may be held back: ask what it was
        decoded = await _worker_json(proxy, call, tried, "POST", "/detokenize", {"tokens": state.sent_ids})
        if isinstance(decoded, dict) and isinstance(decoded.get("text"), str):
            state.prefix = state.held_text(decoded["text"], [s for s in stops if isinstance(s, str)])
    return resumed


async def _model_context_length(proxy: Proxy, call: Call, tried: set[Worker]) -> int | None:
    if proxy.context_length is None:
        models = await _worker_json(proxy, call, tried, "GET", "/v1/models")
        try:
            proxy.context_length = int(models["data"][0]["max_model_len"])
        except (TypeError, KeyError, IndexError, ValueError):
            return None
    return proxy.context_length


async def _worker_json(proxy: Proxy, call: Call, tried: set[Worker], method: str, path: str, body=None):
    """A small JSON call to one healthy worker that serves the model (None when none answers)."""
    roles = (Role.DECODE, Role.PREFILL) if proxy.config.pd_disaggregation else (Role.REGULAR,)
    workers = [w for role in roles for w in proxy.registry.available(role) if w not in tried]
    for worker in workers[:2]:
        try:
            headers = {**call.headers, "content-type": "application/json"}
            status, data, _ = await fetch(proxy.client, method, worker.url, path, headers,
                                          ABORT_TIMEOUT_SECS, orjson.dumps(body) if body else b"")  # fmt: skip
            if status == 200:
                return orjson.loads(data)
        except (*UPSTREAM_ERRORS, orjson.JSONDecodeError):
            continue
    return None
