"""KVReceiver: the decode side. One per decode TP rank.

    receiver = KVReceiver(kv_buffer, layout)
    receiver.expect(room, bootstrap_host, bootstrap_port, dst_pages)   # pages already allocated
    for r in receiver.poll(): r.ok -> decode may start (r.metadata has e.g. the first token);
                              not r.ok -> free the pages (r.reason says why)

The first expect() for a prefill server connects to it (bootstrap query, one UCX endpoint per
prefill rank, layout handshake); later rooms reuse the connection. Each chunk arrives as one UCX
message into a staging buffer and is scattered into the destination pages (and KV-head slice).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from disagg.common.engine.device_wait import host_to_device
from disagg.transfer.base import RoomState, TransferBase, TransferResult, chunk_nbytes, trace, wide_pages
from disagg.transfer.bootstrap import query_prefill_dp_size, query_prefill_ranks
from disagg.transfer.direct import export_pool
from disagg.transfer.layout import HeadSlice, KVLayout, KVLayoutMismatchError, plan_head_slices
from disagg.transfer.protocol import (
    HelloAckMsg,
    HelloMsg,
    KVChunkMsg,
    Room,
    RoomAckMsg,
    RoomDoneMsg,
    RoomFailedMsg,
    RoomReleasedMsg,
    RoomRequestMsg,
)
from disagg.transfer.ucx import Peer

logger = logging.getLogger(__name__)
ServerAddr = tuple[str, int]  # the prefill server's bootstrap (host, port)
ServerKey = tuple[str, int, int]  # (host, port, replica): the ranks of one prefill replica (--dp-size)


@dataclass
class _Source:
    """One prefill rank that sends this decode rank a slice of KV heads of the room."""

    peer: Peer
    heads: HeadSlice
    chunks_done: int = 0
    pages_done: int = 0
    num_chunks: int | None = None  # known from the last KVChunkMsg (or a RoomDoneMsg)


@dataclass
class _RecvRoom(RoomState):
    dst_pages: torch.Tensor = None  # [num_pages] int64, on the kv_buffer's device
    ready: torch.cuda.Event | None = None  # CUDA: recorded after dst_pages' copy to the device
    sources: dict[int, _Source] = field(default_factory=dict)  # prefill rank ->
    metadata: dict[str, Any] = field(default_factory=dict)
    fingerprint: int = 0  # prompt_fingerprint of the request the pages are reserved for
    host_pages: list[int] = field(default_factory=list)  # dst_pages on the host (for direct peers)
    # prefill ranks that write straight into dst_pages (direct peers) and have not finished or
    # released the room: each holds one `busy`, so a failure is reported (the pages reused) only
    # once no late copy can land in them
    holds: set[int] = field(default_factory=set)


@dataclass
class _PrefillServer:
    peers: list[Peer]  # by prefill tp rank
    heads: list[HeadSlice]  # what this decode rank gets from which prefill rank


class KVReceiver(TransferBase):
    role = "decode"

    def __init__(
        self,
        kv_buffer: torch.Tensor,
        layout: KVLayout,
        timeout_s: float = 30.0,
        heartbeat_s: float = 1.0,
        heartbeat_timeout_s: float = 5.0,
        ib_device: str | None = None,  # --disaggregation-ib-device (e.g. "mlx5_0")
        connect_timeout_s: float = 10.0,
        allow_direct: bool = True,  # same-host prefill ranks may write into kv_buffer (transfer/direct.py)
    ) -> None:
        super().__init__(kv_buffer, layout, timeout_s, heartbeat_s, heartbeat_timeout_s, ib_device)
        self.connect_timeout_s = connect_timeout_s
        self._export = (
            export_pool(kv_buffer) if allow_direct else {}
        )  # offered to same-host prefill ranks at the handshake
        self._held: dict[Room, _RecvRoom] = {}  # finished rooms still held by a direct prefill rank
        self._servers: dict[ServerKey, asyncio.Future[_PrefillServer]] = {}
        self._dp_sizes: dict[ServerAddr, asyncio.Future[int]] = {}  # prefill server -> its replicas
        self._active_ids: set[Room] = set()  # mirrors self.rooms for the caller's thread

    # ---- thread-safe API ----
    def connect(self, bootstrap_host: str, bootstrap_port: int, dp_rank: int = 0) -> None:
        """Connect to a prefill server (its replica `dp_rank`) now (expect() does it lazily). Raises
        BootstrapError, KVLayoutMismatchError (with every differing field named) or a UCX error."""

        async def run() -> None:
            await self._server((bootstrap_host, bootstrap_port, dp_rank))

        self.ucx.call(run(), timeout=self.connect_timeout_s * 2 + 5)

    def expect(
        self,
        room: Room,
        bootstrap_host: str,
        bootstrap_port: int,
        dst_pages: torch.Tensor | list[int],
        fingerprint: int = 0,
    ) -> None:
        """Receive `room`'s KV into dst_pages (token order). Non-blocking; the outcome comes from poll().
        `fingerprint`: the prompt's (protocol.prompt_fingerprint); the prefill refuses a room bound
        to another prompt. Raises ValueError for a duplicate room or page indices outside the pool."""
        pages = torch.as_tensor(dst_pages, dtype=torch.int64)
        num_pool_pages = self.kv_buffer.shape[1]
        if pages.dim() != 1 or len(pages) == 0 or int(pages.min()) < 0 or int(pages.max()) >= num_pool_pages:
            raise ValueError(
                f"room {room}: dst_pages must be a non-empty list of pages in [0, {num_pool_pages})"
            )
        if room in self._active_ids:
            raise ValueError(f"room {room} is already expected")
        self._active_ids.add(room)
        host_pages = pages.tolist()
        pages = host_to_device(pages, self.device)  # no wait for the decode's step in flight
        ready = None
        if self.device.type == "cuda":  # the copy runs on the pool device's current stream: scatters wait
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(self.device))
        self.ucx.call_soon(
            self._on_expect, room, (bootstrap_host, bootstrap_port), pages, ready, fingerprint, host_pages
        )

    # ---- loop thread: connections ----
    def _server(self, key: ServerKey) -> asyncio.Future[_PrefillServer]:
        fut = self._servers.get(key)
        if fut is None or (fut.done() and fut.exception() is not None):
            fut = self._servers[key] = asyncio.ensure_future(self._connect(key))
        return fut

    def _dp_size(self, addr: ServerAddr) -> asyncio.Future[int]:
        fut = self._dp_sizes.get(addr)
        if fut is None or (fut.done() and fut.exception() is not None):
            query = asyncio.to_thread(query_prefill_dp_size, addr[0], addr[1], self.connect_timeout_s)
            fut = self._dp_sizes[addr] = asyncio.ensure_future(query)
        return fut

    async def _connect(self, key: ServerKey) -> _PrefillServer:
        ranks = await asyncio.to_thread(query_prefill_ranks, key[0], key[1], self.connect_timeout_s, key[2])
        self.layout.check_compatible(ranks[0].layout)
        prefill_tp, stages = ranks[0].layout.tp_size, ranks[0].layout.pp_size
        if self.layout.pp_size > 1:
            raise KVLayoutMismatchError(
                "a decode server with --pp-size > 1 cannot receive KV pages (not supported)"
            )
        # each pipeline stage of the prefill sends its layers: the same head slices from every stage
        heads = [
            replace(s, prefill_rank=stage * prefill_tp + s.prefill_rank)
            for stage in range(stages)
            for s in plan_head_slices(prefill_tp, self.layout.tp_size, self.layout.num_kv_heads_total)
            if s.decode_rank == self.layout.tp_rank
        ]
        peers: list[Peer] = []
        try:
            for rank in ranks:
                peers.append(await self._handshake(rank.host, rank.port, rank.layout))
        except BaseException:
            for peer in peers:
                peer.close("aborted: handshake with another prefill rank failed")
            raise
        for peer in peers:
            peer.server_key = key
            self.peers.add(peer)
            peer.start()
        return _PrefillServer(peers, heads)

    async def _handshake(self, host: str, port: int, remote: KVLayout) -> Peer:
        import ucxx

        ep = await ucxx.create_endpoint(host, port)
        name = f"prefill rank {remote.rank} at {host}:{port}"
        peer = Peer(
            ep, name, self._on_message, self._on_peer_close, self.heartbeat_s, self.heartbeat_timeout_s
        )
        peer.info = remote
        await peer.send_msg(HelloMsg(self.layout, direct=self._export))
        ack = await peer.recv_msg(timeout=self.connect_timeout_s)
        if not isinstance(ack, HelloAckMsg) or ack.error:
            ep.abort()
            raise KVLayoutMismatchError(f"{name} refused the connection: {getattr(ack, 'error', ack)}")
        peer.direct = ack.direct
        if ack.direct:
            logger.info("%s writes KV pages straight into this rank's pool (same host)", name)
        return peer

    def _on_peer_close(self, peer: Peer, reason: str) -> None:
        self.peers.discard(peer)
        fut = self._servers.get(peer.server_key)
        if fut is not None and fut.done() and not fut.exception() and peer in fut.result().peers:
            # the next expect() reconnects (e.g. to a restarted server); the other ranks' endpoints
            # stay open for the rooms still using them
            del self._servers[peer.server_key]
            self._dp_sizes.pop(peer.server_key[:2], None)  # a restarted server may run other replicas
        self._fail_rooms_of(peer, reason)
        # a dead prefill rank writes nothing more (a hung one: it checks our liveness before each copy)
        for state in [*self.rooms.values(), *self._held.values()]:
            if peer.info is not None and state.sources.get(peer.info.rank, None) is not None:
                if state.sources[peer.info.rank].peer is peer:
                    self._drop_hold(state, peer.info.rank)

    # ---- loop thread: rooms ----
    def _finish(self, state: _RecvRoom, result: TransferResult) -> None:
        if state.holds:
            self._held[state.room] = state
        super()._finish(state, result)
        self._active_ids.discard(state.room)

    def _drop_hold(self, state: _RecvRoom, prefill_rank: int) -> None:
        if prefill_rank in state.holds:
            state.holds.discard(prefill_rank)
            state.busy -= 1
            if not state.holds:
                self._held.pop(state.room, None)
            self._report_when_idle(state)

    def _depends_on(self, state: _RecvRoom, peer: Peer) -> bool:
        src = state.sources.get(peer.info.rank) if peer.info is not None else None
        return src is not None and src.peer is peer

    def _on_expect(
        self,
        room: Room,
        addr: ServerAddr,
        pages: torch.Tensor,
        ready: Any,
        fingerprint: int,
        host_pages: list[int],
    ) -> None:
        state = self.rooms[room] = _RecvRoom(
            room, deadline=self._new_deadline(), dst_pages=pages, ready=ready, fingerprint=fingerprint,
            host_pages=host_pages,
        )  # fmt: skip
        asyncio.ensure_future(self._request_room(state, addr))

    async def _request_room(self, state: _RecvRoom, addr: ServerAddr) -> None:
        try:
            # a prefill with --dp-size N replicas serves room r from replica r % N (SGLang's rule)
            server = await self._server((*addr, state.room % await self._dp_size(addr)))
        except Exception as e:  # noqa: BLE001 - fail the room with the connection's error
            kind = "incompatible" if isinstance(e, KVLayoutMismatchError) else "peer_died"
            self._fail(state, f"{kind}: prefill server {addr[0]}:{addr[1]}: {e}")
            return
        if state.finished:  # aborted while connecting: the prefill side must still hear of it
            for peer in server.peers:
                peer.post_msg(RoomFailedMsg(state.room, self._tombstones[state.room].reason))
            return
        state.peers = list(server.peers)
        state.sources = {h.prefill_rank: _Source(server.peers[h.prefill_rank], h) for h in server.heads}
        for rank, src in state.sources.items():
            if src.peer.direct:  # it may write into dst_pages from now on
                state.holds.add(rank)
                state.busy += 1
        for peer in server.peers:  # every prefill rank hears of the room, even one that sends nothing here
            pages = state.host_pages if peer.direct else []
            peer.post_msg(RoomRequestMsg(state.room, self.layout.tp_rank, self.layout.tp_size,
                                         len(state.dst_pages), state.fingerprint, pages))  # fmt: skip

    def _on_message(self, peer: Peer, msg: Any, payload: np.ndarray | None = None) -> None:
        state = self.rooms.get(getattr(msg, "room", None))
        if isinstance(msg, RoomReleasedMsg):
            held = state or self._held.get(msg.room)
            if held is not None and peer.info is not None:
                src = held.sources.get(peer.info.rank)
                if src is not None and src.peer is peer:
                    self._drop_hold(held, peer.info.rank)
        elif isinstance(msg, KVChunkMsg):
            trace(msg.room, "header_in")
            if msg.direct:
                self._land_direct(peer, msg, state)
            elif payload is None:
                asyncio.ensure_future(self._recv_chunk(peer, msg, state))
            else:
                self._land_inline(peer, msg, state, payload)
        elif state is None:
            return  # done/failed/aborted here already; the prefill side was told or will time out
        elif isinstance(msg, RoomDoneMsg) and peer.info.rank in state.sources:
            self._touch(state)
            state.sources[peer.info.rank].num_chunks = msg.num_chunks
            state.metadata = msg.metadata
            self._check_complete(state)
        elif isinstance(msg, RoomFailedMsg):
            self._fail(state, msg.reason, skip=peer)

    def _chunk_error(self, peer: Peer, msg: KVChunkMsg, state: _RecvRoom | None) -> str:
        if state is None:
            return (
                "" if msg.room in self._tombstones else f"unknown_room: decode never expected room {msg.room}"
            )
        src = state.sources.get(peer.info.rank)
        if src is None or (msg.head_start, msg.head_end) != (src.heads.start, src.heads.end):
            return f"bad_request: heads [{msg.head_start}, {msg.head_end}) not expected from {peer.name}"
        if msg.page_offset < 0 or msg.page_offset + msg.num_pages > len(state.dst_pages):
            return f"bad_request: pages [{msg.page_offset}, +{msg.num_pages}) beyond the {len(state.dst_pages)} decode pages"
        if msg.nbytes != chunk_nbytes(peer.info, msg.num_pages, msg.head_end - msg.head_start):
            return f"bad_request: chunk of {msg.nbytes} bytes does not match its pages and heads"
        return ""

    def _accept_chunk(self, peer: Peer, msg: KVChunkMsg, state: _RecvRoom | None, nbytes: int) -> str:
        """Check a chunk's header (nbytes: what actually arrives); note the done it may carry."""
        error = self._chunk_error(peer, msg, state)
        if not error and nbytes != msg.nbytes:
            error = f"bad_request: chunk of {nbytes} bytes announced as {msg.nbytes}"
        if state is not None and not error:
            self._touch(state)
            state.started = state.started or time.perf_counter()
            if msg.num_chunks:  # the room's last chunk from this source: the done rides on it
                state.sources[peer.info.rank].num_chunks = msg.num_chunks
                state.metadata = msg.metadata
        return error

    async def _recv_chunk(self, peer: Peer, msg: KVChunkMsg, state: _RecvRoom | None) -> None:
        error = self._accept_chunk(peer, msg, state, msg.nbytes)
        # NOTE: the bytes always land in a staging buffer first, never straight in the pool, so a
        # late chunk of a failed room cannot overwrite pages the server has freed and reused.
        staging = self._staging(msg.nbytes if msg.nbytes <= 1 << 33 else 1)
        trace(msg.room, "recv_posted")
        try:
            await peer.recv_data(staging, msg.tag)
        except Exception:  # noqa: BLE001 - the endpoint failed: the peer's close fails the room
            return
        trace(msg.room, "data_in")
        await self._land_chunk(peer, msg, state, staging, error)
        self._release_staging(staging)  # not on an exception: a cancelled copy may still read it

    def _land_direct(self, peer: Peer, msg: KVChunkMsg, state: _RecvRoom | None) -> None:
        """A chunk the prefill rank already copied into our pages (its copy is complete)."""
        error = self._accept_chunk(peer, msg, state, msg.nbytes)
        if not error and not peer.direct:
            error = f"bad_request: {peer.name} announced a direct chunk without mapping this pool"
        if error:
            peer.post_msg(RoomFailedMsg(msg.room, error))
            if state is not None:
                self._fail(state, error, skip=peer)
            return
        if state is not None and not state.finished:
            self._chunk_landed(peer, msg, state)

    def _land_inline(self, peer: Peer, msg: KVChunkMsg, state: _RecvRoom | None, payload: np.ndarray) -> None:
        """A chunk whose bytes came behind its header: scatter them before the control buffer is
        reused (at once on a host pool; a device pool gets a copy first)."""
        trace(msg.room, "data_in")
        error = self._accept_chunk(peer, msg, state, len(payload))
        if error or state is None or state.finished:
            asyncio.ensure_future(self._land_chunk(peer, msg, state, None, error))
            return
        staging = torch.from_numpy(payload)
        if self._stream is not None:  # (a host sender feeding a device pool: not a usual setup)
            with torch.cuda.stream(self._stream):
                staging = staging.to(self.device)  # synchronous: the control buffer is reused next
            asyncio.ensure_future(self._land_chunk(peer, msg, state, staging, error))
            return
        self._scatter_fn(msg, state, staging, peer.info)()
        self._chunk_landed(peer, msg, state)

    async def _land_chunk(
        self, peer: Peer, msg: KVChunkMsg, state: _RecvRoom | None, staging: torch.Tensor | None, error: str
    ) -> None:
        """The chunk's bytes are in `staging`: scatter them into the room's pages (or drop them)."""
        if error:
            peer.post_msg(RoomFailedMsg(msg.room, error))
            if state is not None:
                self._fail(state, error, skip=peer)
            return
        if state is None or state.finished:
            return
        scatter = self._scatter_fn(msg, state, staging, peer.info)
        await self._run_copy(state, scatter, msg.nbytes, "scatter", state.ready)
        if not state.finished:
            self._chunk_landed(peer, msg, state)

    def _scatter_fn(
        self, msg: KVChunkMsg, state: _RecvRoom, staging: torch.Tensor, source: KVLayout
    ) -> Callable[[], None]:
        heads = (msg.head_start - self.layout.head_range[0], msg.head_end - self.layout.head_range[0])
        pages = state.dst_pages[msg.page_offset : msg.page_offset + msg.num_pages]
        layers = source.layer_range  # a prefill pipeline stage sends its layers only

        def scatter() -> None:
            dst = self.kv_buffer[layers[0] : layers[1], :, :, :, heads[0] : heads[1]]
            whole = heads[1] - heads[0] == self.layout.num_local_heads
            src = wide_pages(self._typed(staging, msg.num_pages, heads[1] - heads[0], source), whole)
            wide_pages(dst, whole).index_copy_(1, pages, src)

        return scatter

    def _chunk_landed(self, peer: Peer, msg: KVChunkMsg, state: _RecvRoom) -> None:
        trace(msg.room, "scattered")
        src = state.sources[peer.info.rank]
        src.chunks_done += 1
        src.pages_done += msg.num_pages
        state.nbytes += msg.nbytes
        self._touch(state)
        self._check_complete(state)

    def _check_complete(self, state: _RecvRoom) -> None:
        if not all(
            s.num_chunks is not None and s.chunks_done >= s.num_chunks for s in state.sources.values()
        ):
            return
        short = [s.peer.name for s in state.sources.values() if s.pages_done != len(state.dst_pages)]
        if short:
            self._fail(state, f"bad_request: room {state.room} incomplete from {', '.join(short)}")
            return
        trace(state.room, "ack_out")
        for s in state.sources.values():
            s.peer.post_msg(RoomAckMsg(state.room))
        for rank in list(state.holds):  # every chunk of every source landed: nothing more is written
            self._drop_hold(state, rank)
        self._finish(state, TransferResult(state.room, ok=True, metadata=state.metadata))
