"""UCX plumbing: one background asyncio loop per process that owns the ucxx worker, and `Peer`,
one UCX endpoint to another rank carrying control messages and KV bytes (both UCX tag messages).

ucxx is asyncio-based and keeps one worker per process, so every KVSender / KVReceiver of a
process shares `UcxLoop.get()`. All transfer state is touched only on that loop's thread; the
public, thread-safe methods of the sender/receiver hand work to it.
"""

from __future__ import annotations

import asyncio
import logging
import struct
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
import torch
from disagg.common.config import configure_ucx_env, gil_switch_interval_s, ucx_python_futures
from disagg.common.messages import decode, encode
from disagg.transfer.protocol import HeartbeatMsg

logger = logging.getLogger(__name__)

# Control messages are UCX tag messages with tag CONTROL_TAG, framed as
#     <u32 msgpack length><u32 payload length><msgpack>[zero padding to PAYLOAD_ALIGN]<payload>
# and received into a fixed buffer. The payload (usually empty) carries a small KV chunk's bytes
# inline, behind its header: one message instead of a header and a data message in series. Larger
# KV data uses tags >= 1 (Peer.new_tag). ucxx hashes both with the endpoint's own tag, so they
# never match another connection's messages.
# NOTE: not active messages: ucxx 0.52 queues received AMs by ucp_ep_h, and a new endpoint that
# reuses an aborted one's handle lost its first message to the dead endpoint's pending am_recv.
CONTROL_TAG = 0
MAX_CONTROL_BYTES = 4 << 20
PAYLOAD_ALIGN = 64  # the payload starts 64-byte aligned: it is viewed as int64/bf16 in place
_FRAME = struct.Struct("<II")


def _payload_offset(msg_nbytes: int) -> int:
    """Where a frame's payload starts: after the lengths and the message, 64-byte aligned."""
    return -(-(_FRAME.size + msg_nbytes) // PAYLOAD_ALIGN) * PAYLOAD_ALIGN


def control_frame(msg: Any, payload_nbytes: int = 0) -> tuple[bytes, int]:
    """The frame's head (lengths, message, padding) and where the payload starts in the frame."""
    body = encode(msg)
    offset = _payload_offset(len(body)) if payload_nbytes else 0
    if max(offset, _FRAME.size + len(body)) + payload_nbytes > MAX_CONTROL_BYTES:
        raise ValueError(
            f"{type(msg).__name__} of {len(body)} + {payload_nbytes} bytes exceeds {MAX_CONTROL_BYTES}"
        )
    head = _FRAME.pack(len(body), payload_nbytes) + body
    return head + bytes(max(0, offset - len(head))), offset


def tensor_buffer(t: torch.Tensor) -> Any:
    """What ucxx can send/receive into: the tensor itself on CUDA (__cuda_array_interface__),
    a numpy view on the CPU. `t` must be a contiguous uint8 tensor."""
    assert t.dtype == torch.uint8 and t.is_contiguous()
    return t if t.is_cuda else t.numpy()


# The longest a thread of this process waits for the GIL while another holds it (Python's switch
# interval; its default is 5 ms). NOTE: the loop thread needs the GIL for every message and completion
# of a hand-off, ~7-10 times a room, and a busy scheduler thread beside it (a prefill launching a
# forward's kernels, a step's host work) holds the GIL for long stretches: a waiting thread then gets
# it only when the interval runs out. `python -m disagg.transfer.bench --transport direct --busy-thread`
# (a Python thread spinning beside the sender), 64 KiB rooms, CPU: 0.5-0.7 ms alone; beside the spinning
# thread 21-47 ms at 5 ms, 3.6 ms at 0.5 ms, 1.6-2.2 ms at 0.2 ms. A busy thread loses nothing
# measurable (a Python loop's rate beside a thread waking every 1 ms: within 5%). On the GPU servers it
# made no difference (PD at 4-16 req/s on one H100, 0.2 against 5 ms: the same TTFT and wait_request,
# eighteenth session, gpu_runs.sh gil-ab-pd), nor did it shorten the one-GPU sweep's wait_request at
# 32 req/s (31 ms before, 52 ms after, on two H100s). DISAGG_GIL_SWITCH_INTERVAL_MS overrides it.
GIL_SWITCH_INTERVAL_S = 0.0002


class UcxLoop:
    """A daemon thread running an asyncio loop with the process's ucxx worker progressed on it."""

    _instance: UcxLoop | None = None
    _lock = threading.Lock()

    @classmethod
    def get(cls, device: torch.device | str = "cpu", ib_device: str | None = None) -> UcxLoop:
        """The process's loop; the first call's device/ib_device configure UCX for the process."""
        with cls._lock:
            if cls._instance is None:
                configure_ucx_env(torch.device(device).type == "cpu", ib_device)
                cls._instance = cls()
            return cls._instance

    def __init__(self) -> None:
        sys.setswitchinterval(gil_switch_interval_s(min(sys.getswitchinterval(), GIL_SWITCH_INTERVAL_S)))
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="disagg-ucx", daemon=True)
        self._thread.start()
        self.call(self._init_ucxx(), timeout=60)

    async def _init_ucxx(self) -> None:
        import ucxx

        # NOTE: without Python futures every pending ucxx request is awaited by polling with
        # asyncio.sleep(0): with many chunks in flight the loop spun on them (UCXPY_ENABLE_PYTHON_FUTURE=0
        # brings that back, e.g. to compare)
        ucxx.init(enable_python_future=ucx_python_futures())  # binds ucxx progress to this (running) loop
        worker = ucxx.core._get_ctx().worker
        if worker.enable_python_future:  # False in the non-thread progress modes
            worker.populate_python_futures_pool()

    def call(self, coro: Awaitable[Any], timeout: float | None = None) -> Any:
        """Run `coro` on the loop and wait for its result (from any thread but the loop's)."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call_soon(self, fn: Callable[..., Any], *args: Any) -> None:
        self.loop.call_soon_threadsafe(fn, *args)

    def run_sync(self, fn: Callable[..., Any], *args: Any, timeout: float | None = 30) -> Any:
        """Run the plain function `fn` on the loop thread and return its result."""

        async def wrapper() -> Any:
            return fn(*args)

        return self.call(wrapper(), timeout)


class Peer:
    """One UCX endpoint to a remote rank.

    Control messages arrive in `on_message(peer, msg, payload)` (payload: the inline bytes behind
    the message, a numpy view valid only during the call, or None); when the endpoint fails (UCX error: the
    process died or the link broke) or stays silent for `heartbeat_timeout_s`, `on_close(peer,
    reason)` runs once. Both callbacks run on the loop thread.
    """

    def __init__(
        self,
        ep: Any,
        name: str,
        on_message: Callable[[Peer, Any, np.ndarray | None], None],
        on_close: Callable[[Peer, str], None],
        heartbeat_s: float = 1.0,
        heartbeat_timeout_s: float = 5.0,
    ) -> None:
        self.ep = ep
        self.name = name
        self.on_message = on_message
        self.on_close = on_close
        self.heartbeat_s = heartbeat_s
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.last_seen = time.monotonic()
        self.closed = False
        self.info: Any = None  # the remote rank's KVLayout, once the handshake is done
        self.server_key: Any = None  # decode side: the prefill server this rank belongs to
        # same-host peers (transfer/direct.py): on a prefill rank the decode rank's pool mapped here,
        # on a decode rank whether the prefill rank writes straight into this rank's pool
        self.direct_pool: torch.Tensor | None = None
        self.direct = False
        self._next_tag = 1
        self._tasks: list[asyncio.Task] = []
        # one control recv at a time; torch's host allocator aligns it to 64 bytes (PAYLOAD_ALIGN)
        self._control_buf = torch.empty(MAX_CONTROL_BYTES, dtype=torch.uint8).numpy()

    def start(self) -> None:
        self._tasks = [
            asyncio.ensure_future(self._read_loop()),
            asyncio.ensure_future(self._heartbeat_loop()),
        ]

    def new_tag(self) -> int:
        tag, self._next_tag = self._next_tag, self._next_tag + 1
        return tag

    async def send_msg(self, msg: Any) -> None:
        head, _ = control_frame(msg)
        await self.ep.send(np.frombuffer(head, dtype=np.uint8), tag=CONTROL_TAG)

    async def send_frame(self, frame: torch.Tensor) -> None:
        """Send a control frame built by the caller (control_frame's head, then the payload)."""
        await self.ep.send(tensor_buffer(frame), tag=CONTROL_TAG)

    async def _recv_control(self) -> tuple[bytes, np.ndarray | None]:
        """The next control message and its payload: a view of the receive buffer, valid only
        until the next receive is posted."""
        await self.ep.recv(self._control_buf, tag=CONTROL_TAG)
        n, payload_nbytes = _FRAME.unpack_from(self._control_buf)
        raw = bytes(self._control_buf[_FRAME.size : _FRAME.size + n])
        if not payload_nbytes:
            return raw, None
        start = _payload_offset(n)
        return raw, self._control_buf[start : start + payload_nbytes]

    def post_msg(self, msg: Any) -> None:
        """Fire-and-forget send; a failure closes the peer."""
        if not self.closed:
            asyncio.ensure_future(self._guarded(self.send_msg(msg)))

    async def send_data(self, data: torch.Tensor, tag: int) -> None:
        await self.ep.send(tensor_buffer(data), tag=tag)

    async def recv_data(self, data: torch.Tensor, tag: int) -> None:
        await self.ep.recv(tensor_buffer(data), tag=tag)

    async def recv_msg(self, timeout: float) -> Any:
        """Receive one control message directly (only before `start()`: the handshake)."""

        async def first() -> Any:
            while isinstance(msg := decode((await self._recv_control())[0]), HeartbeatMsg):
                pass
            return msg

        return await asyncio.wait_for(first(), timeout)

    async def _guarded(self, coro: Awaitable[Any]) -> None:
        try:
            await coro
        except Exception as e:  # noqa: BLE001 - any UCX error means the endpoint is gone
            self.close(f"peer_died: {self.name} unreachable: {type(e).__name__}: {e}")

    async def _read_loop(self) -> None:
        while not self.closed:
            try:
                raw, payload = await self._recv_control()
            except Exception as e:  # noqa: BLE001
                self.close(f"peer_died: {self.name}: {type(e).__name__}: {e}")
                return
            self.last_seen = time.monotonic()
            try:
                msg = decode(raw)
            except Exception as e:  # noqa: BLE001 - a malformed message: drop it, keep the peer
                logger.warning("dropping malformed control message from %s: %s", self.name, e)
                continue
            if not isinstance(msg, HeartbeatMsg):
                try:
                    # NOTE: the payload lives in the control buffer: on_message must use it before
                    # returning (the next receive overwrites it)
                    self.on_message(self, msg, payload)
                except Exception:
                    logger.exception("error handling %s from %s", type(msg).__name__, self.name)

    async def _heartbeat_loop(self) -> None:
        while not self.closed:
            await asyncio.sleep(self.heartbeat_s)
            if time.monotonic() - self.last_seen > self.heartbeat_timeout_s:
                self.close(f"peer_died: {self.name} silent for more than {self.heartbeat_timeout_s:.1f}s")
                return
            self.post_msg(HeartbeatMsg())

    def close(self, reason: str) -> None:
        if self.closed:
            return
        self.closed = True
        logger.info("closing peer %s: %s", self.name, reason)
        current = asyncio.current_task()
        for task in self._tasks:
            if task is not current:
                task.cancel()
        try:
            self.ep.abort()
        except Exception:  # noqa: BLE001
            pass
        self.on_close(self, reason)
