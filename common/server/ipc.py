"""Plumbing between the server's processes: typed messages, ZMQ socket addresses, child hygiene.

Topology (SGLang's shape; every arrow is a ZMQ PUSH -> PULL socket carrying `messages.encode` bytes):

    HTTP process (TokenizerManager) --GenerateReqMsg/AbortReqMsg/PingMsg--> scheduler (rank 0)
    scheduler --BatchTokenOutMsg / PongMsg--> detokenizer
    detokenizer --BatchStrOutMsg / PongMsg (forwarded)--> HTTP process

The receiving side of each arrow binds; the sending side connects. Addresses are ipc:// files in a
private temporary folder, so no TCP port is ever taken.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import tempfile
import threading
import time
from dataclasses import dataclass, field

import zmq
from disagg.common.engine.request import SamplingParams, SchedulerStats, TokenOut
from disagg.common.messages import message

logger = logging.getLogger(__name__)


@message
@dataclass
class GenerateReqMsg:
    """A tokenized, validated request, HTTP process -> scheduler."""

    rid: str
    input_ids: list[int]
    sampling: SamplingParams
    # PD disaggregation (filled by the router; unused by the colocated server)
    bootstrap_host: str | None = None
    bootstrap_port: int | None = None
    bootstrap_room: int | None = None
    data_parallel_rank: int | None = None  # DP attention: the DP rank to serve it (None: the scheduler picks)
    # decode: a shared prompt's KV (n > 1, shared_prompt.py): its pages stay in the prefix cache
    keep_prompt_cached: bool = False
    # the front end's time.monotonic() (one clock per host) at the HTTP request's arrival, and when it sent
    # this message (0: not known; request_stages.py's tokenize and receive stages)
    received_at: float = 0.0
    sent_at: float = 0.0


@message
@dataclass
class AbortReqMsg:
    rid: str


@message
@dataclass
class PingMsg:
    """Health / stats probe; the scheduler answers with a PongMsg carrying the same id."""

    ping_id: int
    want_stats: bool = False
    flush_cache: bool = False  # drop the prefix cache first (refused while requests run)
    eplb_rebalance: bool = False  # MoE: re-place the experts from the counted load first (eplb.py)


@message
@dataclass
class PongMsg:
    ping_id: int
    stats: SchedulerStats | None = None  # when the ping asked for them
    ok: bool = True  # False: the flush was refused
    eplb: dict | None = None  # eplb_rebalance asked: the placement summary, or {"error": why}


@message
@dataclass
class DetokReqInfo:
    """What the detokenizer must know about a request before its first tokens arrive."""

    rid: str
    stop: list[str] = field(default_factory=list)
    skip_special_tokens: bool = True
    want_token_texts: bool = False  # logprobs asked: send each token's text too


@message
@dataclass
class BatchTokenOutMsg:
    """One scheduler step's output, scheduler -> detokenizer (new_reqs are registered first)."""

    new_reqs: list[DetokReqInfo]
    outs: list[TokenOut]


@message
@dataclass
class StrOut:
    """Incremental output of one request, detokenizer -> HTTP process."""

    rid: str
    text: str  # new text since the last StrOut (stop strings already cut)
    output_ids: list[int]  # new token ids
    finished: bool = False
    finish_reason: str | None = None
    matched_stop: int | str | None = None
    error: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    logprobs: list[float] | None = None
    token_texts: list[str] | None = None  # one per new token, when logprobs were asked
    top_logprobs: list[list[list]] | None = None  # per new token: [[token_text, token_id, logprob], ...]
    # with the first token of a prompt_logprobs request (SamplingParams): per prompt token, the first None
    prompt_logprobs: list[float | None] | None = None
    prompt_top_logprobs: list[list[list] | None] | None = None  # as top_logprobs


@message
@dataclass
class BatchStrOutMsg:
    outs: list[StrOut]


@dataclass(frozen=True)
class IpcNames:
    """ZMQ addresses of the three PULL sockets (one per receiving process)."""

    scheduler: str
    detokenizer: str
    http: str

    @classmethod
    def new(cls) -> IpcNames:
        folder = tempfile.mkdtemp(prefix="disagg-ipc-")
        return cls(*(f"ipc://{folder}/{name}" for name in ("scheduler", "detokenizer", "http")))

    def cleanup(self) -> None:
        for addr in (self.scheduler, self.detokenizer, self.http):
            try:
                os.unlink(addr.removeprefix("ipc://"))
            except OSError:
                pass
        try:
            os.rmdir(os.path.dirname(self.http.removeprefix("ipc://")))
        except OSError:
            pass


def zmq_socket(ctx: zmq.Context, kind: int, addr: str, bind: bool) -> zmq.Socket:
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, 0)  # never drop or block on a slow peer; queues are bounded by requests
    sock.setsockopt(zmq.RCVHWM, 0)
    if bind:
        sock.bind(addr)
    else:
        sock.connect(addr)
    return sock


def die_with_parent() -> None:
    """Make this (child) process die when its parent does: PR_SET_PDEATHSIG, plus a watch thread."""
    parent = os.getppid()
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except OSError:
        pass  # not Linux: the watch thread below still covers it

    def watch() -> None:
        while True:
            if os.getppid() != parent:
                os._exit(1)
            time.sleep(1.0)

    threading.Thread(target=watch, daemon=True, name="parent-watch").start()
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def setup_child_logging(level: str, name: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format=f"%(asctime)s [{name}] %(levelname)s %(name)s: %(message)s",
    )
