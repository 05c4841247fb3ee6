"""The scheduler process: receive requests over ZMQ, step the engine, send tokens to the detokenizer.

`SchedulerLoop` drives any scheduler with the surface of `SchedulerLike` (the colocated
`Scheduler` and its prefill and decode subclasses): every role runs this one loop. `run_scheduler_process` is the spawn target of the colocated
server: it builds `disagg.common.engine.scheduler.Scheduler` and reports readiness to the launcher.
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

import zmq
from disagg.common.config import EngineConfig
from disagg.common.engine.request import Req, TokenOut
from disagg.common.messages import decode, encode
from disagg.common.server.ipc import (
    AbortReqMsg,
    BatchTokenOutMsg,
    DetokReqInfo,
    GenerateReqMsg,
    IpcNames,
    PingMsg,
    PongMsg,
    die_with_parent,
    setup_child_logging,
    zmq_socket,
)

logger = logging.getLogger(__name__)

IDLE_POLL_MS = 1000  # blocking wait when there is no work (then loop to notice shutdown)
T = TypeVar("T")


class SchedulerLike(Protocol):
    context_length: int

    def add_request(self, req: Req) -> None: ...
    def abort_request(self, rid: str) -> None: ...
    def step(self) -> list[TokenOut]: ...
    def has_work(self) -> bool: ...
    def stats(self) -> dict: ...
    def flush_cache(self) -> bool: ...
    def pd_identity(self) -> dict | None: ...

    # how long the loop may block on its sockets before the next step although has_work()
    # (the PD roles: only transfers in flight), and an fd that turns readable when a transfer
    # finished (None: nothing to watch; `on_wake()` after it woke the loop)
    def wait_timeout_ms(self) -> int: ...
    @property
    def wake_fd(self) -> int | None: ...
    def on_wake(self) -> None: ...


class SchedulerLoop:
    """One rank's loop. Rank 0 owns the sockets; `broadcast` is where TP ranks will get its decisions."""

    def __init__(self, scheduler: SchedulerLike, ipc: IpcNames, ctx: zmq.Context | None = None):
        self.scheduler = scheduler
        self.ctx = ctx or zmq.Context.instance()
        self.recv_sock = zmq_socket(self.ctx, zmq.PULL, ipc.scheduler, bind=True)
        self.send_sock = zmq_socket(self.ctx, zmq.PUSH, ipc.detokenizer, bind=False)
        self.poller = zmq.Poller()
        self.poller.register(self.recv_sock, zmq.POLLIN)
        self.wake_fd = scheduler.wake_fd
        if self.wake_fd is not None:
            self.poller.register(self.wake_fd, zmq.POLLIN)
        self.new_reqs: list[DetokReqInfo] = []
        self.pending_outs: list[TokenOut] = []  # outputs made outside step() (rejections)
        self.running = True
        # outputs a scheduler makes while it waits for the device (a PD decode's first tokens) leave
        # through this loop's send path at once (schedulers without the hook: DP attention, --dp-size)
        set_sink = getattr(scheduler, "set_early_output_sink", None)
        if set_sink is not None:
            set_sink(self.send_outputs)
        # and new requests reach it while it waits (a PD decode asks for their KV mid-step)
        self.deferred: list[Any] = []  # messages taken mid-step that only the loop handles
        set_input = getattr(scheduler, "set_early_input", None)
        if set_input is not None:
            set_input(self.recv_sock.getsockopt(zmq.FD), self.take_requests_early)

    def wait_timeout_ms(self) -> int:
        """Block up to IDLE_POLL_MS with nothing to do; with only transfers in flight, as long as
        the scheduler says (a request or a finished transfer wakes the loop at once); else not at all."""
        if self.pending_outs:
            return 0
        if not self.scheduler.has_work():
            return IDLE_POLL_MS
        return self.scheduler.wait_timeout_ms()

    def recv_messages(self) -> list[Any]:
        """Drain the socket, after blocking on it (and the transfer waker) for wait_timeout_ms();
        first the messages taken mid-step that wait for the loop."""
        msgs, self.deferred = self.deferred, []
        events = dict(self.poller.poll(0 if msgs else self.wait_timeout_ms()))
        if self.wake_fd is not None and self.wake_fd in events:
            self.scheduler.on_wake()
        if self.recv_sock in events:
            msgs += self._drain()
        return msgs

    def _drain(self) -> list[Any]:
        msgs = []
        while True:
            try:
                msgs.append(decode(self.recv_sock.recv(zmq.NOBLOCK)))
            except zmq.Again:
                return msgs

    def take_requests_early(self) -> None:
        """While the scheduler waits for a step (tp 1): the socket drained (its fd is edge-triggered:
        drained whole on every wake), new requests added at once, everything else (aborts, pings)
        left for the loop, in order."""
        for msg in self._drain():
            if isinstance(msg, GenerateReqMsg) and not self.deferred:
                self.add_request(msg)
            else:  # NOTE: after an abort or ping the rest waits too: the loop keeps their order
                self.deferred.append(msg)

    def broadcast(self, msgs: list[Any]) -> list[Any]:
        # NOTE: with tp > 1, rank 0 sends `msgs` to the other ranks here so every rank adds and
        # aborts the same requests in the same order; with tp == 1 it is the identity.
        return msgs

    def handle(self, msg: Any) -> None:
        if isinstance(msg, GenerateReqMsg):
            self.add_request(msg)
        elif isinstance(msg, AbortReqMsg):
            try:
                self.scheduler.abort_request(msg.rid)
            except KeyError:
                pass  # already finished: nothing to free
        elif isinstance(msg, PingMsg):
            ok = self.scheduler.flush_cache() if msg.flush_cache else True
            eplb = self.rebalance_experts() if msg.eplb_rebalance else None
            stats = self.scheduler.stats() if msg.want_stats else None
            self.send_sock.send(encode(PongMsg(msg.ping_id, stats, ok, eplb)))
        else:
            logger.warning("scheduler: unexpected message %r", type(msg).__name__)

    def rebalance_experts(self) -> dict:
        """POST /eplb_rebalance: here, between two steps (the engine's rank 0 only: imports torch)."""
        from disagg.common.models.eplb import rebalance_experts

        return rebalance_experts(self.scheduler)

    def add_request(self, msg: GenerateReqMsg) -> None:
        sp = msg.sampling
        self.new_reqs.append(DetokReqInfo(msg.rid, list(sp.stop), sp.skip_special_tokens, sp.return_logprob))
        try:
            self.scheduler.add_request(
                Req(
                    rid=msg.rid,
                    input_ids=msg.input_ids,
                    sampling=sp,
                    bootstrap_host=msg.bootstrap_host,
                    bootstrap_port=msg.bootstrap_port,
                    bootstrap_room=msg.bootstrap_room,
                    data_parallel_rank=msg.data_parallel_rank,
                    keep_prompt_cached=msg.keep_prompt_cached,
                    received_at=msg.received_at,
                    sent_at=msg.sent_at,
                )  # fmt: skip
            )
        except Exception as e:  # a request the engine refuses must not take the loop down
            logger.warning("request %s rejected: %s", msg.rid, e)
            self.pending_outs.append(
                TokenOut(
                    msg.rid,
                    [],
                    finished=True,
                    finish_reason="abort",
                    error=str(e),
                    prompt_tokens=len(msg.input_ids),
                )
            )

    def send_outputs(self, outs: list[TokenOut]) -> None:
        outs = self.pending_outs + outs
        self.pending_outs = []
        if outs or self.new_reqs:
            self.send_sock.send(encode(BatchTokenOutMsg(self.new_reqs, outs)))
            self.new_reqs = []

    def run_once(self) -> None:
        for msg in self.broadcast(self.recv_messages()):
            self.handle(msg)
        outs = self.scheduler.step() if self.scheduler.has_work() else []
        self.send_outputs(outs)

    def run_forever(self) -> None:
        while self.running:
            self.run_once()


def run_scheduler_loop(scheduler: SchedulerLike, ipc: IpcNames) -> None:
    SchedulerLoop(scheduler, ipc).run_forever()


def _die_with_parent_hook(runner) -> None:
    die_with_parent()  # a worker rank: gone when rank 0's process is
    return None


def start_local_ranks(config: EngineConfig, plan_hook_factory=_die_with_parent_hook) -> EngineConfig:
    """tp > 1: spawn this node's other ranks (they run rank 0's plans) and join the process group.
    `plan_hook_factory` runs in each of them (see distributed.worker_main; PD servers pass theirs)."""
    import multiprocessing as mp

    from disagg.common.parallel.ranks import (
        check_layout,
        cpu_threads_env,
        init_distributed,
        local_ranks,
        spawn_workers,
        with_local_init_addr,
    )

    # NOTE: the launcher starts this process as a daemon, and daemons may not have children
    mp.current_process().daemon = False
    check_layout(config)
    config = with_local_init_addr(config)
    cpu_threads_env(config)
    spawn_workers(config, local_ranks(config)[1:], plan_hook_factory)
    init_distributed(config, 0)
    return config


def start_child(ready_conn, log_level: str, name: str, build: Callable[[], tuple[T, dict]],
                cleanup: Callable[[], None] | None = None) -> T | None:  # fmt: skip
    """The start of a process the launcher spawns in the scheduler's place (a scheduler process or
    the --dp-size controller): die with the parent, log as `name`, `build()` what it runs, and tell
    the launcher through `ready_conn` ({"status": "ready", **info} or the build's traceback, after
    `cleanup()`). Returns what `build` made, None when it failed (the process then just returns)."""
    die_with_parent()
    setup_child_logging(log_level, name)
    try:
        made, info = build()
    except Exception:
        ready_conn.send({"status": "error", "error": traceback.format_exc()})
        if cleanup is not None:
            cleanup()
        return None
    ready_conn.send({**info, "status": "ready"})
    ready_conn.close()
    return made


def run_scheduler_process(
    config: EngineConfig,
    ipc: IpcNames,
    ready_conn,
    log_level: str = "info",
    make_scheduler=None,
    plan_hook_factory=_die_with_parent_hook,
    name: str = "scheduler",
) -> None:
    """Spawn target: build the engine, say ready (with what the front end needs), then loop.
    `make_scheduler(config)` builds the scheduler (default: the colocated `Scheduler`; the PD
    servers pass their role's) and `plan_hook_factory` runs in the other local ranks."""

    def build() -> tuple[SchedulerLoop, dict]:
        make = make_scheduler
        if make is None:
            from disagg.common.parallel.dp_attention import create_scheduler as make

        engine = start_local_ranks(config, plan_hook_factory) if config.world_size > 1 else config
        scheduler = make(engine)  # on rank 0 of tp > 1, it broadcasts each batch plan to the others
        info = {"context_length": int(scheduler.context_length), "pd_identity": scheduler.pd_identity()}
        return SchedulerLoop(scheduler, ipc), info

    loop = start_child(ready_conn, log_level, name, build)
    if loop is not None:
        loop.run_forever()
