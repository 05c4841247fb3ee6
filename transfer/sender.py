"""KVSender: the prefill side. One per prefill TP rank.

    sender = KVSender(kv_buffer, layout, bootstrap_host, bootstrap_port)   # rank 0 serves bootstrap
    sender.send(room, src_pages, page_offset=0, is_last=False)             # after each prefill chunk
    sender.send(room, last_pages, page_offset=k, is_last=True, metadata={"first_token": t})
    for r in sender.poll(): free r.room's pages (r.ok or not)

send() returns at once; chunks wait until every decode rank of the room has said where its pages
are, then each chunk travels as one UCX message per destination decode rank: the chunk's pages
(and, with heterogeneous TP, the destination's KV-head slice) gathered into one staging buffer.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from disagg.common.engine.device_wait import host_to_device
from disagg.transfer import metrics, page_copy
from disagg.transfer.base import (
    RoomState,
    Tombstone,
    TransferBase,
    TransferResult,
    chunk_nbytes,
    gather_pages,
    trace,
    wide_pages,
)
from disagg.transfer.bootstrap import BootstrapServer, register_prefill_rank
from disagg.transfer.direct import copy_pages, open_pool
from disagg.transfer.layout import HeadSlice, KVLayout, KVLayoutMismatchError, plan_head_slices
from disagg.transfer.protocol import (
    HelloAckMsg,
    HelloMsg,
    KVChunkMsg,
    RegisterPrefillRankMsg,
    Room,
    RoomAckMsg,
    RoomDoneMsg,
    RoomFailedMsg,
    RoomReleasedMsg,
    RoomRequestMsg,
)
from disagg.transfer.ucx import Peer, control_frame

logger = logging.getLogger(__name__)


@dataclass
class _Chunk:
    pages: torch.Tensor  # [num_pages] int64 source page indices, on the kv_buffer's device
    page_offset: int
    ready: torch.cuda.Event | None  # recorded after the prefill forward that wrote the pages


@dataclass
class _Slice:
    """One piece's bytes for one decode rank: its header is out and its data follows on `tag`,
    or (`inline`) the header has yet to go, with the data behind it in the same message."""

    peer: Peer
    target: HeadSlice
    tag: int
    nbytes: int
    inline: KVChunkMsg | None = None


@dataclass
class _SendRoom(RoomState):
    queued: list[_Chunk] = field(default_factory=list)
    requests: dict[int, tuple[Peer, RoomRequestMsg]] = field(default_factory=dict)  # decode rank ->
    targets: list[HeadSlice] | None = None  # known once the first request tells the decode TP size
    is_last: bool = False
    metadata: dict[str, Any] = field(default_factory=dict)
    chunks_planned: dict[int, int] = field(default_factory=dict)  # decode rank -> chunks started
    done_sent: bool = False
    acked: set[int] = field(default_factory=set)
    fingerprint: int = 0  # the prefill request's prompt_fingerprint (0: not known yet / not checked)
    first_send: float | None = None  # perf_counter of the first send(): the wait for the request starts
    dst_pages: dict[int, torch.Tensor] = field(default_factory=dict)  # direct decode rank -> its pages (host)


REPLICA_REGISTER_TIMEOUT_S = 300.0  # a replica's wait for replica 0's bootstrap server (its start-up)


def default_max_message_bytes(device: torch.device | str) -> int:
    """Chunks larger than this travel as several pipelined messages. On GPU fewer, larger messages
    won (2xH200: 128 MiB beat 32 MiB, which beat 8 MiB: each message costs fixed Python/UCX time);
    on the CPU smaller pieces let the gather of the next overlap the send of this one."""
    return (128 << 20) if torch.device(device).type == "cuda" else (32 << 20)


def default_host() -> str:
    """This machine's address as other hosts see it (the route to the outside world)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 1))
            return s.getsockname()[0]
        except OSError:
            return "127.0.0.1"


class KVSender(TransferBase):
    role = "prefill"

    def __init__(
        self,
        kv_buffer: torch.Tensor,
        layout: KVLayout,
        bootstrap_host: str,
        bootstrap_port: int,
        serve_bootstrap: bool | None = None,  # default: rank 0 (of DP rank 0) serves it
        host: str | None = None,  # address decode ranks reach this rank's UCX listener at
        timeout_s: float = 30.0,
        heartbeat_s: float = 1.0,
        heartbeat_timeout_s: float = 5.0,
        ib_device: str | None = None,  # --disaggregation-ib-device (e.g. "mlx5_0")
        max_message_bytes: int | None = None,  # default: default_max_message_bytes(device)
        dp_rank: int = 0,  # --dp-size replicas of the prefill server: this rank's replica, of dp_size
        dp_size: int = 1,
    ) -> None:
        super().__init__(kv_buffer, layout, timeout_s, heartbeat_s, heartbeat_timeout_s, ib_device)
        self.max_message_bytes = max_message_bytes or default_max_message_bytes(self.device)
        if self.device.type == "cuda":  # the direct copy's kernel is built and checked now, not in a request
            page_copy.check(self.device)
        self._draining: set[Room] = set()  # finished rooms whose copies still run
        self.bootstrap: BootstrapServer | None = None
        if serve_bootstrap if serve_bootstrap is not None else layout.rank == dp_rank == 0:
            self.bootstrap = BootstrapServer(port=bootstrap_port)
            bootstrap_port = self.bootstrap.port
        self.bootstrap_port = bootstrap_port
        self._listener = self.ucx.run_sync(self._listen)
        self.host = host or default_host()
        self.port = self._listener.port
        info = RegisterPrefillRankMsg(layout, self.host, self.port, dp_rank, dp_size)
        # NOTE: a bootstrap served elsewhere may come up after this rank (the request waits in ZMQ's
        # queue until it does); --dp-size replicas' controller serves it before they start
        register_prefill_rank(
            bootstrap_host, bootstrap_port, info, 10.0 if dp_rank == 0 else REPLICA_REGISTER_TIMEOUT_S
        )

    # ---- thread-safe API ----
    def requested_rooms(self, rooms: list[Room]) -> set[Room]:
        """Those of `rooms` whose decode side has said where its pages are."""

        def asked() -> set[Room]:  # NOTE: the room table is touched only on the loop thread
            return {r for r in rooms if (s := self.rooms.get(r)) is not None and s.requests}

        return self.ucx.run_sync(asked)

    def send(
        self,
        room: Room,
        src_pages: torch.Tensor | list[int],
        page_offset: int = 0,
        is_last: bool = False,
        metadata: dict[str, Any] | None = None,
        fingerprint: int = 0,
    ) -> None:
        """Queue a chunk of `room`: src_pages land in the decode pages [page_offset, page_offset + n).
        `fingerprint` (the first send of a room): the prompt's, which every decode request for the
        room must match.

        Non-blocking. On CUDA the gather waits for the work queued so far on the kv_buffer device's
        current stream, so call it right after launching the forward that wrote these pages.
        """
        trace(room, "send")
        # no wait for the forward just launched (device_wait.host_to_device)
        pages = host_to_device(torch.as_tensor(src_pages, dtype=torch.int64), self.device)
        ready = None
        if self.device.type == "cuda":
            # NOTE: on the pool's device, where the forward and the index copy above run, even when
            # the calling thread's current device is another one
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(self.device))
        chunk = _Chunk(pages, page_offset, ready)
        self.ucx.call_soon(self._on_send, room, chunk, is_last, metadata or {}, fingerprint)

    # ---- loop thread ----
    def _listen(self) -> Any:
        import ucxx

        return ucxx.create_listener(self._on_connect)

    async def _on_connect(self, ep: Any) -> None:
        peer = Peer(
            ep, "decode?", self._on_message, self._on_peer_close, self.heartbeat_s, self.heartbeat_timeout_s
        )
        try:
            hello = await peer.recv_msg(timeout=10)
            if not isinstance(hello, HelloMsg):
                raise KVLayoutMismatchError(f"expected HelloMsg, got {type(hello).__name__}")
            self.layout.check_compatible(hello.layout)
            plan_head_slices(self.layout.tp_size, hello.layout.tp_size, self.layout.num_kv_heads_total)
            peer.direct_pool = open_pool(hello.direct, self.kv_buffer)
        except Exception as e:  # noqa: BLE001 - refuse this peer with a reason it can show
            logger.warning("refusing decode peer: %s", e)
            try:
                await peer.send_msg(HelloAckMsg(error=f"incompatible: {e}"))
                await asyncio.sleep(0.5)  # let the refusal arrive before the endpoint goes
            finally:
                ep.abort()
            return
        peer.name, peer.info = f"decode rank {hello.layout.tp_rank}", hello.layout
        await peer.send_msg(HelloAckMsg(direct=peer.direct_pool is not None))
        self.peers.add(peer)
        peer.start()

    def _on_peer_close(self, peer: Peer, reason: str) -> None:
        self.peers.discard(peer)
        self._fail_rooms_of(peer, reason)

    def _depends_on(self, state: _SendRoom, peer: Peer) -> bool:
        if state.targets is None:
            return peer in state.peers
        # a decode rank that already acked (or gets nothing from this rank) is not needed any more
        if peer.info.tp_rank not in {t.decode_rank for t in state.targets} - state.acked:
            return False
        # NOTE: rank numbers repeat across decode servers: a peer of another server with the same
        # rank (one that did not ask for this room while this rank's peer did) is not this room's
        return peer in state.peers or all(p.info.tp_rank != peer.info.tp_rank for p in state.peers)

    def _room(self, room: Room) -> _SendRoom:
        state = self.rooms.get(room)
        if state is None:
            state = self.rooms[room] = _SendRoom(room, deadline=self._new_deadline())
        self._touch(state)
        return state

    def _on_send(
        self, room: Room, chunk: _Chunk, is_last: bool, metadata: dict[str, Any], fingerprint: int
    ) -> None:
        trace(room, "on_send")
        tomb = self._tombstones.get(room)
        if tomb is not None and room not in self.rooms:
            if not tomb.reported:  # decode failed the room before its first chunk: report it now
                tomb.reported = True
                self._fail(self._room(room), tomb.reason, notify=False)
            elif fingerprint:  # a new request reusing a room that ended here: refuse it, report it
                self._fail(self._room(room), f"conflict: room {room} was already used by an earlier request",
                           notify=False)  # fmt: skip
            return  # otherwise (a late chunk of the room's own request) its result was reported already
        state = self._room(room)
        if state.is_last:
            self._fail(state, f"bad_request: chunk after the last chunk of room {room}")
            return
        if fingerprint and not state.fingerprint:
            state.fingerprint = fingerprint
            if self._refuse_foreign_requests(state):
                return
        state.queued.append(chunk)
        state.first_send = state.first_send or time.perf_counter()
        state.is_last, state.metadata = is_last, metadata
        self._pump(state)

    def _on_message(self, peer: Peer, msg: Any, payload: Any = None) -> None:
        room = getattr(msg, "room", None)
        tomb = self._tombstones.get(room)
        if tomb is not None and room not in self.rooms:
            # a rank that already had this room asks again: a new request reusing it (a rank this
            # prefill rank sends nothing to may ask after the room completed: ignore that one)
            if isinstance(msg, RoomRequestMsg) and (not tomb.ok or msg.decode_rank in tomb.served):
                reason = (
                    tomb.reason
                    if not tomb.ok
                    else f"conflict: room {room} already completed for another request"
                )
                peer.post_msg(RoomFailedMsg(room, reason))
                self._release(peer, room)  # never wrote these pages (the request came too late)
            elif isinstance(msg, RoomFailedMsg):
                self._release(peer, room)
            return
        if isinstance(msg, RoomFailedMsg) and room not in self.rooms:
            # failed on the decode side before the first send(): send() will report it
            self._tombstones[room] = Tombstone(False, msg.reason, self._tombstone_expiry(), reported=False)
            self._release(peer, room)
            return
        if isinstance(msg, RoomRequestMsg):
            self._on_request(peer, msg)
        elif isinstance(msg, RoomAckMsg) and room in self.rooms:
            self._on_ack(peer, self.rooms[room])
        elif isinstance(msg, RoomFailedMsg) and room in self.rooms:
            self._fail(self.rooms[room], msg.reason, skip=peer)
        else:
            logger.warning("ignoring %s from %s", msg, peer.name)

    def _on_request(self, peer: Peer, msg: RoomRequestMsg) -> None:
        state = self._room(msg.room)
        if state.targets is None:
            plan = plan_head_slices(self.layout.tp_size, msg.decode_tp, self.layout.num_kv_heads_total)
            state.targets = [s for s in plan if s.prefill_rank == self.layout.tp_rank]
        state.requests[msg.decode_rank] = (peer, msg)
        state.peers.append(peer)
        if peer.direct_pool is not None and (error := self._take_dst_pages(state, peer, msg)):
            self._fail(state, error)
            return
        if not self._refuse_foreign_requests(state):
            self._pump(state)

    def _take_dst_pages(self, state: _SendRoom, peer: Peer, msg: RoomRequestMsg) -> str:
        """A direct decode rank's pages, checked: a bad index would write outside its pool (on CUDA
        a device-side assert that kills this process)."""
        pages = msg.dst_pages
        n_pool = peer.direct_pool.shape[1]
        if len(pages) != msg.num_pages or any(not 0 <= p < n_pool for p in pages):
            return (
                f"bad_request: room {msg.room}: the decode's pages are not {msg.num_pages} pages of its pool"
            )
        # NOTE: kept on the host; each copy moves its slice to the device on the transfer stream, so
        # the kernel that indexes with it is ordered after it (a copy on another stream was not:
        # garbage indices, a device-side assert)
        state.dst_pages[msg.decode_rank] = torch.tensor(pages, dtype=torch.int64)
        return ""

    def _release(self, peer: Peer, room: Room) -> None:
        """Tell a direct decode rank that no copy will write `room`'s pages any more."""
        if peer.direct_pool is not None and room not in self._draining:
            peer.post_msg(RoomReleasedMsg(room))

    def _finish(self, state: _SendRoom, result: TransferResult) -> None:
        if state.busy:
            self._draining.add(state.room)  # copies still running: released once they end
        super()._finish(state, result)

    def _report_when_idle(self, state: _SendRoom) -> None:
        failed = state.result is not None and not state.result.ok and state.busy == 0
        super()._report_when_idle(state)
        if state.busy == 0:
            self._draining.discard(state.room)
        if failed:  # no copy of the room runs any more: direct decode ranks may reuse its pages
            for peer, _ in state.requests.values():
                self._release(peer, state.room)

    def _refuse_foreign_requests(self, state: _SendRoom) -> bool:
        """Fail the room (both sides, before any page moves) if a decode request for it is for
        another prompt than the prefill's: two clients' requests crossed on one room id."""
        if state.fingerprint and any(m.fingerprint and m.fingerprint != state.fingerprint
                                     for _, m in state.requests.values()):  # fmt: skip
            self._fail(state, f"conflict: room {state.room} is bound to another request (the prompts differ)")
            return True
        return False

    def _on_ack(self, peer: Peer, state: _SendRoom) -> None:
        trace(state.room, "ack_in")
        self._touch(state)
        state.acked.add(peer.info.tp_rank)
        if state.targets is not None and state.acked >= {t.decode_rank for t in state.targets}:
            self._finish(state, _ok(state))

    def _pump(self, state: _SendRoom) -> None:
        """Start every queued chunk once its destinations are known; the last piece's header says done."""
        if state.finished or state.targets is None:
            return
        if any(t.decode_rank not in state.requests for t in state.targets):
            return  # a destination decode rank has not said where its pages are yet
        for chunk in state.queued:
            if error := self._check_chunk(state, chunk):
                self._fail(state, error)
                return
        if state.queued and state.started is None and state.first_send is not None:
            metrics.observe_step(self.role, "wait_request", time.perf_counter() - state.first_send)
        chunks = [c for c in state.queued if len(c.pages)]
        state.queued.clear()
        pieces = [p for c in chunks for p in self._split(c)]
        done = state.is_last and not state.done_sent
        direct = [t for t in state.targets if state.requests[t.decode_rank][0].direct_pool is not None]
        over_ucx = [t for t in state.targets if t not in direct]
        # a local decode rank: each chunk copied straight into its pages, then one header (no staging)
        for t in direct:
            for i, c in enumerate(chunks):
                self._start_direct(state, c, t, done and i == len(chunks) - 1)
        # every header first, then the gathers: the decode posts all its receives while we gather
        last = len(pieces) - 1
        slices = [
            [self._announce(state, p, t, done and i == last) for t in over_ucx] for i, p in enumerate(pieces)
        ]
        for piece, piece_slices in zip(pieces, slices, strict=True):
            for s in piece_slices:
                self._start_slice(state, piece, s)
        if done:
            state.done_sent = True
            if not pieces:  # no piece left to carry the done (an empty last chunk): a message of its own
                for t in state.targets:
                    done_msg = RoomDoneMsg(
                        state.room, state.chunks_planned.get(t.decode_rank, 0), state.metadata
                    )
                    state.requests[t.decode_rank][0].post_msg(done_msg)
            if not state.targets:  # this rank holds no heads any decode rank needs
                self._finish(state, _ok(state))

    def _announce(self, state: _SendRoom, piece: _Chunk, target: HeadSlice, done: bool) -> _Slice:
        """Post a piece's header before its gather, so the decode posts its receive meanwhile.

        The last piece's header also carries the room's done (chunk count, metadata): no separate
        RoomDoneMsg, no extra hop after the data.
        """
        peer = state.requests[target.decode_rank][0]
        num_chunks = state.chunks_planned[target.decode_rank] = (
            state.chunks_planned.get(target.decode_rank, 0) + 1
        )
        nbytes = chunk_nbytes(self.layout, len(piece.pages), target.end - target.start)
        tag = peer.new_tag()
        msg = KVChunkMsg(state.room, piece.page_offset, len(piece.pages), target.start, target.end, nbytes, tag,
                         num_chunks if done else 0, state.metadata if done else {})  # fmt: skip
        if nbytes <= self.inline_data_bytes:
            # small host chunk: header and bytes travel as one control message after the gather
            state.busy += 1
            state.started = state.started or time.perf_counter()
            return _Slice(peer, target, tag, nbytes, inline=msg)
        trace(state.room, "header_out")
        peer.post_msg(msg)
        # NOTE: the room stays busy from the header to the end of the gather: once the header is
        # out the bytes must follow, and they must come from pages nobody reused (a failed room
        # is reported, and its pages freed, only when busy drops to 0)
        state.busy += 1
        state.started = state.started or time.perf_counter()
        return _Slice(peer, target, tag, nbytes)

    def _start_direct(self, state: _SendRoom, chunk: _Chunk, target: HeadSlice, done: bool) -> None:
        peer = state.requests[target.decode_rank][0]
        num_chunks = state.chunks_planned[target.decode_rank] = (
            state.chunks_planned.get(target.decode_rank, 0) + 1
        )
        nbytes = chunk_nbytes(self.layout, len(chunk.pages), target.end - target.start)
        msg = KVChunkMsg(state.room, chunk.page_offset, len(chunk.pages), target.start, target.end, nbytes, 0,
                         num_chunks if done else 0, state.metadata if done else {}, direct=True)  # fmt: skip
        # NOTE: busy from now until the copy is over: a failed room is released (its decode pages
        # reusable) only then
        state.busy += 1
        state.started = state.started or time.perf_counter()
        asyncio.ensure_future(self._copy_direct(state, chunk, target, peer, msg))

    async def _copy_direct(
        self, state: _SendRoom, chunk: _Chunk, target: HeadSlice, peer: Peer, msg: KVChunkMsg
    ) -> None:
        try:
            # NOTE: a peer silent for longer than its heartbeat timeout may have given up on us
            # (e.g. this process was stopped and just resumed) and reused the pages: never write then
            if state.finished or peer.closed or time.monotonic() - peer.last_seen > self.heartbeat_timeout_s:
                if not state.finished:
                    self._fail(state, f"peer_died: {peer.name} silent before the copy of room {state.room}")
                return
            lo, remote_lo = self.layout.head_range[0], peer.info.head_range[0]
            dst_pages = state.dst_pages[target.decode_rank][msg.page_offset : msg.page_offset + msg.num_pages]
            layers = self.layout.layer_range  # a pipeline stage writes its layers of the decode's pool
            dst = peer.direct_pool[layers[0] : layers[1]]

            def copy() -> None:
                dst_idx = dst_pages.to(dst.device, non_blocking=dst.is_cuda)
                copy_pages(self.kv_buffer, chunk.pages, (target.start - lo, target.end - lo),
                           dst, dst_idx, (target.start - remote_lo, target.end - remote_lo))  # fmt: skip
                if dst.device != self.device:  # the scatter ran on the peer GPU's stream: wait for it too
                    landed = torch.cuda.Event()
                    landed.record(torch.cuda.current_stream(dst.device))
                    torch.cuda.current_stream().wait_event(landed)

            trace(state.room, "copy_start")
            await self._run_copy(state, copy, msg.nbytes, "copy", chunk.ready)
        except Exception as e:  # noqa: BLE001 - e.g. a source page outside the pool
            self._fail(state, f"bad_request: copying room {state.room}: {type(e).__name__}: {e}")
            return
        finally:
            state.busy -= 1  # taken by _start_direct
            self._report_when_idle(state)
        trace(state.room, "copied")
        if not state.finished:
            peer.post_msg(msg)
            state.nbytes += msg.nbytes
            self._touch(state)

    def _check_chunk(self, state: _SendRoom, chunk: _Chunk) -> str:
        for t in state.targets or []:
            n_dst = state.requests[t.decode_rank][1].num_pages
            if chunk.page_offset < 0 or chunk.page_offset + len(chunk.pages) > n_dst:
                return f"bad_request: pages [{chunk.page_offset}, +{len(chunk.pages)}) beyond the {n_dst} decode pages"
        return ""

    def _split(self, chunk: _Chunk) -> list[_Chunk]:
        """Pieces of at most max_message_bytes: gathering piece k+1 overlaps sending piece k."""
        per_page = chunk_nbytes(self.layout, 1, self.layout.num_local_heads)
        step = max(1, self.max_message_bytes // per_page)
        return [
            _Chunk(chunk.pages[i : i + step], chunk.page_offset + i, chunk.ready)
            for i in range(0, len(chunk.pages), step)
        ]

    def _start_slice(self, state: _SendRoom, chunk: _Chunk, s: _Slice) -> None:
        """Gather a slice and send it: an inline one right here (no task hop before its bytes go
        out), a large one in a task (its gather may take a worker thread or a device sync)."""
        if s.inline is None:
            asyncio.ensure_future(self._send_slice(state, chunk, s))
            return
        head, offset = control_frame(s.inline, s.nbytes)
        frame = self._staging(offset + s.nbytes)
        try:
            frame[: len(head)].numpy()[:] = np.frombuffer(head, dtype=np.uint8)
            self._gather_fn(chunk, s, frame[offset:])()
        except Exception as e:  # noqa: BLE001 - e.g. a source page outside the pool
            self._fail(state, f"bad_request: gathering room {state.room}: {type(e).__name__}: {e}")
            return
        finally:
            state.busy -= 1  # taken by _announce
            self._report_when_idle(state)
        trace(state.room, "gathered")
        asyncio.ensure_future(self._send_bytes(state, s, frame))

    async def _send_slice(self, state: _SendRoom, chunk: _Chunk, s: _Slice) -> None:
        staging = self._staging(s.nbytes)
        try:
            await self._run_copy(state, self._gather_fn(chunk, s, staging), s.nbytes, "gather", chunk.ready)
        except Exception as e:  # noqa: BLE001
            self._fail(state, f"bad_request: gathering room {state.room}: {type(e).__name__}: {e}")
            return
        finally:
            state.busy -= 1  # taken by _announce
            self._report_when_idle(state)
        trace(state.room, "gathered")
        await self._send_bytes(state, s, staging)

    def _gather_fn(self, chunk: _Chunk, s: _Slice, staging: torch.Tensor) -> Callable[[], None]:
        """Copy the chunk's pages (the slice's KV heads) into staging, in KVChunkMsg order."""
        lo = self.layout.head_range[0]
        num_pages, num_heads = len(chunk.pages), s.target.end - s.target.start

        def gather() -> None:
            src = self.kv_buffer[:, :, :, :, s.target.start - lo : s.target.end - lo]
            whole = num_heads == self.layout.num_local_heads
            out = wide_pages(self._typed(staging, num_pages, num_heads), whole)
            gather_pages(wide_pages(src, whole), chunk.pages, out)

        return gather

    async def _send_bytes(self, state: _SendRoom, s: _Slice, buf: torch.Tensor) -> None:
        """Send a gathered slice (an inline one: its whole control frame), even for a room failed
        meanwhile: the decode drops it."""
        start = time.perf_counter()
        try:
            if s.inline is not None:
                await s.peer.send_frame(buf)
            else:
                await s.peer.send_data(buf, s.tag)
            metrics.observe_step(self.role, "send", time.perf_counter() - start)
        except Exception as e:  # noqa: BLE001 - UCX error: the decode rank is gone
            self._fail(state, f"peer_died: sending room {state.room}: {type(e).__name__}: {e}")
            return
        self._release_staging(buf)
        if not state.finished:
            state.nbytes += s.nbytes
            self._touch(state)

    def close(self) -> None:
        super().close()
        if self.bootstrap is not None:
            self.bootstrap.close()


def _ok(state: _SendRoom) -> TransferResult:
    return TransferResult(state.room, ok=True, metadata=state.metadata)
