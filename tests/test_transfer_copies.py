"""The pieces of the data path that the GPU runs, checked bit for bit on the CPU: the page gather
(torch.gather on CUDA, index_select on the CPU) and control frames with a KV payload behind them."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch
from disagg.common.messages import decode
from disagg.transfer.base import gather_pages, wide_pages
from disagg.transfer.layout import KVLayout
from disagg.transfer.protocol import KVChunkMsg
from disagg.transfer.ucx import PAYLOAD_ALIGN, Peer, control_frame


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("heads", [(0, 4), (1, 3), (3, 4)])  # all local heads, or a TP head slice
def test_both_gather_paths_copy_the_same_bytes(dtype: torch.dtype, heads: tuple[int, int]) -> None:
    layout = KVLayout(3, 4, 4, 8, str(dtype).removeprefix("torch."))
    pool = torch.randn(layout.pool_shape(20)).to(dtype)
    pool.view(torch.int16 if dtype == torch.bfloat16 else torch.int32)[0, 0, 0, 0, 0, 0] = -1  # a NaN
    pages = torch.tensor([7, 0, 19, 3, 3, 12])
    src = pool[:, :, :, :, heads[0] : heads[1]]
    whole = heads == (0, layout.num_local_heads)
    expected = src[:, pages].contiguous()
    for use_gather in (True, False):
        out = torch.empty_like(expected)
        gather_pages(wide_pages(src, whole), pages, wide_pages(out, whole), use_gather=use_gather)
        assert torch.equal(out.view(torch.uint8), expected.view(torch.uint8)), f"use_gather={use_gather}"


class _LoopbackEndpoint:
    """Hands the last frame sent to the next receive (what a UCX endpoint pair does)."""

    def __init__(self) -> None:
        self.frames: list[np.ndarray] = []

    async def send(self, buf, tag) -> None:
        self.frames.append(np.array(buf, dtype=np.uint8, copy=True))

    async def recv(self, buf, tag) -> None:
        frame = self.frames.pop(0)
        buf[: len(frame)] = frame


def test_control_frames_carry_an_aligned_payload_behind_the_message() -> None:
    ep = _LoopbackEndpoint()
    peer = Peer(ep, "loopback", lambda *a: None, lambda *a: None)
    msg = KVChunkMsg(room=5, page_offset=2, num_pages=1, head_start=0, head_end=1, nbytes=96, tag=3,
                     num_chunks=1, metadata={"first_token": 42})  # fmt: skip
    head, offset = control_frame(msg, 96)
    assert offset % PAYLOAD_ALIGN == 0 and len(head) == offset  # head: lengths, message, padding
    payload = torch.arange(24, dtype=torch.float32)
    frame = torch.zeros(offset + 96, dtype=torch.uint8)
    frame[: len(head)] = torch.frombuffer(bytearray(head), dtype=torch.uint8)
    frame[offset:] = payload.view(torch.uint8)

    async def roundtrip():
        await peer.send_frame(frame)
        first = await peer._recv_control()
        await peer.send_msg(KVChunkMsg(6, 0, 1, 0, 1, 96, 4))  # no payload
        return first, await peer._recv_control()

    (raw, got), (raw2, none) = asyncio.run(roundtrip())
    assert decode(raw) == msg and got.ctypes.data % PAYLOAD_ALIGN == 0
    assert torch.equal(torch.from_numpy(got).view(torch.float32), payload)
    assert decode(raw2).room == 6 and none is None
