"""What the prefill and decode servers share: their flags, the KV transfer engine of every TP rank,
and the scheduler process that drives both.

Rank 0's scheduler decides every transfer operation (send pages of a room, expect a room, abort a
room). `TransferCoordinator.flush()` runs them on every rank — each rank's KVSender (prefill) or
KVReceiver (decode) moves the KV heads of its own shard — and merges the ranks' poll() results: a
room is finished once every rank reported it, and ok only if it was ok on every rank. With tp > 1
the operations ride a plan broadcast without "ids" (no forward) and the results come back in one
gather, so the worker ranks act on exactly what rank 0 decided.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import logging
import os
import threading
from dataclasses import dataclass

import torch
from disagg.common.config import EngineConfig
from disagg.common.parallel.ranks import broadcast_plan, gather_to_rank0, run_node
from disagg.common.server.ipc import IpcNames, die_with_parent
from disagg.common.parallel.state import get_parallel
from disagg.common.server.scheduler_process import run_scheduler_process
from disagg.transfer import KVLayout, KVReceiver, KVSender, TransferResult, dtype_name

logger = logging.getLogger(__name__)

ROLES = ("prefill", "decode")
# NOTE: how long a scheduler with only transfers in flight blocks on its sockets before stepping again.
# With tp 1 a finished room wakes it at once (TransferWaker), so the timeout only bounds the wait;
# with tp > 1 the other ranks' results come only through the gather of the next step: poll.
IDLE_WAIT_MS = 100
POLL_MS = 2


@dataclass(frozen=True)
class DisaggConfig:
    mode: str = "prefill"  # prefill | decode
    bootstrap_port: int = 8998  # prefill: rank 0 serves the bootstrap here (SGLang's default)
    transfer_timeout: float = 30.0  # seconds a room may make no progress before it fails on both sides
    transfer_host: str | None = None  # prefill: address decode ranks reach its UCX listeners at
    ib_device: str | None = None  # InfiniBand/RoCE device(s) UCX uses, e.g. "mlx5_0" (default: UCX picks)

    @classmethod
    def from_args(cls, args: argparse.Namespace, mode: str) -> DisaggConfig:
        host = args.disaggregation_transfer_host
        if host is None and args.host not in ("0.0.0.0", "::", ""):
            host = args.host  # a server bound to one address is reachable there
        return cls(mode, args.disaggregation_bootstrap_port, args.disaggregation_transfer_timeout, host,
                   args.disaggregation_ib_device)  # fmt: skip


def add_disagg_args(parser: argparse.ArgumentParser) -> None:
    d = DisaggConfig()
    g = parser.add_argument_group("disaggregation")
    g.add_argument("--disaggregation-bootstrap-port", type=int, default=d.bootstrap_port,
                   help="prefill: port of the bootstrap server decode ranks query (the router's `--prefill URL PORT`)")  # fmt: skip
    g.add_argument("--disaggregation-transfer-timeout", type=float, default=d.transfer_timeout,
                   help="seconds without progress before a KV transfer fails on both sides")  # fmt: skip
    g.add_argument("--disaggregation-transfer-host", default=d.transfer_host,
                   help="prefill: address decode servers reach this server's KV senders at (default: --host, "
                        "or this machine's outward address)")  # fmt: skip
    g.add_argument("--disaggregation-ib-device", default=d.ib_device,
                   help="InfiniBand/RoCE device(s) for KV transfer, e.g. mlx5_0 (default: UCX chooses)")  # fmt: skip


# ---- one rank ---------------------------------------------------------------------------------


class RankTransfer:
    """This rank's KVSender or KVReceiver; runs the operations rank 0 decided on this rank's shard.

    Operations are plain lists (they travel in plan broadcasts):
        ["send", room, pages, page_offset, is_last, metadata]   prefill
        ["expect", room, bootstrap_host, bootstrap_port, pages]  decode
        ["abort", room]
    """

    def __init__(self, engine: KVSender | KVReceiver):
        self.engine = engine
        self._failed: list[list] = []  # operations the engine refused, reported as failed rooms

    def run(self, ops: list[list]) -> None:
        for op in ops:
            kind, room, *args = op
            try:
                if kind == "send":
                    pages, offset, is_last, metadata = args
                    self.engine.send(room, pages, offset, is_last=is_last, metadata=metadata)
                elif kind == "expect":
                    host, port, pages = args
                    self.engine.expect(room, host, port, pages)
                elif kind == "abort":
                    self.engine.abort(room)
            except Exception as e:  # noqa: BLE001 - a refused operation fails its room, never the rank
                logger.warning("transfer %s of room %s refused: %s", kind, room, e)
                self._failed.append([room, False, f"bad_request: {e}", {}, 0, 0.0])

    def poll(self) -> list[list]:
        """[room, ok, reason, metadata, nbytes, seconds] of every room this rank finished."""
        out, self._failed = self._failed, []
        out += [[r.room, r.ok, r.reason, r.metadata, r.nbytes, r.seconds] for r in self.engine.poll()]
        return out


def kv_layout(runner) -> KVLayout:
    pool, hf, par = runner.pool, runner.hf_config, get_parallel()
    return KVLayout(
        num_layers=pool.num_layers,
        page_size=pool.page_size,
        num_kv_heads_total=getattr(hf, "num_key_value_heads", None) or hf.num_attention_heads,
        head_dim=pool.head_dim,
        dtype=dtype_name(pool.dtype),
        tp_rank=par.tp_rank,
        tp_size=par.tp_size,
        model_name=os.path.basename(str(runner.model_path).rstrip("/")),
    )


def create_rank_transfer(disagg: DisaggConfig, runner, engine: EngineConfig) -> RankTransfer:
    """This rank's transfer engine. Prefill rank 0 serves the bootstrap; the other prefill ranks
    (on any node) register with it only after it is up (a barrier over the TP group orders them)."""
    par = get_parallel()
    rank0_host = engine.dist_init_addr.rsplit(":", 1)[0] if engine.nnodes > 1 else "127.0.0.1"

    def make() -> RankTransfer:
        layout = kv_layout(runner)
        if disagg.mode == "decode":
            receiver = KVReceiver(runner.pool.kv_buffer, layout, timeout_s=disagg.transfer_timeout,
                                  ib_device=disagg.ib_device)  # fmt: skip
            return RankTransfer(receiver)
        sender = KVSender(runner.pool.kv_buffer, layout, rank0_host, disagg.bootstrap_port,
                          host=disagg.transfer_host, timeout_s=disagg.transfer_timeout, ib_device=disagg.ib_device)  # fmt: skip
        return RankTransfer(sender)

    if par.tp_size == 1:
        return make()
    if par.tp_rank == 0:
        transfer = make()
        torch.distributed.barrier(group=par.cpu_group)
        return transfer
    torch.distributed.barrier(group=par.cpu_group)
    return make()


class WorkerTransferHook:
    """Runs on a worker rank after each plan: the plan's transfer operations, then the poll gather."""

    def __init__(self, transfer: RankTransfer):
        self.transfer = transfer

    def __call__(self, plan: dict) -> None:
        if "kv_ops" in plan:
            self.transfer.run(plan["kv_ops"])
            gather_to_rank0(self.transfer.poll())


def make_worker_hook(disagg: DisaggConfig, engine: EngineConfig, runner) -> WorkerTransferHook:
    die_with_parent()  # a worker rank of a server: gone when rank 0's process is
    return WorkerTransferHook(create_rank_transfer(disagg, runner, engine))


# ---- rank 0 -----------------------------------------------------------------------------------


class TransferWaker:
    """A file descriptor that turns readable when the transfer engine has results for poll().

    The scheduler loop blocks on its ZMQ socket and this fd together, so a finished room is
    handled at once rather than at the next tick of a sleep loop. A daemon thread waits on the
    engine (`wait()`), writes one byte, then waits until the scheduler has polled (`polled()`)
    before watching again: one wake-up per batch of results, never a spinning fd.
    """

    def __init__(self, engine: KVSender | KVReceiver):
        self.engine = engine
        self.fd, self._write_fd = os.pipe()
        os.set_blocking(self.fd, False)
        self._polled = threading.Event()
        self._polled.set()
        self._closed = False
        threading.Thread(target=self._run, name="disagg-transfer-waker", daemon=True).start()

    def _run(self) -> None:
        while not self._closed:
            self._polled.wait()
            if self.engine.wait(1.0) and not self._closed:
                self._polled.clear()
                os.write(self._write_fd, b"\0")

    def polled(self) -> None:
        """The scheduler just drained the engine's results: watch for the next ones."""
        self._polled.set()

    def drain(self) -> None:
        """Empty the fd (the scheduler loop calls this when the fd woke it)."""
        try:
            while os.read(self.fd, 4096):
                pass
        except BlockingIOError:
            pass

    def close(self) -> None:
        self._closed = True
        self._polled.set()


class TransferCoordinator:
    """Rank 0's view of the transfers: queue operations during a step, flush them once per step."""

    def __init__(self, local: RankTransfer, tp_size: int):
        self.local, self.tp_size = local, tp_size
        self.ops: list[list] = []
        self.open_rooms: set[int] = set()  # rooms given to the ranks and not finished on all of them
        self._partial: dict[int, dict[int, list]] = {}  # room -> tp rank -> its result
        # NOTE: only with tp 1 is rank 0's engine the whole story; with tp > 1 the scheduler polls
        self.waker = TransferWaker(local.engine) if tp_size == 1 and hasattr(local.engine, "wait") else None

    def idle_wait_ms(self, retrying: bool) -> int:
        """How long the scheduler loop may block while it has nothing to compute: requests waiting
        in a queue that is retried (the decode's prealloc, the prefill's bootstrap: what frees them
        is no transfer result) are looked at every POLL_MS; with only transfers in flight, a
        finished room wakes the loop (tp 1) or the loop polls (tp > 1)."""
        return IDLE_WAIT_MS if self.waker is not None and not retrying else POLL_MS

    def send(self, room: int, pages: list[int], page_offset: int, is_last: bool, metadata=None) -> None:
        self.open_rooms.add(room)
        self.ops.append(["send", room, list(pages), page_offset, is_last, metadata or {}])

    def expect(self, room: int, host: str, port: int, pages: list[int]) -> None:
        self.open_rooms.add(room)
        self.ops.append(["expect", room, host, port, list(pages)])

    def abort(self, room: int) -> None:
        if room in self.open_rooms:
            self.ops.append(["abort", room])

    def forget(self, room: int) -> None:
        """Stop waiting for `room` (its result will never come); aborts it on every rank."""
        self.abort(room)
        self.open_rooms.discard(room)
        self._partial.pop(room, None)

    def requested_rooms(self, rooms: list[int]) -> set[int]:
        """Rooms whose decode side has said where its pages are (prefill: read on rank 0's sender)."""
        sender = self.local.engine

        def asked() -> set[int]:
            # NOTE: KVSender keeps a room's destination requests in its room table, touched only on
            # its loop thread; read there
            return {r for r in rooms if (s := sender.rooms.get(r)) is not None and s.requests}

        return sender.ucx.run_sync(asked)

    def flush(self) -> list[TransferResult]:
        """Run the queued operations on every rank; the rooms now finished on all ranks."""
        ops, self.ops = self.ops, []
        if not ops and not self.open_rooms:
            return []
        if self.tp_size > 1:
            broadcast_plan({"kv_ops": ops})
        self.local.run(ops)
        mine = self.local.poll()
        if self.waker is not None:
            self.waker.polled()
        per_rank = gather_to_rank0(mine) if self.tp_size > 1 else [mine]
        return self._merge(per_rank)

    def _merge(self, per_rank: list[list[list]]) -> list[TransferResult]:
        for rank, results in enumerate(per_rank):
            for room, ok, reason, metadata, nbytes, seconds in results:
                if room not in self.open_rooms:
                    continue  # a stale room the peer asked about after we finished it
                got = self._partial.setdefault(room, {})
                got[rank] = [ok, reason, metadata, nbytes, seconds]
                if not ok and len(got) < self.tp_size:
                    self.abort(room)  # the other ranks stop waiting for a room that already failed
        done = []
        for room, got in list(self._partial.items()):
            if len(got) < self.tp_size:
                continue
            del self._partial[room]
            self.open_rooms.discard(room)
            failed = [r for r in got.values() if not r[0]]
            done.append(
                TransferResult(
                    room,
                    ok=not failed,
                    reason=failed[0][1] if failed else "",
                    metadata=got[0][2],
                    nbytes=sum(r[3] for r in got.values()),
                    seconds=max(r[4] for r in got.values()),
                )
            )
        return done


def transfer_metrics_text() -> str:
    """The transfer engine's Prometheus series of this process (the HTTP process appends them)."""
    from disagg.transfer import metrics as tm
    from prometheus_client import CollectorRegistry, disable_created_metrics, generate_latest

    disable_created_metrics()
    registry = CollectorRegistry()
    for metric in (
        tm.KV_TRANSFER_BYTES,
        tm.KV_TRANSFER_DURATION,
        tm.KV_TRANSFER_SPEED,
        tm.KV_TRANSFER_FAILURES,
    ):
        registry.register(metric)
    return generate_latest(registry).decode()


# ---- the scheduler process --------------------------------------------------------------------


def run_pd_scheduler_process(
    scheduler_cls,
    disagg: DisaggConfig,
    config: EngineConfig,
    ipc: IpcNames,
    ready_conn,
    log_level: str = "info",
) -> None:
    """Spawn target of a prefill/decode server: rank 0 (spawning the other local ranks), the
    role's scheduler with its transfer engine, then the scheduler loop."""
    run_scheduler_process(
        config, ipc, ready_conn, log_level,
        make_scheduler=lambda engine: scheduler_cls(engine, disagg),
        plan_hook_factory=functools.partial(make_worker_hook, disagg, config),
        name=f"{disagg.mode}-scheduler",
    )  # fmt: skip


def launch_role(mode: str, scheduler_cls, argv: list[str] | None = None) -> None:
    """`launch_prefill` / `launch_decode`: the server front end driving the role's scheduler."""
    import sys

    from disagg.common.config import add_engine_args
    from disagg.common.server.launch_server import ServerConfig, add_server_args, launch

    parser = argparse.ArgumentParser(
        prog=f"launch_{mode}", description=f"The {mode} server of a PD deployment"
    )
    add_engine_args(parser)
    add_server_args(parser)
    add_disagg_args(parser)
    parser.add_argument("--disaggregation-mode", choices=ROLES, default=mode, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=getattr(logging, args.log_level.upper()),
                        format=f"%(asctime)s [{mode}-http] %(levelname)s %(name)s: %(message)s")  # fmt: skip
    disagg = DisaggConfig.from_args(args, mode)
    engine = EngineConfig.from_args(args)
    if engine.node_rank != 0:  # a node other than 0 runs only its ranks (with their KV transfers)
        sys.exit(run_node(engine, functools.partial(make_worker_hook, disagg, engine)))
    target = functools.partial(run_pd_scheduler_process, scheduler_cls, disagg)
    info = {f"disaggregation_{k}": v for k, v in dataclasses.asdict(disagg).items()}
    try:
        launch(engine, ServerConfig.from_args(args), target, role=mode, extra_info=info)
    except RuntimeError as e:
        logger.error("%s", e)
        sys.exit(1)
