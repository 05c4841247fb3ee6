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
from dataclasses import dataclass, field
from typing import Any

import torch
from disagg.transfer.base import RoomState, Tombstone, TransferBase, TransferResult, chunk_nbytes, wide_pages
from disagg.transfer.bootstrap import BootstrapServer, register_prefill_rank
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
    RoomRequestMsg,
)
from disagg.transfer.ucx import Peer

logger = logging.getLogger(__name__)


@dataclass
class _Chunk:
    pages: torch.Tensor  # [num_pages] int64 source page indices, on the kv_buffer's device
    page_offset: int
    ready: torch.cuda.Event | None  # recorded after the prefill forward that wrote the pages


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
        serve_bootstrap: bool | None = None,  # default: tp_rank 0 serves it
        host: str | None = None,  # address decode ranks reach this rank's UCX listener at
        timeout_s: float = 30.0,
        heartbeat_s: float = 1.0,
        heartbeat_timeout_s: float = 5.0,
        ib_device: str | None = None,  # --disaggregation-ib-device (e.g. "mlx5_0")
        max_message_bytes: int = 32 << 20,  # larger chunks travel as several pipelined messages
    ) -> None:
        super().__init__(kv_buffer, layout, timeout_s, heartbeat_s, heartbeat_timeout_s, ib_device)
        self.max_message_bytes = max_message_bytes
        self.bootstrap: BootstrapServer | None = None
        if serve_bootstrap if serve_bootstrap is not None else layout.tp_rank == 0:
            self.bootstrap = BootstrapServer(port=bootstrap_port)
            bootstrap_port = self.bootstrap.port
        self.bootstrap_port = bootstrap_port
        self._listener = self.ucx.run_sync(self._listen)
        self.host = host or default_host()
        self.port = self._listener.port
        info = RegisterPrefillRankMsg(layout=layout, host=self.host, port=self.port)
        register_prefill_rank(bootstrap_host, bootstrap_port, info)

    # ---- thread-safe API ----
    def send(
        self,
        room: Room,
        src_pages: torch.Tensor | list[int],
        page_offset: int = 0,
        is_last: bool = False,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        """Queue a chunk of `room`: src_pages land in the decode pages [page_offset, page_offset + n).

        Non-blocking. On CUDA the gather waits for the work queued so far on the current stream,
        so call it right after launching the forward that wrote these pages.
        """
        pages = torch.as_tensor(src_pages, dtype=torch.int64).to(self.device, non_blocking=True)
        ready = None
        if self.device.type == "cuda":
            ready = torch.cuda.Event()
            ready.record()
        self.ucx.call_soon(self._on_send, room, _Chunk(pages, page_offset, ready), is_last, metadata or {})

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
        except Exception as e:  # noqa: BLE001 - refuse this peer with a reason it can show
            logger.warning("refusing decode peer: %s", e)
            try:
                await peer.send_msg(HelloAckMsg(error=f"incompatible: {e}"))
                await asyncio.sleep(0.5)  # let the refusal arrive before the endpoint goes
            finally:
                ep.abort()
            return
        peer.name, peer.info = f"decode rank {hello.layout.tp_rank}", hello.layout
        await peer.send_msg(HelloAckMsg())
        self.peers.add(peer)
        peer.start()

    def _on_peer_close(self, peer: Peer, reason: str) -> None:
        self.peers.discard(peer)
        self._fail_rooms_of(peer, reason)

    def _depends_on(self, state: _SendRoom, peer: Peer) -> bool:
        if state.targets is None:
            return peer in state.peers
        # a decode rank that already acked (or gets nothing from this rank) is not needed any more
        return peer.info.tp_rank in {t.decode_rank for t in state.targets} - state.acked

    def _room(self, room: Room) -> _SendRoom:
        state = self.rooms.get(room)
        if state is None:
            state = self.rooms[room] = _SendRoom(room, deadline=self._new_deadline())
        self._touch(state)
        return state

    def _on_send(self, room: Room, chunk: _Chunk, is_last: bool, metadata: dict[str, Any]) -> None:
        tomb = self._tombstones.get(room)
        if tomb is not None and room not in self.rooms:
            if not tomb.reported:  # decode failed the room before its first chunk: report it now
                tomb.reported = True
                self._fail(self._room(room), tomb.reason, notify=False)
            return  # otherwise the room's result was reported once already
        state = self._room(room)
        if state.is_last:
            self._fail(state, f"bad_request: chunk after the last chunk of room {room}")
            return
        state.queued.append(chunk)
        state.is_last, state.metadata = is_last, metadata
        self._pump(state)

    def _on_message(self, peer: Peer, msg: Any) -> None:
        room = getattr(msg, "room", None)
        tomb = self._tombstones.get(room)
        if tomb is not None and room not in self.rooms:
            if isinstance(msg, RoomRequestMsg) and not tomb.ok:
                peer.post_msg(RoomFailedMsg(room, tomb.reason))
            return
        if isinstance(msg, RoomFailedMsg) and room not in self.rooms:
            # failed on the decode side before the first send(): send() will report it
            self._tombstones[room] = Tombstone(False, msg.reason, self._tombstone_expiry(), reported=False)
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
        self._pump(state)

    def _on_ack(self, peer: Peer, state: _SendRoom) -> None:
        self._touch(state)
        state.acked.add(peer.info.tp_rank)
        if state.targets is not None and state.acked >= {t.decode_rank for t in state.targets}:
            self._finish(state, _ok(state))

    def _pump(self, state: _SendRoom) -> None:
        """Start every queued chunk once its destinations are known; after the last, send the done."""
        if state.finished or state.targets is None:
            return
        if any(t.decode_rank not in state.requests for t in state.targets):
            return  # a destination decode rank has not said where its pages are yet
        for chunk in state.queued:
            if error := self._check_chunk(state, chunk):
                self._fail(state, error)
                return
            for piece in self._split(chunk):
                for t in state.targets:
                    state.chunks_planned[t.decode_rank] = state.chunks_planned.get(t.decode_rank, 0) + 1
                asyncio.ensure_future(self._send_piece(state, piece))
        state.queued.clear()
        if state.is_last and not state.done_sent:
            # NOTE: sent before the last bytes leave: the decode side counts chunks, so the done
            # needs no extra round trip after the data
            state.done_sent = True
            for t in state.targets:
                peer = state.requests[t.decode_rank][0]
                peer.post_msg(
                    RoomDoneMsg(state.room, state.chunks_planned.get(t.decode_rank, 0), state.metadata)
                )
            if not state.targets:  # this rank holds no heads any decode rank needs
                self._finish(state, _ok(state))

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

    async def _send_piece(self, state: _SendRoom, chunk: _Chunk) -> None:
        try:
            await asyncio.gather(*(self._send_slice(state, chunk, t) for t in state.targets or []))
        except Exception as e:  # noqa: BLE001 - UCX error: the decode rank is gone
            self._fail(state, f"peer_died: sending room {state.room}: {type(e).__name__}: {e}")

    async def _send_slice(self, state: _SendRoom, chunk: _Chunk, target: HeadSlice) -> None:
        peer = state.requests[target.decode_rank][0]
        lo = self.layout.head_range[0]
        num_pages, num_heads = len(chunk.pages), target.end - target.start
        nbytes = chunk_nbytes(self.layout, num_pages, num_heads)
        staging = self._staging(nbytes)

        def gather() -> None:
            if chunk.ready is not None:
                torch.cuda.current_stream().wait_event(chunk.ready)
            src = self.kv_buffer[:, :, :, :, target.start - lo : target.end - lo]
            whole = num_heads == self.layout.num_local_heads
            out = wide_pages(self._typed(staging, num_pages, num_heads), whole)
            torch.index_select(wide_pages(src, whole), 1, chunk.pages, out=out)

        await self._run_copy(state, gather)
        if state.finished:
            return
        tag = peer.new_tag()
        msg = KVChunkMsg(state.room, chunk.page_offset, num_pages, target.start, target.end, nbytes, tag)
        state.started = state.started or time.perf_counter()
        peer.post_msg(msg)  # not awaited: UCX holds the data until the decode posts its recv
        await peer.send_data(staging, tag)
        state.nbytes += nbytes
        self._touch(state)

    def close(self) -> None:
        super().close()
        if self.bootstrap is not None:
            self.bootstrap.close()


def _ok(state: _SendRoom) -> TransferResult:
    return TransferResult(state.room, ok=True, metadata=state.metadata)
