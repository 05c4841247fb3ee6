"""`--dp-size N`: N replicas of the engine behind one server (SGLang's DataParallelController
without DP attention).

The controller process sits where the scheduler process would be and proxies both directions:

    HTTP process --GenerateReqMsg/AbortReqMsg/PingMsg--> controller --> replica i's scheduler (rank 0)
    replica schedulers --BatchTokenOutMsg/PongMsg--> controller --> detokenizer

Each replica is an unchanged scheduler process (a full TP group with its own KV pool; on GPU the
replica's GPUs are `--base-gpu-id + i*tp` onwards, through CUDA_VISIBLE_DEVICES). The controller
picks a replica per request (`--load-balance-method`), sends aborts to the replica holding the
request, merges the replicas' stats into one answer (the sum, plus one entry per replica) and, when
a replica dies, ends its requests with a `REPLICA_FAILED` error instead of leaving them waiting.
What serves every replica and must outlive any one of them runs here too (`services`: a PD
prefill's bootstrap server, told when a replica dies).
Seeing every output is what makes the load exact: a replica's load is the requests it was given
and has not finished, and their tokens (prompt + generated so far), as its own outputs report them.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import logging
import multiprocessing as mp
import re
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import zmq
from disagg.common.config import (
    EngineConfig,
    cuda_visible_devices_for_children,
    dp_replica_for_children,
    set_default_cpu_threads,
)
from disagg.common.engine.request import SchedulerStats, TokenOut
from disagg.common.messages import decode, encode
from disagg.common.server.ipc import (
    AbortReqMsg,
    BatchTokenOutMsg,
    GenerateReqMsg,
    IpcNames,
    PingMsg,
    PongMsg,
    zmq_socket,
)
from disagg.common.server.launch_local import visible_gpus
from disagg.common.server.scheduler_process import run_scheduler_process, start_child

logger = logging.getLogger(__name__)

LOAD_BALANCE_METHODS = ("round_robin", "shortest_queue", "minimum_tokens")
# the error of a request whose replica died (serving.engine_error: 502, code replica_failed)
REPLICA_FAILED = "data parallel replica failed"
POLL_MS = 200  # the loop wakes at least this often to notice a dead replica
READY_TIMEOUT_S = 600.0
PING_TTL_S = 30.0  # a merged answer still missing a replica's part after this is dropped


@dataclass
class Replica:
    """One replica as the controller sees it: its process, its socket and what it holds."""

    dp_rank: int
    proc: mp.Process
    sock: zmq.Socket  # PUSH to the replica's scheduler
    gpus: list[str] | None = None  # CUDA_VISIBLE_DEVICES of the replica (None: CPU / untouched)
    alive: bool = True
    reqs: dict[str, int] = field(default_factory=dict)  # rid -> tokens held (prompt + generated so far)
    num_dispatched: int = 0

    @property
    def num_tokens(self) -> int:
        return sum(self.reqs.values())

    def info(self, stats: SchedulerStats | None) -> dict:
        """Its entry in the merged stats (/server_info, the dp_rank metrics)."""
        return {"dp_rank": self.dp_rank, "pid": self.proc.pid, "alive": self.alive, "gpus": self.gpus, "num_dispatched": self.num_dispatched,
                "num_in_flight": len(self.reqs), "num_tokens": self.num_tokens, "stats": stats}  # fmt: skip


class LoadBalancer:
    """Picks the replica for each new request among the live ones (SGLang's method names)."""

    def __init__(self, method: str):
        if method not in LOAD_BALANCE_METHODS:
            raise ValueError(f"--load-balance-method must be one of {LOAD_BALANCE_METHODS}, got {method!r}")
        self.method = method
        self.next = 0  # round robin position; also breaks ties of the other methods in turn

    def pick(self, replicas: list[Replica]) -> Replica:
        live = [r for r in replicas if r.alive]
        if not live:
            raise RuntimeError("no live data parallel replica")
        start = self.next % len(replicas)
        ordered = sorted(live, key=lambda r: (r.dp_rank - start) % len(replicas))  # in turn from `start`
        if self.method == "shortest_queue":
            chosen = min(ordered, key=lambda r: len(r.reqs))
        elif self.method == "minimum_tokens":
            chosen = min(ordered, key=lambda r: r.num_tokens)
        else:
            chosen = ordered[0]
        self.next = chosen.dp_rank + 1
        return chosen


def replica_gpus(engine: EngineConfig, base_gpu_id: int, dp_rank: int) -> list[str] | None:
    """The GPUs replica `dp_rank` sees: one per rank (tp x pp) from base_gpu_id + dp_rank x that
    (None on the CPU)."""
    if engine.device == "cpu":
        return None
    visible = visible_gpus()  # NOTE: nvidia-smi, not torch: this process stays small on a CPU machine
    if not visible:
        return None
    per_replica = engine.world_size
    first = base_gpu_id + dp_rank * per_replica
    if first + per_replica > len(visible):
        need = base_gpu_id + max(1, engine.dp_size) * per_replica
        raise ValueError(f"--dp-size {engine.dp_size} replicas of {per_replica} GPUs from --base-gpu-id {base_gpu_id} "
                         f"need {need} GPUs; {len(visible)} are visible")  # fmt: skip
    return visible[first : first + per_replica]


def sum_stats(parts: list[SchedulerStats]) -> SchedulerStats:
    """One server's view of several replicas: counts added (per key in the dict fields), the
    usage ratio recomputed, the hit rate averaged, the transfer series labelled by dp_rank."""
    merged = {}
    for f in dataclasses.fields(SchedulerStats):
        values = [getattr(s, f.name) for s in parts]
        if isinstance(values[0], int):
            merged[f.name] = sum(values)
        elif isinstance(values[0], dict):
            merged[f.name] = functools.reduce(_add_counts, values, {})
    pages = max(merged["num_total_pages"], 1)
    hit = sum(s.cache_hit_rate for s in parts) / len(parts)
    text = merge_series([s.metrics_text for s in parts])
    return SchedulerStats(
        **merged, kv_usage=merged["num_used_pages"] / pages, cache_hit_rate=hit, metrics_text=text
    )


def _add_counts(a: dict, b: dict) -> dict:
    """{key: count or list of counts}, added key by key (lists element by element)."""
    out = dict(a)
    for key, value in b.items():
        if key not in out:
            out[key] = value
        elif isinstance(value, list):
            out[key] = [x + y for x, y in zip(out[key], value, strict=True)]
        else:
            out[key] = out[key] + value
    return out


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?(\s.*)$")


def merge_series(texts: list[str]) -> str:
    """The replicas' Prometheus texts as one: dp_rank="i" added to replica i's samples, each
    family's samples together under its # HELP / # TYPE lines (every replica exports the same)."""
    headers: dict[str, list[str]] = {}
    samples: dict[str, list[str]] = {}
    for dp_rank, text in enumerate(texts):
        family = None  # a histogram's _bucket/_sum/_count samples belong to the family its TYPE named
        for line in text.splitlines():
            if line.startswith(("# HELP ", "# TYPE ")):
                family = line.split()[2]
                if line not in headers.setdefault(family, []):
                    headers[family].append(line)
            elif (m := _SAMPLE.match(line)) is not None:
                labels = f'dp_rank="{dp_rank}"' + (f",{m.group(3)}" if m.group(3) else "")
                samples.setdefault(family or m.group(1), []).append(f"{m.group(1)}{{{labels}}}{m.group(4)}")
    lines = []
    for name in dict.fromkeys([*headers, *samples]):
        lines += headers.get(name, []) + samples.get(name, [])
    return "\n".join(lines) + ("\n" if lines else "")


def merge_eplb(summaries: list[dict]) -> dict:
    """/eplb_rebalance over the replicas (independent engines, each re-placed from its own load):
    the first error, else the counts summed, balancedness averaged, and each replica's summary."""
    if not summaries or any("error" in s for s in summaries):
        return next((s for s in summaries if "error" in s), {"error": "no replica answered"})
    merged = {
        key: sum(s[key] for s in summaries) for key in ("num_layers", "num_layers_moved", "routed_pairs")
    }
    for key in ("balancedness_before", "balancedness_after", "seconds"):
        merged[key] = sum(s[key] for s in summaries) / len(summaries)
    return {**merged, "layers": [], "replicas": summaries}


@dataclass
class PendingPing:
    """A ping from the HTTP process, fanned out to every live replica, answered once all replied."""

    ping: PingMsg
    waiting: set[int]  # dp ranks that still owe an answer
    stats: dict[int, SchedulerStats] = field(default_factory=dict)
    eplb: dict[int, dict] = field(default_factory=dict)  # /eplb_rebalance: each replica's summary
    ok: bool = True
    created: float = field(default_factory=time.monotonic)


class DataParallelController:
    def __init__(self, engine: EngineConfig, ipc: IpcNames, scheduler_target: Callable, method: str,
                 base_gpu_id: int = 0, log_level: str = "info", route_by_room: bool = False,
                 services: Callable | None = None):  # fmt: skip
        self.log_level = log_level
        # `services()` starts before the replicas; the object it returns hears `replica_died(dp_rank)`
        # and `close()` (a PD prefill's bootstrap server: replicas register with it as they start)
        self.make_services, self.services = services, None
        # a PD prefill: a request with a bootstrap room goes to replica room % N, where the decode
        # looks for it (SGLang's rule); the load-balance method places the others
        self.route_by_room = route_by_room
        self.engine, self.ipc, self.target, self.base_gpu_id = engine, ipc, scheduler_target, base_gpu_id
        self.balancer = LoadBalancer(method)
        self.ctx = zmq.Context.instance()
        self.folder: str | None = None  # the replicas' ZMQ addresses (ipc:// files), made by start()
        self.replicas: list[Replica] = []
        self.pings: dict[int, PendingPing] = {}  # ping id sent to a replica -> the merged answer
        self.sub_pings: dict[int, int] = {}  # ping id sent to a replica -> its dp rank
        self.ping_ids = itertools.count()
        self.owner: dict[str, Replica] = {}  # rid -> the replica running it

    # ---- start-up ----
    def start(self) -> dict:
        """Spawn the replicas, wait until all are ready; the ready record for the launcher."""
        self.folder = tempfile.mkdtemp(prefix="disagg-dp-")
        self.inbox = f"ipc://{self.folder}/controller"  # every replica's outputs land here
        self.from_http = zmq_socket(self.ctx, zmq.PULL, self.ipc.scheduler, bind=True)
        self.from_replicas = zmq_socket(self.ctx, zmq.PULL, self.inbox, bind=True)
        self.to_detok = zmq_socket(self.ctx, zmq.PUSH, self.ipc.detokenizer, bind=False)
        # NOTE: the launcher starts this process as a daemon, and daemons may not have children
        mp.current_process().daemon = False
        set_default_cpu_threads(self.engine.dp_size * self.engine.tp)  # replicas split the cores
        if self.make_services is not None:
            self.services = self.make_services()
        conns = [self._spawn(i) for i in range(self.engine.dp_size)]
        infos = [self._wait_ready(r, c) for r, c in zip(self.replicas, conns, strict=True)]
        return {**infos[0], "status": "ready"}

    def _spawn(self, dp_rank: int):
        ctx = mp.get_context("spawn")
        addr = f"ipc://{self.folder}/replica{dp_rank}"
        ipc = IpcNames(scheduler=addr, detokenizer=self.inbox, http="")
        gpus = replica_gpus(self.engine, self.base_gpu_id, dp_rank)
        target = functools.partial(self.target, name=f"dp{dp_rank}-scheduler")
        recv_end, send_end = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=target, args=(self.engine.replace(dp_size=1), ipc, send_end, self.log_level),
                           name=f"disagg-dp{dp_rank}", daemon=False)  # fmt: skip
        with cuda_visible_devices_for_children(gpus), dp_replica_for_children(dp_rank, self.engine.dp_size):
            proc.start()
        send_end.close()
        self.replicas.append(Replica(dp_rank, proc, zmq_socket(self.ctx, zmq.PUSH, addr, bind=False), gpus))
        return recv_end

    @staticmethod
    def _wait_ready(replica: Replica, conn) -> dict:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not conn.poll(0.2):
            if not replica.proc.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"replica {replica.dp_rank} died or hung during start-up")
        info = conn.recv()
        if info.get("status") != "ready":
            raise RuntimeError(f"replica {replica.dp_rank} failed to start:\n{info.get('error')}")
        return info

    # ---- the loop ----
    def run_forever(self) -> None:
        poller = zmq.Poller()
        poller.register(self.from_http, zmq.POLLIN)
        poller.register(self.from_replicas, zmq.POLLIN)
        while any(r.alive for r in self.replicas):
            events = dict(poller.poll(POLL_MS))
            if self.from_replicas in events:
                for msg in _drain(self.from_replicas):
                    self.on_replica_msg(msg)
            if self.from_http in events:
                for msg in _drain(self.from_http):
                    self.on_http_msg(msg)
            self.check_replicas()
            self.expire_pings()
        logger.error("every data parallel replica died: stopping")

    def on_http_msg(self, msg) -> None:
        if isinstance(msg, GenerateReqMsg):
            self.dispatch(msg)
        elif isinstance(msg, AbortReqMsg):
            replica = self.owner.get(msg.rid)
            if replica is not None and replica.alive:  # unknown: finished already, nothing to free
                replica.sock.send(encode(msg))
        elif isinstance(msg, PingMsg):
            self.fan_out_ping(msg)
        else:
            logger.warning("dp controller: unexpected message %r", type(msg).__name__)

    def dispatch(self, msg: GenerateReqMsg) -> None:
        if self.route_by_room and msg.bootstrap_room is not None:
            replica = self.replicas[msg.bootstrap_room % len(self.replicas)]
            if not replica.alive:  # no other replica can serve the room: the decode asks that one
                error = f"{REPLICA_FAILED}: replica {replica.dp_rank} (room {msg.bootstrap_room}) is down"
                out = TokenOut(msg.rid, [], finished=True, finish_reason="abort", error=error)
                self.to_detok.send(encode(BatchTokenOutMsg([], [out])))
                return
        else:
            replica = self.balancer.pick(self.replicas)
        replica.reqs[msg.rid] = len(msg.input_ids)
        replica.num_dispatched += 1
        self.owner[msg.rid] = replica
        replica.sock.send(encode(msg))

    def on_replica_msg(self, msg) -> None:
        if isinstance(msg, BatchTokenOutMsg):
            self.track(msg.outs)
            self.to_detok.send(encode(msg))
        elif isinstance(msg, PongMsg):
            self.merge_pong(msg)

    def track(self, outs: list[TokenOut]) -> None:
        """Keep each replica's load as its outputs report it."""
        for out in outs:
            replica = self.owner.get(out.rid)
            if replica is None:
                continue
            if out.finished:
                replica.reqs.pop(out.rid, None)
                del self.owner[out.rid]
            elif out.rid in replica.reqs:
                replica.reqs[out.rid] += len(out.new_token_ids)

    # ---- stats: one ping in, one per replica out, one merged answer back ----
    def fan_out_ping(self, ping: PingMsg) -> None:
        pending = PendingPing(ping, set())
        for r in self.replicas:
            if r.alive:
                sub_id = next(self.ping_ids)  # one id per replica: its answer names who answered
                self.pings[sub_id] = pending
                pending.waiting.add(r.dp_rank)
                self.sub_pings[sub_id] = r.dp_rank
                r.sock.send(encode(PingMsg(sub_id, want_stats=True, flush_cache=ping.flush_cache,
                                           eplb_rebalance=ping.eplb_rebalance)))  # fmt: skip

    def merge_pong(self, pong: PongMsg) -> None:
        pending, dp_rank = self.pings.pop(pong.ping_id, None), self.sub_pings.pop(pong.ping_id, None)
        if pending is None or dp_rank not in pending.waiting:
            return
        pending.waiting.discard(dp_rank)
        pending.ok &= pong.ok
        if pong.stats is not None:
            pending.stats[dp_rank] = pong.stats
        if pong.eplb is not None:
            pending.eplb[dp_rank] = pong.eplb
        if not pending.waiting:
            self.answer(pending)

    def answer(self, pending: PendingPing) -> None:
        stats = None
        if pending.ping.want_stats and pending.stats:
            stats = sum_stats([pending.stats[i] for i in sorted(pending.stats)])
            stats.dp_replicas = [r.info(pending.stats.get(r.dp_rank)) for r in self.replicas]
        eplb = (
            merge_eplb([pending.eplb[i] for i in sorted(pending.eplb)])
            if pending.ping.eplb_rebalance
            else None
        )
        self.to_detok.send(encode(PongMsg(pending.ping.ping_id, stats, pending.ok, eplb)))

    def expire_pings(self) -> None:
        """Forget sub-pings a replica never answered (the HTTP side gave up long ago)."""
        now = time.monotonic()
        for sub_id in [i for i, p in self.pings.items() if now - p.created > PING_TTL_S]:
            self.pings.pop(sub_id)
            self.sub_pings.pop(sub_id, None)

    # ---- a replica that dies ----
    def check_replicas(self) -> None:
        for replica in self.replicas:
            if replica.alive and not replica.proc.is_alive():
                self.on_replica_died(replica)

    def on_replica_died(self, replica: Replica) -> None:
        replica.alive = False
        code = replica.proc.exitcode
        logger.error("data parallel replica %d died (exit code %s): failing its %d requests",
                     replica.dp_rank, code, len(replica.reqs))  # fmt: skip
        error = f"{REPLICA_FAILED}: replica {replica.dp_rank} exited with code {code}"
        outs = [TokenOut(rid, [], finished=True, finish_reason="abort", error=error) for rid in replica.reqs]
        for rid in replica.reqs:
            self.owner.pop(rid, None)
        replica.reqs.clear()
        if self.services is not None:
            self.services.replica_died(replica.dp_rank)
        if outs:
            self.to_detok.send(encode(BatchTokenOutMsg([], outs)))
        for sub_id in [i for i, dp_rank in self.sub_pings.items() if dp_rank == replica.dp_rank]:
            pending = self.pings.pop(sub_id)  # answer without it
            del self.sub_pings[sub_id]
            pending.waiting.discard(replica.dp_rank)
            if not pending.waiting:
                self.answer(pending)

    def stop(self) -> None:
        for r in self.replicas:
            if r.proc.is_alive():
                r.proc.terminate()
        for r in self.replicas:
            r.proc.join(5.0)
            if r.proc.is_alive():
                r.proc.kill()
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
        if self.services is not None:
            self.services.close()


def _drain(sock: zmq.Socket) -> list:
    msgs = []
    while True:
        try:
            msgs.append(decode(sock.recv(zmq.NOBLOCK)))
        except zmq.Again:
            return msgs


def run_data_parallel_controller(engine: EngineConfig, ipc: IpcNames, ready_conn, log_level: str = "info",
                                 scheduler_target: Callable | None = None, method: str = "round_robin",
                                 base_gpu_id: int = 0, name: str = "dp-controller",
                                 route_by_room: bool = False, services: Callable | None = None) -> None:  # fmt: skip
    """Spawn target (in place of the scheduler process): start the replicas, say ready, proxy."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # stop(): the replicas go down with us
    if scheduler_target is None:
        scheduler_target = run_scheduler_process
    controller = DataParallelController(
        engine, ipc, scheduler_target, method, base_gpu_id, log_level, route_by_room, services
    )
    started = start_child(
        ready_conn, log_level, name, lambda: (controller, controller.start()), controller.stop
    )
    if started is None:
        return
    try:
        controller.run_forever()
    finally:
        controller.stop()
