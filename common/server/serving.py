"""What the API handlers share: server state, input checks, fan-out of n requests, SSE, disconnects."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from disagg.common.engine.request import NUMERICAL_ERROR, SamplingParams
from disagg.common.server.data_parallel import REPLICA_FAILED
from disagg.common.server.ipc import StrOut
from disagg.common.server.metrics import ServerMetrics
from disagg.common.server.protocol import MAX_ROOM, SERVER_ERROR, APIError
from disagg.common.server.tokenizer_manager import TokenizerManager
from fastapi import Request

logger = logging.getLogger(__name__)

DISCONNECT_POLL_S = 0.2
# the scheduler's `error` for a request whose KV cache never arrived ("KV transfer failed: kind: detail",
# kind as in transfer/base.py): the system's failure, not the client's
KV_TRANSFER_FAILED = "KV transfer failed"


# ASGI scope keys the guard middleware sets for the handlers
IS_ADMIN, PRINCIPAL = "disagg.is_admin", "disagg.principal"


@dataclass
class ServerState:
    tm: TokenizerManager
    metrics: ServerMetrics
    model_name: str  # what /v1/models lists and requests may name
    model_path: str
    context_length: int
    server_info: dict = field(default_factory=dict)  # the flags, for /server_info
    draining: bool = False  # SIGTERM seen: new requests get 503


def state_of(request: Request) -> ServerState:
    return request.app.state.server


def owner_of(request: Request) -> str | None:
    """Who sent this request (a hash of its key): the only one, with the admin, who may abort it."""
    return request.scope.get(PRINCIPAL)


def admin_required(what: str) -> APIError:
    return APIError(403, f"{what} needs the admin API key (--admin-api-key)", type="permission_error",
                    code="admin_key_required")  # fmt: skip


def new_rid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


# NOTE: SGLang's router (sglang-router 0.3) fills in "unknown" when the client named no model
_NO_MODEL = ("unknown",)


def check_model(state: ServerState, model: str | None) -> None:
    if model and model not in (state.model_name, state.model_path, *_NO_MODEL):
        raise APIError(404, f"the model `{model}` does not exist (this server serves `{state.model_name}`)",
                       "model", code="model_not_found")  # fmt: skip


def check_lengths(state: ServerState, prompt_len: int, max_new_tokens: int | None, param: str) -> int:
    """Return max_new_tokens (default: the rest of the context) after checking prompt and budget."""
    ctx = state.context_length
    if prompt_len == 0:
        raise APIError(400, "the prompt is empty", "prompt")
    if prompt_len >= ctx:
        raise APIError(400, f"the prompt has {prompt_len} tokens; this model's context length is {ctx} tokens "
                       "(prompt and output together)", "prompt", code="context_length_exceeded")  # fmt: skip
    if max_new_tokens is None:
        return ctx - prompt_len
    if not isinstance(max_new_tokens, int) or max_new_tokens <= 0:
        raise APIError(400, f"{param} must be >= 1, got {max_new_tokens!r}", param)
    if prompt_len + max_new_tokens > ctx:
        raise APIError(400, f"this model's context length is {ctx} tokens, but {prompt_len} prompt tokens plus "
                       f"{param}={max_new_tokens} is {prompt_len + max_new_tokens}", param,
                       code="context_length_exceeded")  # fmt: skip
    return max_new_tokens


def check_token_ids(prompts: list[list[int]], param: str) -> list[list[int]]:
    for ids in prompts:
        if not all(0 <= t < 2**31 for t in ids):
            raise APIError(400, "token ids must be in [0, vocabulary size)", param)
    return prompts


def make_sampling(**kwargs) -> SamplingParams:
    try:
        sp = SamplingParams(**kwargs)
        sp.validate()
    except ValueError as e:
        param = e.args[1] if len(e.args) > 1 else None
        raise APIError(400, str(e.args[0]), param) from None
    except TypeError as e:
        raise APIError(400, str(e)) from None
    if not all(isinstance(s, str) and s for s in sp.stop):
        raise APIError(400, "stop must be a non-empty string or a list of them", "stop")
    # NOTE: out-of-range integers would fail inside the scheduler's step (torch), not here
    if sp.seed is not None and not -(2**63) <= sp.seed < 2**63 - 1024:
        raise APIError(400, f"seed must be a 64-bit signed integer, got {sp.seed}", "seed")
    if sp.top_k > 2**31:
        raise APIError(400, f"top_k must be <= 2**31, got {sp.top_k}", "top_k")
    if not all(isinstance(t, int) and 0 <= t < 2**31 for t in sp.stop_token_ids):
        raise APIError(400, "stop_token_ids must be token ids (0 <= id < 2**31)", "stop_token_ids")
    return sp


def with_seed(sp: SamplingParams, index: int) -> SamplingParams:
    """The index-th of n samples: a seeded request gets seed+index so the n samples differ."""
    if sp.seed is None or index == 0:
        return sp
    return dataclasses.replace(sp, seed=sp.seed + index)


def has_room(pd: dict | None) -> bool:
    """Whether a request came through PD (a router gave it a bootstrap room)."""
    return bool(pd) and pd.get("bootstrap_room") is not None


_NO_ROOM = {"bootstrap_host": None, "bootstrap_port": None, "bootstrap_room": None}


def without_room(pd: dict | None) -> dict | None:
    """The PD fields of a request this server computes itself (other fields, a DP rank, stay)."""
    return {**pd, **_NO_ROOM} if pd else pd


def pd_for(pd: dict | None, index: int) -> dict | None:
    """The PD fields of the index-th prompt of one call: room + index.

    A router draws one room per call and sends the same body to the prefill and the decode; both
    derive each prompt's room the same way, so each prompt meets its own KV cache. The n choices of
    a prompt share its room: the prefill sends the prompt once, the decode forks it
    (shared_prompt.py). NOTE: the fan-out lives here, not in the router, because a router (ours or
    SGLang's) forwards one body to one pair: the decode's front end then merges the answers, indexes,
    usage and streams exactly as a colocated server does."""
    if not has_room(pd) or index == 0:
        return pd
    return {**pd, "bootstrap_room": (pd["bootstrap_room"] + index) % MAX_ROOM}


async def merge_streams(gens: list[AsyncIterator[StrOut]]) -> AsyncIterator[tuple[int, StrOut]]:
    """Interleave the outputs of several requests as (index, output); leaving early aborts all of them."""
    if len(gens) == 1:
        async with contextlib.aclosing(gens[0]) as g:
            async for out in g:
                yield 0, out
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, gen: AsyncIterator[StrOut]) -> None:
        try:
            async with contextlib.aclosing(gen) as g:
                async for out in g:
                    queue.put_nowait((i, out))
        except Exception as e:  # noqa: BLE001 - re-raised in the consumer
            queue.put_nowait((i, e))
        finally:
            queue.put_nowait((i, None))

    tasks = [asyncio.create_task(pump(i, g)) for i, g in enumerate(gens)]
    try:
        remaining = len(tasks)
        while remaining:
            i, out = await queue.get()
            if out is None:
                remaining -= 1
            elif isinstance(out, Exception):
                raise out
            else:
                yield i, out
    finally:
        for t in tasks:
            t.cancel()


def engine_error(error: str) -> APIError:
    """Classify why the engine ended a request that produced nothing (StrOut.error): decided once, here.

    A failed KV transfer is ours (504 on a timeout, else 502; code kv_transfer_failed, retryable on
    another pair); the model's non-finite logits are ours too (500); a room in use is a conflict (409);
    an abort is reported as such; anything else the engine refuses (a prompt too long for its pool,
    token ids out of its vocabulary) is the client's.
    """
    if error.startswith(KV_TRANSFER_FAILED):
        timeout = error[len(KV_TRANSFER_FAILED) :].lstrip(": ").startswith("timeout")
        return APIError(504 if timeout else 502, error, type=SERVER_ERROR, code="kv_transfer_failed")
    if error.startswith(REPLICA_FAILED):  # the other replicas still serve: retryable
        return APIError(502, error, type=SERVER_ERROR, code="replica_failed")
    if error.startswith(NUMERICAL_ERROR):  # the model's logits were not finite: ours, not the client's
        return APIError(500, error, type=SERVER_ERROR, code="numerical_error")
    if error.startswith("aborted"):
        return APIError(400, error, code="request_aborted")
    if "room" in error and any(w in error for w in ("in use", "duplicate", "reused")):
        return APIError(409, error, "bootstrap_room", code="bootstrap_room_in_use")
    return APIError(400, error)


def duplicate_rid(e: ValueError) -> APIError:
    return APIError(409, str(e), "rid", code="duplicate_rid")


async def open_stream(request: Request, gens: list[AsyncIterator[StrOut]]):
    """Start a streamed answer: wait for the first output so that a request refused or failed before
    producing anything gets its own status (4xx, or a 5xx a router retries) instead of a 200 stream.

    Returns (first (index, output), the rest of the merged outputs), or None if the client left first.
    """
    outputs = merge_streams(gens)

    async def first():
        try:
            return await anext(outputs)
        except ValueError as e:  # a duplicate rid
            raise duplicate_rid(e) from None

    head = await until_disconnect(request, first())
    if head is None:
        await outputs.aclose()
        return None
    out = head[1]
    if out.finished and out.error and not out.output_ids:
        await outputs.aclose()  # the n>1 siblings, if any, are aborted
        raise engine_error(out.error)
    return head, outputs


async def replay_head(head: tuple[int, StrOut], outputs: AsyncIterator[tuple[int, StrOut]]):
    yield head
    async with contextlib.aclosing(outputs) as rest:
        async for item in rest:
            yield item


def stream_crash(e: Exception) -> str:
    """A bug inside a stream that already answered 200: still an error event, then [DONE]."""
    logger.exception("stream failed")
    return sse(APIError(500, f"internal error: {e}", type=SERVER_ERROR, code="internal_error").body())


async def until_disconnect(request: Request, coro):
    """Run `coro`; if the client goes away first, cancel it (which aborts its requests) and return None."""
    task = asyncio.ensure_future(coro)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if done:
                return task.result()
            if await request.is_disconnected():
                return None
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def sse(obj: dict | str) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)}\n\n"


@dataclass
class ChoiceAcc:
    """Everything one request produced, accumulated from its StrOut deltas."""

    text: str = ""
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    token_texts: list[str] = field(default_factory=list)
    top_logprobs: list[list[list]] = field(default_factory=list)
    prompt_logprobs: list[float | None] | None = None  # echo + logprobs: per prompt token, the first None
    prompt_top_logprobs: list[list[list] | None] | None = None
    last: StrOut | None = None

    def add(self, out: StrOut) -> None:
        self.text += out.text
        self.output_ids += out.output_ids
        self.logprobs += out.logprobs or []
        self.token_texts += out.token_texts or []
        self.top_logprobs += out.top_logprobs or []
        self.prompt_logprobs = out.prompt_logprobs or self.prompt_logprobs
        self.prompt_top_logprobs = out.prompt_top_logprobs or self.prompt_top_logprobs
        self.last = out

    def raise_if_rejected(self) -> None:
        """A request the engine ended before producing anything answers with that error."""
        if self.last and self.last.error and not self.output_ids:
            raise engine_error(self.last.error)


def usage(accs: list[ChoiceAcc], prompt_lens: list[int]) -> dict:
    """OpenAI's count: each prompt once (its n choices share it), every choice's completion tokens;
    a prompt's cached tokens are the most any of its choices found in the cache, never above its length."""
    completion = sum(a.last.completion_tokens if a.last else 0 for a in accs)
    n = len(accs) // max(len(prompt_lens), 1)
    cached = sum(
        min(length, max((a.last.cached_tokens if a.last else 0) for a in accs[p * n : (p + 1) * n]))
        for p, length in enumerate(prompt_lens)
    )
    prompt = sum(prompt_lens)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}  # fmt: skip
