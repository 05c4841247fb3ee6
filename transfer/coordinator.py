"""The KV transfer of a TP group: rank 0 decides, every rank moves the KV heads of its own shard.

Rank 0's scheduler queues transfer operations during a step (`TransferCoordinator.send/expect/
abort`); `flush()` runs them on every rank (each rank's KVSender on prefill, KVReceiver on decode)
and merges the ranks' results: a room is finished once every rank reported it, and ok only if it
was ok on every rank. With tp > 1 the operations ride the plan broadcast as one `TransferOpsMsg`
and the results come back in one gather, so the worker ranks act on exactly what rank 0 decided.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

import torch
from disagg.common.engine.device_wait import drain
from disagg.common.messages import message
from disagg.common.models.decoder import is_mla
from disagg.common.parallel.ranks import broadcast_plan, gather_to_rank0
from disagg.common.parallel.state import get_parallel
from disagg.transfer import metrics
from disagg.transfer.base import TransferResult
from disagg.transfer.layout import KVLayout, dtype_name
from disagg.transfer.protocol import Room
from disagg.transfer.receiver import KVReceiver
from disagg.transfer.sender import KVSender

logger = logging.getLogger(__name__)

# NOTE: how long a scheduler with only transfers in flight blocks on its sockets before stepping again.
# With tp 1 a finished room wakes it at once (TransferWaker), so the timeout only bounds the wait;
# with tp > 1 the other ranks' results come only through the gather of the next step: poll.
IDLE_WAIT_MS = 100
POLL_MS = 2


# ---- the operations rank 0 sends to every rank ------------------------------------------------


@message
@dataclass
class SendPagesOp:
    """Prefill: send `pages` (the room's pages from `page_offset` on); the last one carries `metadata`."""

    room: Room
    pages: list[int]
    page_offset: int
    is_last: bool
    metadata: dict[str, Any] = field(default_factory=dict)
    fingerprint: int = 0  # the room's first send: the prompt's (protocol.prompt_fingerprint)
    dp_rank: int | None = None  # DP attention: only this DP rank's ranks hold the pages (None: every rank)


@message
@dataclass
class ExpectRoomOp:
    """Decode: `pages` are reserved for `room`; ask the prefill's bootstrap server for it."""

    room: Room
    bootstrap_host: str
    bootstrap_port: int
    pages: list[int]
    fingerprint: int = 0  # the prompt's (protocol.prompt_fingerprint)
    dp_rank: int | None = None  # DP attention: only this DP rank's ranks receive the room (None: every rank)


@message
@dataclass
class AbortRoomOp:
    room: Room
    dp_rank: int | None = None  # as the room's ExpectRoomOp


@message
@dataclass
class TransferOpsMsg:
    """One step's transfer operations, broadcast to the worker ranks (no forward in it)."""

    ops: list[SendPagesOp | ExpectRoomOp | AbortRoomOp]


def transfer_error(result: TransferResult) -> str:
    """The error a failed room ends its request with. A room two requests claimed is the clients'
    conflict (the HTTP layer answers 409); any other failure is the KV transfer's (5xx, retryable)."""
    if result.reason.startswith("conflict"):
        return f"bootstrap_room {result.room} is in use by another request ({result.reason})"
    return f"KV transfer failed: {result.reason}"


# ---- one rank ---------------------------------------------------------------------------------


class RankTransfer:
    """This rank's KVSender or KVReceiver; runs the operations rank 0 decided on this rank's shard."""

    def __init__(self, engine: KVSender | KVReceiver):
        self.engine = engine
        self._failed: list[TransferResult] = []  # operations the engine refused, reported as failed rooms

    def run(self, ops: list[SendPagesOp | ExpectRoomOp | AbortRoomOp]) -> None:
        my_dp_rank = get_parallel().attn_dp_rank
        for op in ops:
            if getattr(op, "dp_rank", None) not in (None, my_dp_rank):
                continue  # DP attention: a room of another DP rank (its pages are in that rank's pool)
            try:
                if isinstance(op, SendPagesOp):
                    self.engine.send(op.room, op.pages, op.page_offset, is_last=op.is_last, metadata=op.metadata,
                                     fingerprint=op.fingerprint)  # fmt: skip
                elif isinstance(op, ExpectRoomOp):
                    self.engine.expect(
                        op.room, op.bootstrap_host, op.bootstrap_port, op.pages, op.fingerprint
                    )
                else:
                    self.engine.abort(op.room)
            except Exception as e:  # noqa: BLE001 - a refused operation fails its room, never the rank
                logger.warning("transfer %s of room %s refused: %s", type(op).__name__, op.room, e)
                self._failed.append(TransferResult(op.room, ok=False, reason=f"bad_request: {e}"))

    def poll(self) -> list[TransferResult]:
        """Every room this rank finished since the last poll."""
        out, self._failed = self._failed, []
        return out + self.engine.poll()


def kv_layout(runner) -> KVLayout:
    """The KV layout of this rank's pool (what the two sides of a transfer compare)."""
    pool, hf, par = runner.pool, runner.hf_config, get_parallel()
    layers = runner.layer_range  # a pipeline stage's pool: its layers only
    # NOTE: under DP attention a pool holds its DP rank's requests with KV heads split over the
    # attention group only: to a prefill, each DP rank looks like a decode server of attn_tp_size
    # ranks (the connection tells them apart, as for --dp-size replicas)
    return KVLayout(
        num_layers=hf.num_hidden_layers,
        page_size=pool.page_size,
        # MLA: one latent per token, the same on every rank (a decode rank takes it from any prefill rank)
        num_kv_heads_total=1
        if is_mla(hf)
        else getattr(hf, "num_key_value_heads", None) or hf.num_attention_heads,
        head_dim=pool.head_dim,
        dtype=dtype_name(pool.dtype),
        tp_rank=par.attn_tp_rank,
        tp_size=par.attn_tp_size,
        model_name=os.path.basename(str(runner.model_path).rstrip("/")),
        model_fingerprint=runner.fingerprint,
        pp_rank=par.pp_rank,
        pp_size=par.pp_size,
        layer_start=layers[0],
        layer_end=layers[1],
        kv_kind="mla" if is_mla(hf) else "mha",
    )


def create_on_every_rank(make) -> RankTransfer:
    """`make()` on this rank, rank 0 first: prefill rank 0 serves the bootstrap the other ranks
    (on any node) register with, so they make theirs only after it is up (a barrier orders them)."""
    par = get_parallel()
    if par.world_size == 1:
        return make()
    if par.rank == 0:
        transfer = make()
        torch.distributed.barrier(group=par.cpu_group)
        return transfer
    torch.distributed.barrier(group=par.cpu_group)
    return make()


class WorkerTransferHook:
    """Runs on a worker rank for each broadcast message without a forward: the transfer
    operations, then the poll gather."""

    def __init__(self, transfer: RankTransfer):
        self.transfer = transfer

    def __call__(self, msg: Any) -> None:
        if isinstance(msg, TransferOpsMsg):
            self.transfer.run(msg.ops)
            gather_to_rank0(self.transfer.poll())


# ---- rank 0 -----------------------------------------------------------------------------------


class TransferWaker:
    """A file descriptor that turns readable when the transfer engine has results for poll().

    The scheduler loop blocks on its ZMQ socket and this fd together (and a step's wait for the
    device on this fd alone: common/engine/device_wait.py), so a finished room is handled at once
    rather than at the next tick of a sleep loop. The engine's loop thread writes the byte itself
    as the first result after a poll() lands (`TransferBase.notify_fd`): one wake-up per batch of
    results, never a spinning fd, and no thread hop between the result and the scheduler.
    """

    def __init__(self, engine: KVSender | KVReceiver):
        # NOTE: never closed: the engine's loop thread may write until the process ends
        self.fd, self._write_fd = os.pipe()
        os.set_blocking(self.fd, False)
        os.set_blocking(self._write_fd, False)
        engine.notify_fd = self._write_fd

    def drain(self) -> None:
        """Empty the fd (the scheduler loop calls this when the fd woke it)."""
        drain(self.fd)


class TransferCoordinator:
    """Rank 0's view of the transfers: queue operations during a step, flush them once per step."""

    def __init__(self, local: RankTransfer, tp_size: int):
        self.local, self.tp_size = local, tp_size
        self.ops: list[SendPagesOp | ExpectRoomOp | AbortRoomOp] = []
        self.open_rooms: set[Room] = set()  # rooms given to the ranks and not finished on all of them
        self._partial: dict[Room, dict[int, TransferResult]] = {}  # room -> tp rank -> its result
        self.dp_ranks: dict[Room, int] = {}  # DP attention: open room -> the DP rank receiving or sending it
        self.ranks_per_dp = tp_size // get_parallel().attn_dp_size
        # NOTE: only with tp 1 is rank 0's engine the whole story; with tp > 1 the scheduler polls
        self.waker = TransferWaker(local.engine) if tp_size == 1 else None

    @property
    def layout(self) -> KVLayout:
        """Rank 0's KV layout (its identity() is what a peer must match)."""
        return self.local.engine.layout

    @property
    def wake_fd(self) -> int | None:
        """An fd that turns readable when a room finished (None: the scheduler polls)."""
        return None if self.waker is None else self.waker.fd

    def on_wake(self) -> None:
        if self.waker is not None:
            self.waker.drain()

    def idle_wait_ms(self, retrying: bool) -> int:
        """How long the scheduler loop may block while it has nothing to compute: requests waiting
        in a queue that is retried (the decode's prealloc, the prefill's bootstrap: what frees them
        is no transfer result) are looked at every POLL_MS; with only transfers in flight, a
        finished room wakes the loop (tp 1) or the loop polls (tp > 1)."""
        return IDLE_WAIT_MS if self.waker is not None and not retrying else POLL_MS

    def send(self, room: Room, pages: list[int], page_offset: int, is_last: bool, metadata=None,
             fingerprint: int = 0, dp_rank: int | None = None) -> None:  # fmt: skip
        self.open_rooms.add(room)
        if dp_rank is not None:
            self.dp_ranks[room] = dp_rank
        self.ops.append(
            SendPagesOp(room, list(pages), page_offset, is_last, metadata or {}, fingerprint, dp_rank)
        )

    def expect(self, room: Room, host: str, port: int, pages: list[int], fingerprint: int = 0,
               dp_rank: int | None = None) -> None:  # fmt: skip
        self.open_rooms.add(room)
        if dp_rank is not None:
            self.dp_ranks[room] = dp_rank
        self.ops.append(ExpectRoomOp(room, host, port, list(pages), fingerprint, dp_rank))

    def abort(self, room: Room) -> None:
        if room in self.open_rooms:
            self.ops.append(AbortRoomOp(room, self.dp_ranks.get(room)))

    def forget(self, room: Room) -> None:
        """Stop waiting for `room` (its result will never come); aborts it on every rank."""
        self.abort(room)
        self.open_rooms.discard(room)
        self._partial.pop(room, None)
        self.dp_ranks.pop(room, None)

    def _ranks_of(self, room: Room) -> range:
        """The ranks that report `room`: every rank, or under DP attention its DP rank's."""
        d = self.dp_ranks.get(room)
        if d is None:
            return range(self.tp_size)
        return range(d * self.ranks_per_dp, (d + 1) * self.ranks_per_dp)

    def requested_rooms(self, rooms: list[Room]) -> set[Room]:
        """Prefill: the rooms whose decode side has said where its pages are."""
        return self.local.engine.requested_rooms(rooms)

    def metrics_text(self) -> str:
        return metrics.metrics_text()

    def flush(self) -> list[TransferResult]:
        """Run the queued operations on every rank; the rooms now finished on all ranks."""
        ops, self.ops = self.ops, []
        if not ops and not self.open_rooms:
            return []
        if self.tp_size > 1:
            broadcast_plan(TransferOpsMsg(ops))
        self.local.run(ops)
        mine = self.local.poll()
        per_rank = gather_to_rank0(mine) if self.tp_size > 1 else [mine]
        return self._merge(per_rank)

    def _merge(self, per_rank: list[list[TransferResult]]) -> list[TransferResult]:
        for rank, results in enumerate(per_rank):
            for result in results:
                if result.room not in self.open_rooms or rank not in self._ranks_of(result.room):
                    continue  # a stale room the peer asked about after we finished it
                got = self._partial.setdefault(result.room, {})
                got[rank] = result
                if not result.ok and len(got) < len(self._ranks_of(result.room)):
                    self.abort(result.room)  # the other ranks stop waiting for a room that already failed
        done = []
        for room, got in list(self._partial.items()):
            if len(got) < len(self._ranks_of(room)):
                continue
            del self._partial[room]
            self.open_rooms.discard(room)
            self.dp_ranks.pop(room, None)
            failed = [r for r in got.values() if not r.ok]
            done.append(
                TransferResult(
                    room,
                    ok=not failed,
                    reason=failed[0].reason if failed else "",
                    metadata=got[min(got)].metadata,
                    nbytes=sum(r.nbytes for r in got.values()),
                    seconds=max(r.seconds for r in got.values()),
                    ready_at=got[min(got)].ready_at,  # this host's clock (rank 0's, not another node's)
                )
            )
        return done


class DPRankTransfer:
    """DP attention (decode or prefill): one DP rank's handle on the `TransferCoordinator` its
    server's DP ranks share, with the coordinator's interface for that DP rank's scheduler. Its rooms
    are received (decode) or sent (prefill) by its DP rank's ranks only; the DP scheduler flushes the
    coordinator once per step and `deliver`s the results, so `flush` returns this DP rank's rooms
    among them."""

    def __init__(self, coordinator: TransferCoordinator, dp_rank: int):
        self.coordinator, self.dp_rank = coordinator, dp_rank
        self.open_rooms: set[Room] = set()  # this DP rank's rooms not finished yet
        self._done: list[TransferResult] = []

    @property
    def layout(self) -> KVLayout:
        return self.coordinator.layout

    wake_fd = None  # tp > 1: the scheduler polls

    def on_wake(self) -> None:
        pass

    def idle_wait_ms(self, retrying: bool) -> int:
        return self.coordinator.idle_wait_ms(retrying)

    def expect(self, room: Room, host: str, port: int, pages: list[int], fingerprint: int = 0) -> None:
        self.open_rooms.add(room)
        self.coordinator.expect(room, host, port, pages, fingerprint, dp_rank=self.dp_rank)

    def send(self, room: Room, pages: list[int], page_offset: int, is_last: bool, metadata=None,
             fingerprint: int = 0) -> None:  # fmt: skip
        self.open_rooms.add(room)
        self.coordinator.send(room, pages, page_offset, is_last, metadata, fingerprint, dp_rank=self.dp_rank)

    def requested_rooms(self, rooms: list[Room]) -> set[Room]:
        """Prefill: the rooms whose decode side has said where its pages are. Only rank 0's sender
        can be asked, and it is DP rank 0's: another DP rank's rooms count as asked for.
        NOTE: so those start at once even under pool pressure (`PrefillScheduler._may_start_now`);
        their chunks wait in the sender until the decode asks, and the room timeout frees them."""
        return self.coordinator.requested_rooms(rooms) if self.dp_rank == 0 else set(rooms)

    def abort(self, room: Room) -> None:
        self.coordinator.abort(room)

    def forget(self, room: Room) -> None:
        self.open_rooms.discard(room)
        self.coordinator.forget(room)

    def metrics_text(self) -> str:
        return self.coordinator.metrics_text()

    def deliver(self, results: list[TransferResult]) -> None:
        """Keep the results of this DP rank's rooms for the next flush()."""
        for result in results:
            if result.room in self.open_rooms:
                self.open_rooms.discard(result.room)
                self._done.append(result)

    def flush(self) -> list[TransferResult]:
        done, self._done = self._done, []
        return done
