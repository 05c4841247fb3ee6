"""The HTTP process's side of the engine: tokenize, send requests, fan detokenized outputs out.

Tokenization runs on worker threads (never on the event loop, never in the scheduler): short texts
on one, long texts on another with its own copy of the tokenizer, so a huge prompt never delays a
short one (HF fast tokenizers release the GIL while encoding). A text with more characters than
any prompt that fits the context can have is refused before it is tokenized at all. Outputs arrive
from the detokenizer on one socket and are routed to per-request asyncio queues; request timings
feed the metrics there, so they are counted even when a client has gone away.
"""

from __future__ import annotations

import asyncio
import copy
import ctypes
import ctypes.util
import dataclasses
import itertools
import json
import logging
import re
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path

import zmq
import zmq.asyncio
from disagg.common.engine.request import SamplingParams
from disagg.common.messages import decode, encode
from disagg.common.server.ipc import (
    AbortReqMsg,
    BatchStrOutMsg,
    GenerateReqMsg,
    IpcNames,
    PingMsg,
    PongMsg,
    StrOut,
    zmq_socket,
)
from disagg.common.server.metrics import ServerMetrics
from disagg.common.server.protocol import APIError

logger = logging.getLogger(__name__)

LARGE_TEXT_CHARS = 32_768  # longer texts are tokenized on the second thread
# NOTE: a normalizer may compose characters (NFC); allow that much slack in the character bound
NORMALIZER_SLACK = 2
ANY_OWNER = object()  # abort(): whoever created the request


def _trim_heap() -> None:
    """Give the freed heap of a large tokenization back to the OS (glibc keeps it otherwise)."""
    libc = ctypes.util.find_library("c")
    if libc:
        ctypes.CDLL(libc).malloc_trim(0)


# tokenizer classes that are a tokenizer.json and nothing else: loaded without AutoTokenizer
GENERIC_TOKENIZER_CLASSES = ("PreTrainedTokenizerFast", "TokenizersBackend")


def load_tokenizer(path: str):
    """The model's HF tokenizer for the HTTP and detokenizer processes.

    NOTE: AutoTokenizer imports torch (transformers' configuration module does), ~250 MB of RSS in
    each process that needs no tensor; a folder whose tokenizer_config.json names the generic fast
    class (the embedded default model's does) loads as PreTrainedTokenizerFast without it. Other
    classes may add their own behaviour (prefix spaces, BOS handling): AutoTokenizer for them."""
    folder = Path(path)
    config = folder / "tokenizer_config.json"
    if (folder / "tokenizer.json").is_file() and config.is_file():
        if json.loads(config.read_text()).get("tokenizer_class") in GENERIC_TOKENIZER_CLASSES:
            from transformers import PreTrainedTokenizerFast  # noqa: PLC0415 - imports are the cost here

            return PreTrainedTokenizerFast.from_pretrained(path)
    from transformers import AutoTokenizer  # noqa: PLC0415

    return AutoTokenizer.from_pretrained(path)


def max_token_chars(tokenizer) -> int:
    """The most characters one token can stand for (byte-level vocabularies: one per byte)."""
    return max((len(t) for t in tokenizer.get_vocab()), default=1)


# The HTTP request's arrival (time.monotonic(), set by the guard middleware before it reads the body):
# a request's TTFT and latency count from it, parsing and tokenization included; None outside a request
REQUEST_ARRIVAL: ContextVar[float | None] = ContextVar("disagg_request_arrival", default=None)


@dataclass
class ReqState:
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    created: float = field(default_factory=time.monotonic)
    last_token_time: float | None = None
    finished: bool = False
    abandoned: bool = False  # the consumer left; drop outputs until the final one
    owner: str | None = None  # the key that created it (a hash): only it or the admin may abort it


class TokenizerManager:
    def __init__(self, tokenizer, ipc: IpcNames, context_length: int, metrics: ServerMetrics):
        self.tokenizer = tokenizer
        self.ipc = ipc
        self.context_length = context_length
        self.metrics = metrics
        self.reqs: dict[str, ReqState] = {}
        self.pongs: dict[int, asyncio.Future] = {}
        # the scheduler's last stats and when they came: what /server_info shows while a long step
        # keeps the scheduler from answering (marked stale), instead of nothing
        self.last_stats = None  # SchedulerStats
        self.last_stats_at = 0.0
        self.ping_ids = itertools.count()
        # NOTE: one thread per tokenizer object: HF fast tokenizers are not safe to call from several
        # threads at once; long texts get their own copy, so they never queue in front of short ones
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenizer")
        self.large_tokenizer = copy.deepcopy(tokenizer)
        self.large_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenizer-large")
        # a text longer than this has more tokens than the context holds: refused untokenized
        self.max_prompt_chars = context_length * max_token_chars(tokenizer) * NORMALIZER_SLACK
        self.recv_task: asyncio.Task | None = None

    # ---- lifecycle (inside the server's event loop) ----
    async def start(self) -> None:
        self.ctx = zmq.asyncio.Context()
        self.send_sock = zmq_socket(self.ctx, zmq.PUSH, self.ipc.scheduler, bind=False)
        self.recv_sock = zmq_socket(self.ctx, zmq.PULL, self.ipc.http, bind=True)
        self.recv_task = asyncio.create_task(self._recv_loop())

    async def stop(self) -> None:
        if self.recv_task:
            self.recv_task.cancel()
        self.ctx.destroy(linger=0)
        self.executor.shutdown(wait=False)
        self.large_executor.shutdown(wait=False)

    @property
    def num_in_flight(self) -> int:
        return sum(not s.abandoned for s in self.reqs.values())

    # ---- tokenization (worker threads) ----
    def check_size(self, chars: int, param: str) -> None:
        """Refuse a text that cannot fit the context, before spending any time on it."""
        if chars > self.max_prompt_chars:
            raise APIError(400, f"the prompt has {chars} characters, more than any prompt that fits this model's "
                           f"context of {self.context_length} tokens can have", param,
                           code="context_length_exceeded")  # fmt: skip

    async def _in_thread(self, size: int, fn, *args):
        """fn(tokenizer, *args) on the thread for texts of `size` characters."""
        large = size > LARGE_TEXT_CHARS
        tokenizer, executor = (
            (self.large_tokenizer, self.large_executor) if large else (self.tokenizer, self.executor)
        )

        def run():
            try:
                return fn(tokenizer, *args)
            finally:
                if large:
                    _trim_heap()

        return await asyncio.get_running_loop().run_in_executor(executor, run)

    async def tokenize(self, text: str, param: str = "prompt") -> list[int]:
        self.check_size(len(text), param)
        return await self._in_thread(len(text), lambda tok, t: tok.encode(t), text)

    async def chat_prompt(
        self, messages: list[dict], tools: list[dict] | None = None, template: str | None = None
    ) -> tuple[str, list[int]]:
        """The prompt of a chat; `tools` go to the chat template (`template`: instead of the model's)."""
        size = sum(len(m["content"]) for m in messages) + (len(json.dumps(tools)) if tools else 0)
        self.check_size(size, "messages")

        def render(tok, messages) -> tuple[str, list[int]]:
            text = tok.apply_chat_template(messages, tools=tools, chat_template=template,
                                           add_generation_prompt=True, tokenize=False)  # fmt: skip
            return text, tok.encode(text, add_special_tokens=False)

        return await self._in_thread(size, render, messages)

    async def detokenize(self, ids: list[int]) -> str:
        return await self._in_thread(len(ids), lambda tok, ids: tok.decode(ids), ids)

    async def token_texts(self, ids: list[int]) -> list[str]:
        """Each token's own text (what logprobs name it by), as the detokenizer writes them."""
        return await self._in_thread(len(ids), lambda tok, ids: [tok.decode([i]) for i in ids], ids)

    # ---- requests ----
    async def generate(
        self, rid: str, input_ids: list[int], sampling: SamplingParams, pd: dict | None = None,
        owner: str | None = None,
    ) -> AsyncIterator[StrOut]:  # fmt: skip
        """Yield the request's outputs until the finished one; leaving early aborts it."""
        if rid in self.reqs:
            raise ValueError(f"request id {rid!r} is already running")
        arrival, now = REQUEST_ARRIVAL.get(), time.monotonic()
        state = self.reqs[rid] = ReqState(created=arrival or now, owner=owner)
        self._send(GenerateReqMsg(rid, list(input_ids), sampling, **(pd or {}), received_at=arrival or 0.0,
                                  sent_at=now))  # fmt: skip
        try:
            while True:
                out: StrOut = await state.queue.get()
                # NOTE: a consumer behind the detokenizer (a busy event loop: many streams, a slow
                # client's writes) takes what queued meanwhile as one output, not one event per token
                while not out.finished and not state.queue.empty():
                    out = coalesce(out, state.queue.get_nowait())
                yield out
                if out.finished:
                    return
        finally:
            if not state.finished:  # client disconnected / cancelled: free the pages now
                state.abandoned = True
                self._send(AbortReqMsg(rid))
            else:
                self.reqs.pop(rid, None)

    def abort(self, rid: str | None = None, owner: str | None | object = ANY_OWNER) -> int:
        """Abort `rid` and its n>1 siblings (`rid-0`, `rid-1`, ...), or everything when rid is None;
        only the requests `owner` created unless ANY_OWNER."""
        targets = [
            r for r, s in self.reqs.items()
            if (rid is None or r == rid or _is_sibling(r, rid)) and (owner is ANY_OWNER or s.owner == owner)
        ]  # fmt: skip
        for r in targets:
            self._send(AbortReqMsg(r))
        return len(targets)

    async def ping(
        self,
        timeout: float,
        want_stats: bool = False,
        flush_cache: bool = False,
        eplb_rebalance: bool = False,
    ) -> PongMsg | None:
        """The scheduler's answer (stats only when asked) if it comes within `timeout`, else None."""
        ping_id = next(self.ping_ids)
        fut = self.pongs[ping_id] = asyncio.get_running_loop().create_future()
        self._send(PingMsg(ping_id, want_stats, flush_cache, eplb_rebalance))
        try:
            pong = await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            return None
        finally:
            self.pongs.pop(ping_id, None)
        if want_stats and pong.stats:
            self.last_stats, self.last_stats_at = pong.stats, time.monotonic()
        return pong

    def _send(self, msg) -> None:
        self.send_sock.send(encode(msg), copy=False)  # PUSH with no HWM: never blocks

    # ---- outputs ----
    async def _recv_loop(self) -> None:
        while True:
            msg = decode(await self.recv_sock.recv())
            try:
                if isinstance(msg, BatchStrOutMsg):
                    now = time.monotonic()
                    for out in msg.outs:
                        self._dispatch(out, now)
                elif isinstance(msg, PongMsg):
                    fut = self.pongs.get(msg.ping_id)
                    if fut and not fut.done():
                        fut.set_result(msg)
            except Exception:
                logger.exception("failed to dispatch %s", type(msg).__name__)

    def _dispatch(self, out: StrOut, now: float) -> None:
        state = self.reqs.get(out.rid)
        if state is None:
            return
        n = len(out.output_ids)
        if n:
            self.metrics.observe_generated(n)
            if state.last_token_time is None:
                self.metrics.observe_first_token(now - state.created)
            else:
                self.metrics.observe_itl(now - state.last_token_time, n)
            state.last_token_time = now
        if out.finished:
            state.finished = True
            reason = out.finish_reason or "abort"
            self.metrics.observe_finish(now - state.created, reason, out.prompt_tokens, out.cached_tokens)
            if state.abandoned:
                self.reqs.pop(out.rid, None)
                return
        if not state.abandoned:
            state.queue.put_nowait(out)


def coalesce(a: StrOut, b: StrOut) -> StrOut:
    """One output for two consecutive outputs of a request (`b` after `a`): the new text and tokens of
    both, in order; `b`'s ending and counts; the prompt's logprobs, which only the first output carries."""

    def joined(x: list | None, y: list | None) -> list | None:
        return None if x is None and y is None else (x or []) + (y or [])

    return dataclasses.replace(
        b,
        text=a.text + b.text,
        output_ids=a.output_ids + b.output_ids,
        logprobs=joined(a.logprobs, b.logprobs),
        token_texts=joined(a.token_texts, b.token_texts),
        top_logprobs=joined(a.top_logprobs, b.top_logprobs),
        prompt_logprobs=a.prompt_logprobs if a.prompt_logprobs is not None else b.prompt_logprobs,
        prompt_top_logprobs=a.prompt_top_logprobs
        if a.prompt_top_logprobs is not None
        else b.prompt_top_logprobs,
    )


_SIBLING_SUFFIX = re.compile(r"(-[rm]\d+)*(-\d+|-prompt\d+)?")


def _is_sibling(rid: str, base: str) -> bool:
    """`base-3` is one of the n samples of `base`, `base-prompt0` the request that computes their
    shared prompt (shared_prompt.py), `base-r1` / `base-m1` the router's retry / migration of it
    (router/proxy.py); `base-x` (another client's id) is not."""
    rest = rid[len(base) :] if rid.startswith(base) else ""
    return bool(rest) and _SIBLING_SUFFIX.fullmatch(rest) is not None
