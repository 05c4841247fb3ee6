"""The HTTP process's side of the engine: tokenize, send requests, fan detokenized outputs out.

Tokenization runs on a worker thread (never on the event loop, never in the scheduler). Outputs
arrive from the detokenizer on one socket and are routed to per-request asyncio queues; request
timings feed the metrics there, so they are counted even when a client has gone away.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import zmq
import zmq.asyncio
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
from disagg.common.messages import decode, encode
from disagg.common.server.metrics import ServerMetrics
from disagg.common.engine.request import SamplingParams

logger = logging.getLogger(__name__)


@dataclass
class ReqState:
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    created: float = field(default_factory=time.perf_counter)
    last_token_time: float | None = None
    finished: bool = False
    abandoned: bool = False  # the consumer left; drop outputs until the final one


class TokenizerManager:
    def __init__(self, tokenizer, ipc: IpcNames, context_length: int, metrics: ServerMetrics):
        self.tokenizer = tokenizer
        self.ipc = ipc
        self.context_length = context_length
        self.metrics = metrics
        self.reqs: dict[str, ReqState] = {}
        self.pongs: dict[int, asyncio.Future] = {}
        self.ping_ids = itertools.count()
        # NOTE: one thread: HF fast tokenizers are not safe to call from several threads at once
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenizer")
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

    @property
    def num_in_flight(self) -> int:
        return sum(not s.abandoned for s in self.reqs.values())

    # ---- tokenization (worker thread) ----
    async def _in_thread(self, fn, *args, **kwargs):
        return await asyncio.get_running_loop().run_in_executor(self.executor, lambda: fn(*args, **kwargs))

    async def tokenize(self, text: str) -> list[int]:
        return await self._in_thread(self.tokenizer.encode, text)

    async def chat_prompt(self, messages: list[dict]) -> tuple[str, list[int]]:
        def render() -> tuple[str, list[int]]:
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            return text, self.tokenizer.encode(text, add_special_tokens=False)

        return await self._in_thread(render)

    async def detokenize(self, ids: list[int]) -> str:
        return await self._in_thread(self.tokenizer.decode, ids)

    # ---- requests ----
    async def generate(
        self, rid: str, input_ids: list[int], sampling: SamplingParams, pd: dict | None = None
    ) -> AsyncIterator[StrOut]:
        """Yield the request's outputs until the finished one; leaving early aborts it."""
        if rid in self.reqs:
            raise ValueError(f"request id {rid!r} is already running")
        state = self.reqs[rid] = ReqState()
        self._send(GenerateReqMsg(rid, list(input_ids), sampling, **(pd or {})))
        try:
            while True:
                out: StrOut = await state.queue.get()
                yield out
                if out.finished:
                    return
        finally:
            if not state.finished:  # client disconnected / cancelled: free the pages now
                state.abandoned = True
                self._send(AbortReqMsg(rid))
            else:
                self.reqs.pop(rid, None)

    def abort(self, rid: str | None = None) -> int:
        """Abort `rid`, its n>1 siblings (`rid-0`, `rid-1`, ...), or everything when rid is None."""
        targets = [r for r in self.reqs if rid is None or r == rid or r.startswith(f"{rid}-")]
        for r in targets:
            self._send(AbortReqMsg(r))
        return len(targets)

    async def ping(
        self, timeout: float, want_stats: bool = False, flush_cache: bool = False
    ) -> PongMsg | None:
        """The scheduler's answer (stats only when asked) if it comes within `timeout`, else None."""
        ping_id = next(self.ping_ids)
        fut = self.pongs[ping_id] = asyncio.get_running_loop().create_future()
        self._send(PingMsg(ping_id, want_stats, flush_cache))
        try:
            return await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            return None
        finally:
            self.pongs.pop(ping_id, None)

    def _send(self, msg) -> None:
        self.send_sock.send(encode(msg), copy=False)  # PUSH with no HWM: never blocks

    # ---- outputs ----
    async def _recv_loop(self) -> None:
        while True:
            msg = decode(await self.recv_sock.recv())
            try:
                if isinstance(msg, BatchStrOutMsg):
                    now = time.perf_counter()
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
