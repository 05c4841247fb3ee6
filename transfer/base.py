"""What KVSender and KVReceiver share: the room table, results, timeouts, page gather/scatter.

Failure reasons are "kind: detail" strings; the kind (timeout, peer_died, aborted, unknown_room,
bad_request, incompatible) labels the failures metric.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from disagg.common.config import transfer_trace
from disagg.common.messages import message
from disagg.transfer import metrics
from disagg.transfer.layout import KVLayout
from disagg.transfer.protocol import Room, RoomFailedMsg
from disagg.transfer.ucx import Peer, UcxLoop

INLINE_COPY_BYTES = 1 << 20  # CPU gathers/scatters up to this size run on the loop thread
# CPU chunks up to this size travel inside their header's control message (one message, not two
# in series: on the CPU a one-way UCX message costs ~0.4 ms of wake-ups); at most INLINE_COPY_BYTES
INLINE_DATA_BYTES = 1 << 20
POOLED_STAGING_MIN_BYTES = 4 << 10  # CPU staging buffers from this size on are pooled
STAGING_POOL_BYTES = 256 << 20  # CPU: at most this much idle staging memory kept per engine

# DISAGG_TRANSFER_TRACE=1 records when each room passes each hop (time.monotonic(), comparable
# between processes of one host); `python -m disagg.transfer.bench --trace` prints the medians.
TRACE = transfer_trace()
_hops: dict[Room, dict[str, float]] = {}


def trace(room: Room, hop: str) -> None:
    """Remember the first time `room` passed `hop` (a no-op unless DISAGG_TRANSFER_TRACE=1)."""
    if TRACE:
        _hops.setdefault(room, {}).setdefault(hop, time.monotonic())


def take_trace() -> dict[Room, dict[str, float]]:
    """The hops recorded so far in this process (and forget them)."""
    out = dict(_hops)
    _hops.clear()
    return out


@message
@dataclass
class TransferResult:
    """A room that finished: its pages may be freed (failed) or used (decode, ok)."""

    room: Room
    ok: bool
    reason: str = ""  # "kind: detail" when not ok
    metadata: dict[str, Any] = field(default_factory=dict)  # from the prefill side (decode only)
    nbytes: int = 0
    seconds: float = 0.0
    # time.monotonic() when this engine had the result (comparable between processes of one host):
    # where the decode's first-token delay starts (disagg_kv_transfer_step_seconds{step="first_token"})
    ready_at: float = 0.0


@dataclass
class Tombstone:
    """A finished room, remembered for a while so late messages about it are recognised."""

    ok: bool
    reason: str
    expiry: float  # monotonic
    reported: bool = True  # False: failed by the peer before this side knew the room
    served: frozenset = frozenset()  # prefill: decode ranks that had requested the room


@dataclass
class RoomState:
    room: Room
    deadline: float  # monotonic; pushed forward on every sign of progress
    started: float | None = None  # first KV byte on the wire
    nbytes: int = 0
    busy: int = 0  # gathers/scatters touching kv_buffer right now: a result waits for them
    finished: bool = False
    result: TransferResult | None = None
    peers: list[Peer] = field(default_factory=list)  # told when the room fails here


def chunk_shape(layout: KVLayout, num_pages: int, num_heads: int) -> tuple[int, ...]:
    """A chunk of `layout`'s rank (a prefill pipeline stage: its layers only)."""
    return (layout.num_local_layers, num_pages, 2, layout.page_size, num_heads, layout.head_dim)


def chunk_nbytes(layout: KVLayout, num_pages: int, num_heads: int) -> int:
    return (
        layout.torch_dtype.itemsize
        * num_pages
        * num_heads
        * layout.num_local_layers
        * 2
        * layout.page_size
        * layout.head_dim
    )


def wide_pages(t: torch.Tensor, whole_pages: bool) -> torch.Tensor:
    """The same bytes as [layers, pages, ...] with the widest elements the copy kernels can use.

    index_select/index_copy_ move one element per thread: on bf16 they reached a fraction of
    the memory bandwidth. With all local heads a page's layer slice is one contiguous row.
    """
    if whole_pages:
        t = t.view(t.shape[0], t.shape[1], -1)
    if t.shape[-1] * t.element_size() % 8 == 0 and t.stride(-1) == 1:
        t = t.view(torch.int64)
    return t


def gather_pages(
    src: torch.Tensor, pages: torch.Tensor, out: torch.Tensor, use_gather: bool | None = None
) -> None:
    """out[:, i] = src[:, pages[i]] (dim 1 is the page dim of both).

    On CUDA through torch.gather over an expanded index: PyTorch's index_select kernel moves one
    element per loop step and ran at a fraction of the memory bandwidth (pytorch/pytorch#151612:
    gather ~3.7x faster); on the CPU index_select copies whole rows. `use_gather` forces a path
    (the tests run the CUDA one on the CPU).
    """
    if use_gather if use_gather is not None else src.is_cuda:
        shape = [1] * out.dim()
        shape[1] = len(pages)
        torch.gather(src, 1, pages.view(shape).expand(out.shape), out=out)
    else:
        torch.index_select(src, 1, pages, out=out)


class TransferBase:
    role = ""

    def __init__(
        self,
        kv_buffer: torch.Tensor,  # [layers, pages, 2, page_size, local_kv_heads, head_dim], cpu or cuda
        layout: KVLayout,
        timeout_s: float = 30.0,
        heartbeat_s: float = 1.0,
        heartbeat_timeout_s: float = 5.0,
        ib_device: str | None = None,  # --disaggregation-ib-device
    ) -> None:
        layout.check_pool(kv_buffer)
        self.kv_buffer = kv_buffer
        self.layout = layout
        self.timeout_s = timeout_s
        self.heartbeat_s = heartbeat_s
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.device = kv_buffer.device
        self.ucx = UcxLoop.get(self.device, ib_device)
        self.rooms: dict[Room, Any] = {}  # active rooms, touched only on the loop thread
        self.peers: set[Peer] = set()
        self._tombstones: dict[Room, Tombstone] = {}
        # (result, when it was appended) on the loop, drained by poll()
        self._results: deque[tuple[TransferResult, float]] = deque()
        self._results_ready = threading.Event()  # set when _results gets one; wait() blocks on it
        # a pipe's write end (TransferWaker): written as the first result after a poll() lands, from
        # the loop thread itself, so the scheduler's select wakes with no thread hop in between
        self.notify_fd: int | None = None
        self._stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        # host chunks up to this size ride inside their header (device bytes never go via the host)
        self.inline_data_bytes = INLINE_DATA_BYTES if self._stream is None else 0
        self._free_staging: dict[int, list[torch.Tensor]] = {}  # CPU: power-of-two size -> buffers
        self._pooled_bytes = 0
        self._closed = False
        self._timer: asyncio.Task = self.ucx.run_sync(lambda: asyncio.ensure_future(self._watch_deadlines()))

    # ---- thread-safe API ----
    def poll(self) -> list[TransferResult]:
        """Rooms finished (ok or failed) since the last poll; each room is reported exactly once."""
        self._results_ready.clear()  # before draining: a result appended from now on sets it again
        out = []
        now = time.perf_counter()
        while self._results:
            result, at = self._results.popleft()
            metrics.observe_step(self.role, "to_scheduler", now - at)
            out.append(result)
        return out

    def wait(self, timeout: float | None = None) -> bool:
        """Block until poll() has something (True) or timeout passes (False): a caller that has
        nothing else to do learns of a finished room at once instead of polling in a sleep loop."""
        return self._results_ready.wait(timeout)

    def abort(self, room: Room) -> None:
        """Fail `room` here and on the peer side (its result still comes through poll())."""
        self.ucx.call_soon(self._abort, room)

    def num_active_rooms(self) -> int:
        return self.ucx.run_sync(lambda: len(self.rooms))

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True

        def shutdown() -> None:
            self._timer.cancel()
            for state in list(self.rooms.values()):
                self._fail(state, "aborted: transfer engine shutting down")
            for peer in list(self.peers):
                peer.close("aborted: closed locally")

        self.ucx.run_sync(shutdown)

    # ---- loop thread ----
    def _abort(self, room: Room) -> None:
        state = self.rooms.get(room)
        if state is not None:
            self._fail(state, f"aborted: by the {self.role} side")

    def _touch(self, state: RoomState) -> None:
        state.deadline = time.monotonic() + self.timeout_s

    def _tombstone_expiry(self) -> float:
        return time.monotonic() + max(60.0, 4 * self.timeout_s)

    def _new_deadline(self) -> float:
        return time.monotonic() + self.timeout_s

    def _fail(self, state: RoomState, reason: str, notify: bool = True, skip: Peer | None = None) -> None:
        if state.finished:
            return
        if notify:
            for peer in state.peers:
                if peer is not skip:
                    peer.post_msg(RoomFailedMsg(state.room, reason))
        self._finish(state, TransferResult(state.room, ok=False, reason=reason))

    def _finish(self, state: RoomState, result: TransferResult) -> None:
        state.finished = True
        self.rooms.pop(state.room, None)
        served = frozenset(getattr(state, "requests", {}))
        self._tombstones[state.room] = Tombstone(
            result.ok, result.reason, self._tombstone_expiry(), served=served
        )
        if result.ok and state.started is not None:
            result.nbytes, result.seconds = state.nbytes, time.perf_counter() - state.started
            metrics.observe_success(self.role, result.nbytes, result.seconds)
        elif not result.ok:
            metrics.observe_failure(self.role, result.reason)
        state.result = result
        self._report_when_idle(state)

    def _report_when_idle(self, state: RoomState) -> None:
        # NOTE: a failed room is reported only once no gather/scatter touches its pages, so the
        # server can free (and reuse) them as soon as poll() returns the failure.
        if state.result is not None and state.busy == 0:
            trace(state.room, f"{self.role}_result")
            state.result.ready_at = time.monotonic()
            self._results.append((state.result, time.perf_counter()))
            self._notify()
            state.result = None

    def _notify(self) -> None:
        # NOTE: one byte per batch of results: poll() clears the event before it drains, so a result
        # appended after that writes again (at worst one spurious wake-up, never a missed one)
        if self._results_ready.is_set():
            return
        self._results_ready.set()
        if self.notify_fd is not None:
            try:
                os.write(self.notify_fd, b"\0")
            except BlockingIOError:
                pass  # the pipe is full of unread wake-ups: the scheduler will wake anyway

    def _fail_rooms_of(self, peer: Peer, reason: str) -> None:
        for state in list(self.rooms.values()):
            if self._depends_on(state, peer):
                self._fail(state, reason, skip=peer)

    def _depends_on(self, state: RoomState, peer: Peer) -> bool:
        """Whether `state` can no longer complete without `peer` (overridden per side)."""
        return peer in state.peers

    async def _watch_deadlines(self) -> None:
        period = min(0.1, self.timeout_s / 10)
        while True:
            await asyncio.sleep(period)
            now = time.monotonic()
            for state in list(self.rooms.values()):
                if now > state.deadline:
                    self._fail(state, f"timeout: no progress for {self.timeout_s:.1f}s")
            for room, tomb in list(self._tombstones.items()):
                if now > tomb.expiry:
                    del self._tombstones[room]

    async def _run_copy(
        self, state: RoomState, fn: Callable[[], None], nbytes: int, step: str, ready=None
    ) -> None:
        """Run a gather/scatter/copy: on CUDA on the transfer stream after the `ready` event (the
        forward that wrote the pages), its completion awaited off the loop thread; on the CPU inline
        when small, else on a worker thread (a hop costs ~0.1 ms; a 32 MiB copy would stall the loop
        for milliseconds). CUDA: `step` records the copy's own GPU time, "wait_ready" the rest of
        the wait (the forward still running when the copy was posted, then the hop back)."""
        state.busy += 1
        start = time.perf_counter()
        try:
            if self._stream is not None:
                with torch.cuda.stream(self._stream):
                    if ready is not None:
                        self._stream.wait_event(ready)
                    begin = torch.cuda.Event(enable_timing=True)
                    begin.record()
                    fn()
                    done = torch.cuda.Event(enable_timing=True)
                    done.record()
                # NOTE: waited for on a worker thread: the copy may first wait for a prefill forward
                # (its ready event); blocking the loop meanwhile stalled every other room and heartbeat
                await asyncio.to_thread(done.synchronize)
                copy_s = begin.elapsed_time(done) / 1000
                metrics.observe_step(self.role, step, copy_s)
                metrics.observe_step(self.role, "wait_ready", time.perf_counter() - start - copy_s)
            else:
                if nbytes <= INLINE_COPY_BYTES:
                    fn()
                else:
                    await asyncio.to_thread(fn)
                metrics.observe_step(self.role, step, time.perf_counter() - start)
        finally:
            state.busy -= 1
            self._report_when_idle(state)

    def _staging(self, nbytes: int) -> torch.Tensor:
        """A uint8 buffer of nbytes for one piece. On the CPU it comes from a pool of power-of-two
        buffers: a fresh large host buffer is mmapped and page-faulted on every use (a 32 MiB one
        cost ~7 ms more than a reused one). On CUDA the caching allocator already reuses memory."""
        if self._stream is not None or nbytes < POOLED_STAGING_MIN_BYTES:
            return torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        size = 1 << (nbytes - 1).bit_length()
        free = self._free_staging.get(size)
        if free:
            self._pooled_bytes -= size
            return free.pop()[:nbytes]
        return torch.empty(size, dtype=torch.uint8)[:nbytes]

    def _release_staging(self, staging: torch.Tensor) -> None:
        """Give a staging buffer back to the pool; only once neither UCX nor a copy uses it."""
        base = staging._base
        if self._stream is not None or base is None or base.numel() < POOLED_STAGING_MIN_BYTES:
            return
        if self._pooled_bytes + base.numel() <= STAGING_POOL_BYTES:
            self._free_staging.setdefault(base.numel(), []).append(base)
            self._pooled_bytes += base.numel()

    def _typed(
        self, staging: torch.Tensor, num_pages: int, num_heads: int, layout: KVLayout | None = None
    ) -> torch.Tensor:
        """`staging` as a chunk of `layout`'s rank (default this one's; a receiver: the sender's)."""
        layout = layout or self.layout
        return staging.view(layout.torch_dtype).view(chunk_shape(layout, num_pages, num_heads))
