"""Helpers for the transfer tests and benchmark: random KV pools, request plans, rank processes.

A "server" here is a set of rank processes that each own one KVSender or KVReceiver. All ranks
of a fleet derive their pools from one seeded full-head pool, so a test can recompute what any
destination page must hold.
"""

from __future__ import annotations

import io
import random
import time
from dataclasses import dataclass
from typing import Any

import torch
from disagg.transfer.base import TransferBase, TransferResult
from disagg.transfer.layout import KVLayout


@dataclass
class RequestPlan:
    room: int
    src_pages: list[int]  # prefill pool pages, token order
    dst_pages: list[int]  # decode pool pages, token order
    chunks: list[tuple[int, int]]  # (page_offset, num_pages) in send order; the last is is_last


def full_pool(layout: KVLayout, num_pages: int, seed: int) -> torch.Tensor:
    """The pool as if TP and PP were 1: [layers, pages, 2, page_size, num_kv_heads_total, head_dim]."""
    gen = torch.Generator().manual_seed(seed)
    full = KVLayout(**{**layout.__dict__, "tp_rank": 0, "tp_size": 1, "layer_start": 0, "layer_end": 0})
    return torch.randn(full.pool_shape(num_pages), generator=gen).to(layout.torch_dtype)


def rank_slice(full: torch.Tensor, layout: KVLayout) -> torch.Tensor:
    lo, hi = layout.head_range
    start, end = layout.layer_range  # a pipeline stage's layers
    return full[start:end, :, :, :, lo:hi].contiguous()


def make_requests(
    num_requests: int, prefill_pages: int, decode_pages: int, max_pages: int, seed: int, room_base: int = 1000
) -> list[RequestPlan]:
    """Requests of mixed lengths on scattered, disjoint pages on both sides, in random chunks."""
    rng = random.Random(seed)
    src_free, dst_free = (
        rng.sample(range(prefill_pages), prefill_pages),
        rng.sample(range(decode_pages), decode_pages),
    )
    plans = []
    for i in range(num_requests):
        n = rng.randint(1, max_pages)
        src, dst = [src_free.pop() for _ in range(n)], [dst_free.pop() for _ in range(n)]
        chunks, offset = [], 0
        while offset < n:
            size = min(n - offset, rng.randint(1, max(1, n // 2)))
            chunks.append((offset, size))
            offset += size
        plans.append(RequestPlan(room_base + i, src, dst, chunks))
    return plans


def wait_results(
    engine: TransferBase, rooms: set[int], timeout_s: float, interval_s: float = 0.1
) -> dict[int, TransferResult]:
    """Poll until every room in `rooms` is reported (or timeout_s passes), waking up as soon as
    the engine has a result."""
    results: dict[int, TransferResult] = {}
    deadline = time.monotonic() + timeout_s
    while not rooms <= results.keys() and time.monotonic() < deadline:
        for r in engine.poll():
            assert r.room not in results, f"room {r.room} reported twice"
            results[r.room] = r
        if not rooms <= results.keys():
            engine.wait(min(interval_s, max(0.0, deadline - time.monotonic())))
    return results


def result_summary(results: dict[int, TransferResult]) -> dict[int, tuple[bool, str, dict[str, Any]]]:
    return {room: (r.ok, r.reason, r.metadata) for room, r in results.items()}


def tensor_bytes(t: torch.Tensor) -> bytes:
    buf = io.BytesIO()
    torch.save(t, buf)
    return buf.getvalue()


def tensor_from_bytes(data: bytes) -> torch.Tensor:
    return torch.load(io.BytesIO(data))


def prefill_rank_main(
    layout: KVLayout,
    bootstrap_port: int,
    num_pages: int,
    seed: int,
    plans: list[RequestPlan],
    out: Any,
    stop: Any,
    timeout_s: float,
    device: str = "cpu",
    max_message_bytes: int = 32 << 20,
    inline_data_bytes: int | None = None,  # None: the sender's default; 0: every chunk as header + data
) -> None:
    """A prefill rank: send every plan chunk by chunk, report every room's result on `out`, then
    stay up until `stop` is set (decode ranks connect to every prefill rank of the server)."""
    from disagg.transfer.sender import KVSender

    pool = rank_slice(full_pool(layout, num_pages, seed), layout).to(device)
    sender = KVSender(
        pool,
        layout,
        "127.0.0.1",
        bootstrap_port,
        serve_bootstrap=False,
        max_message_bytes=max_message_bytes,
        host="127.0.0.1",
        timeout_s=timeout_s,
    )
    if inline_data_bytes is not None:
        sender.inline_data_bytes = inline_data_bytes
    for plan in plans:
        for i, (offset, n) in enumerate(plan.chunks):
            last = i == len(plan.chunks) - 1
            meta = {"first_token": plan.room * 7} if last else None
            sender.send(plan.room, plan.src_pages[offset : offset + n], offset, is_last=last, metadata=meta)
    results = wait_results(sender, {p.room for p in plans}, timeout_s * 4)
    out.put(("prefill", layout.rank, result_summary(results), sender.num_active_rooms(), None, None))
    stop.wait(timeout_s * 4)
    sender.close()


def decode_rank_main(
    layout: KVLayout,
    bootstrap_port: int,
    num_pages: int,
    sentinel: float,
    plans: list[RequestPlan],
    out: Any,
    timeout_s: float,
    device: str = "cpu",
    direct: bool = False,
) -> None:
    """A decode rank: expect every plan into a sentinel-filled pool; report results and the pool.
    `direct`: offer the pool to same-host prefill ranks (they copy into it; else UCX moves the bytes)."""
    from disagg.common.shm import shareable_zeros
    from disagg.transfer.receiver import KVReceiver

    if direct and device == "cpu":
        pool = shareable_zeros(layout.pool_shape(num_pages), layout.torch_dtype).fill_(sentinel)
    else:
        pool = torch.full(layout.pool_shape(num_pages), sentinel, dtype=layout.torch_dtype, device=device)
    receiver = KVReceiver(pool, layout, timeout_s=timeout_s, allow_direct=direct)
    for plan in plans:
        receiver.expect(plan.room, "127.0.0.1", bootstrap_port, plan.dst_pages)
    results = wait_results(receiver, {p.room for p in plans}, timeout_s * 4)
    out.put(
        (
            "decode",
            layout.tp_rank,
            result_summary(results),
            receiver.num_active_rooms(),
            tensor_bytes(pool.cpu()),
            receiver.ucx.run_sync(lambda: sum(p.direct for p in receiver.peers)),
        )
    )
    receiver.close()


def scripted_prefill_main(layout: KVLayout, num_pages: int, seed: int, sends: list[tuple], out: Any) -> None:
    """A prefill rank that serves its own bootstrap, makes the given send() calls
    (room, src_pages, page_offset, is_last), says so, then idles until killed."""
    from disagg.transfer.sender import KVSender

    pool = rank_slice(full_pool(layout, num_pages, seed), layout)
    sender = KVSender(pool, layout, "127.0.0.1", 0, host="127.0.0.1", timeout_s=60)
    out.put(("bootstrap_port", sender.bootstrap_port))
    for room, pages, offset, is_last in sends:
        sender.send(room, pages, offset, is_last=is_last, metadata={"first_token": 1})
    out.put(("sent", None))
    time.sleep(600)


def scripted_decode_main(
    layout: KVLayout, bootstrap_port: int, num_pages: int, expects: list[tuple], out: Any
) -> None:
    """A decode rank that expects the given rooms (room, dst_pages), says so, then idles until killed."""
    from disagg.transfer.receiver import KVReceiver

    receiver = KVReceiver(
        torch.zeros(layout.pool_shape(num_pages), dtype=layout.torch_dtype), layout, timeout_s=60
    )
    receiver.connect("127.0.0.1", bootstrap_port)
    for room, pages in expects:
        receiver.expect(room, "127.0.0.1", bootstrap_port, pages)
    out.put(("expecting", None))
    time.sleep(600)
