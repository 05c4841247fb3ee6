"""Benchmark: KV transfer throughput/latency vs a raw ucxx send of one buffer (the ceiling).

    python -m disagg.transfer.bench                         # CPU, up to 256 MiB
    python -m disagg.transfer.bench --device cuda           # prefill on cuda:0, decode on cuda:1 (or cuda:0)
    python -m disagg.transfer.bench --device cuda --quick   # 64K, 64M, 256M, 1G + the 8B request, 5 iters
    python -m disagg.transfer.bench --sizes 64K,1M --skip-8b --iters 50   # the fixed costs, on the CPU
    python -m disagg.transfer.bench --sizes 64K,64M --skip-8b --trace     # + when rooms pass each hop
    python -m disagg.transfer.bench --transport direct      # same host: copies into the decode's pool
    python -m disagg.transfer.bench --sizes 64K,4M --skip-8b --busy-thread   # beside a busy scheduler thread

With --transport direct (what two servers of one host use: transfer/direct.py) the ceiling beside
each row is also a device copy of the same pages inside one process ("copy ms").

This process is the prefill side (KVSender); a spawned process is the decode side (KVReceiver).
Latency is measured here, from send() to the room's success in poll() (which needs the decode's
ack after its scatter), and for the raw ceiling from ep.send() to a 1-byte ack. Pages are scattered.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import statistics
import threading
import time
from typing import Any

import torch
from disagg.common.config import set_transfer_trace
from disagg.common.shm import shareable_zeros
from disagg.transfer import base
from disagg.transfer.direct import copy_pages
from disagg.transfer.layout import KVLayout
from disagg.transfer.sender import default_max_message_bytes
from disagg.transfer.testing import wait_results

MiB = 1 << 20
# one 64 KiB page per message unit: 32 layers x 1 token x 8 heads x 64 dims x K,V x bf16
SWEEP_LAYOUT = KVLayout(32, 1, 8, 64, "bfloat16", model_name="bench")
# Llama-3.1-8B: 32 layers, 8 KV heads, head_dim 128, bf16 = 128 KiB per token; page_size 16
LLAMA8B_LAYOUT = KVLayout(32, 16, 8, 128, "bfloat16", model_name="bench")
LLAMA8B_TOKENS = 2048


def page_bytes(layout: KVLayout) -> int:
    return layout.num_layers * 2 * layout.page_size * layout.num_local_heads * layout.head_dim * 2


def _decode_pool(layout: KVLayout, pages: int, device: str, direct: bool) -> torch.Tensor:
    if direct and device == "cpu":
        return shareable_zeros(layout.pool_shape(pages), torch.bfloat16)
    return torch.zeros(layout.pool_shape(pages), dtype=torch.bfloat16, device=device)


def decode_main(device: str, sweep_pages: int, llama_pages: int, conn: Any, direct: bool = False) -> None:
    """The decode process: receivers for both layouts, a raw listener, commands over `conn`."""
    import ucxx
    from disagg.transfer.receiver import KVReceiver

    sweep = KVReceiver(
        _decode_pool(SWEEP_LAYOUT, sweep_pages, device, direct), SWEEP_LAYOUT, allow_direct=direct
    )
    llama = KVReceiver(
        _decode_pool(LLAMA8B_LAYOUT, llama_pages, device, direct), LLAMA8B_LAYOUT, allow_direct=direct
    )
    raw_eps: list[Any] = []
    listener = sweep.ucx.run_sync(lambda: ucxx.create_listener(lambda ep: raw_eps.append(ep)))
    conn.send(listener.port)
    failures: list[Any] = []
    bootstrap_ports: dict[str, int] = {}

    done_at: dict[int, float] = {}  # room -> time.monotonic() (system-wide) when poll() said ok

    def drain(receiver: Any) -> None:  # woken by the receiver as soon as a room finishes
        while True:
            receiver.wait(1.0)
            for r in receiver.poll():
                if r.ok:
                    done_at[r.room] = time.monotonic()
                    base.trace(r.room, "decode_poll")
                else:
                    failures.append(r)

    for receiver in (sweep, llama):
        threading.Thread(target=drain, args=(receiver,), daemon=True).start()
    while True:
        cmd, *args = conn.recv()
        if cmd == "expect":
            which, room, pages = args
            (sweep if which == "sweep" else llama).expect(room, "127.0.0.1", bootstrap_ports[which], pages)
            conn.send("ok")
        elif cmd == "ports":
            bootstrap_ports.update(args[0])
            conn.send("ok")
        elif cmd == "raw":
            buf = torch.empty(args[0], dtype=torch.uint8, device=device)
            sweep.ucx.call(_raw_recv(raw_eps[0], buf, conn))
        elif cmd == "when":
            deadline = time.monotonic() + 30
            while args[0] not in done_at and time.monotonic() < deadline:
                time.sleep(0.0001)
            conn.send(done_at.pop(args[0], float("nan")))
        elif cmd == "trace":
            conn.send(base.take_trace())
        elif cmd == "stop":
            conn.send([f.reason for f in failures])
            return


async def _raw_recv(ep: Any, buf: torch.Tensor, conn: Any) -> None:
    import numpy as np

    recv = asyncio.ensure_future(ep.recv(buf if buf.is_cuda else buf.numpy(), tag=77))
    await asyncio.sleep(0)
    conn.send("ready")
    await recv
    await ep.send(np.ones(1, dtype=np.uint8), tag=78)


async def _raw_send(ep: Any, buf: torch.Tensor) -> float:
    import numpy as np

    ack = np.zeros(1, dtype=np.uint8)
    start = time.perf_counter()
    await ep.send(buf if buf.is_cuda else buf.numpy(), tag=77)
    await ep.recv(ack, tag=78)
    return time.perf_counter() - start


class Bench:
    def __init__(
        self, device: str, decode_device: str, max_bytes: int, max_message_bytes: int, direct: bool = False
    ) -> None:
        from disagg.transfer.sender import KVSender

        self.device = device
        self.sweep_pages = max_bytes // page_bytes(SWEEP_LAYOUT)
        self.llama_pages = LLAMA8B_TOKENS // 16 + 8
        self.sweep = KVSender(
            self._pool(SWEEP_LAYOUT, self.sweep_pages),
            SWEEP_LAYOUT,
            "127.0.0.1",
            0,
            host="127.0.0.1",
            max_message_bytes=max_message_bytes,
        )
        self.llama = KVSender(
            self._pool(LLAMA8B_LAYOUT, self.llama_pages),
            LLAMA8B_LAYOUT,
            "127.0.0.1",
            0,
            host="127.0.0.1",
            max_message_bytes=max_message_bytes,
        )
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(
            target=decode_main,
            args=(decode_device, self.sweep_pages, self.llama_pages, child, direct),
            daemon=True,
        )
        self.proc.start()
        raw_port = self.conn.recv()
        self._ask("ports", {"sweep": self.sweep.bootstrap_port, "llama": self.llama.bootstrap_port})
        import ucxx

        self.raw_ep = self.sweep.ucx.call(ucxx.create_endpoint("127.0.0.1", raw_port))
        self.room = 0

    def _pool(self, layout: KVLayout, pages: int) -> torch.Tensor:
        return torch.randn(layout.pool_shape(pages), device=self.device).to(torch.bfloat16)

    def _ask(self, *cmd: Any) -> Any:
        self.conn.send(cmd)
        return self.conn.recv()

    def transfer(self, which: str, num_pages: int, num_chunks: int = 1) -> tuple[float, float]:
        """One room of num_pages scattered pages, sent in num_chunks chunks: seconds until the
        prefill's poll() says ok (decode acked) and until the decode's poll() says ok."""
        sender, pool_pages = (
            (self.sweep, self.sweep_pages) if which == "sweep" else (self.llama, self.llama_pages)
        )
        self.room += 1
        src = torch.randperm(pool_pages)[:num_pages].tolist()
        dst = torch.randperm(pool_pages)[:num_pages].tolist()
        self._ask("expect", which, self.room, dst)
        self._wait_for_request(sender, self.room)  # during a real prefill it arrives long before
        bounds = [round(i * num_pages / num_chunks) for i in range(num_chunks + 1)]
        start, start_mono = time.perf_counter(), time.monotonic()
        for i in range(num_chunks):
            last = i == num_chunks - 1
            sender.send(
                self.room,
                src[bounds[i] : bounds[i + 1]],
                bounds[i],
                is_last=last,
                metadata={"t": 1} if last else None,
            )
        result = wait_results(sender, {self.room}, 120)[self.room]
        prefill_s = time.perf_counter() - start
        base.trace(self.room, "prefill_poll")
        if not result.ok:
            raise RuntimeError(f"transfer failed: {result.reason}")
        return prefill_s, self._ask("when", self.room) - start_mono

    @staticmethod
    def _wait_for_request(sender: Any, room: int) -> None:
        def arrived() -> bool:
            state = sender.rooms.get(room)
            return state is not None and bool(state.requests)

        while not sender.ucx.run_sync(arrived):
            time.sleep(0.0002)

    def copy(self, which: str, num_pages: int) -> float:
        """The ceiling of the direct path: the same scattered pages copied pool to pool in this process."""
        sender, pool_pages = (
            (self.sweep, self.sweep_pages) if which == "sweep" else (self.llama, self.llama_pages)
        )
        if getattr(sender, "_copy_dst", None) is None:
            sender._copy_dst = torch.zeros_like(sender.kv_buffer)
        src = torch.randperm(pool_pages)[:num_pages].to(self.device)
        dst = torch.randperm(pool_pages)[:num_pages].to(self.device)
        heads = (0, sender.kv_buffer.shape[4])
        if self.device != "cpu":
            torch.cuda.synchronize(self.device)
        start = time.perf_counter()
        copy_pages(sender.kv_buffer, src, heads, sender._copy_dst, dst, heads)
        if self.device != "cpu":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - start

    def raw(self, nbytes: int) -> float:
        buf = torch.ones(nbytes, dtype=torch.uint8, device=self.device)
        self.conn.send(("raw", nbytes))
        assert self.conn.recv() == "ready"
        return self.sweep.ucx.call(_raw_send(self.raw_ep, buf))

    def take_trace(self) -> dict[int, dict[str, float]]:
        """Both sides' hops of the rooms since the last call (with --trace)."""
        hops = base.take_trace()
        for room, theirs in self._ask("trace").items():
            hops.setdefault(room, {}).update(theirs)
        return hops

    def close(self) -> list[str]:
        failures = self._ask("stop")
        self.proc.join(timeout=10)
        if self.proc.is_alive():
            self.proc.kill()
        self.sweep.close()
        self.llama.close()
        return failures


def _median(fn: Any, iters: int) -> Any:
    fn()  # warm-up (connection, registration caches)
    runs = [fn() for _ in range(iters)]
    if isinstance(runs[0], tuple):
        return tuple(statistics.median(r[i] for r in runs) for i in range(len(runs[0])))
    return statistics.median(runs)


def _fmt_row(name: str, nbytes: int, engine: tuple[float, float], raw_s: float, copy_s: float | None) -> str:
    prefill_s, decode_s = engine
    row = (
        f"{name:>22} {nbytes / MiB:9.2f} {decode_s * 1e3:10.3f} {prefill_s * 1e3:10.3f} {nbytes / decode_s / 1e9:9.2f}"
        f" {raw_s * 1e3:9.3f} {nbytes / raw_s / 1e9:9.2f} {raw_s / decode_s * 100:8.0f}%"
    )
    if copy_s is not None:
        row += f" {copy_s * 1e3:9.3f} {copy_s / decode_s * 100:8.0f}%"
    return row


def print_trace(name: str, hops: dict[int, dict[str, float]]) -> None:
    """Median time of each hop after send(), over the rooms (the warm-up's included)."""
    since: dict[str, list[float]] = {}
    for room_hops in hops.values():
        t0 = room_hops.get("send")
        if t0 is None:
            continue
        for hop, t in room_hops.items():
            since.setdefault(hop, []).append((t - t0) * 1e3)
    cells = sorted((statistics.median(v), hop) for hop, v in since.items())
    print(f"  trace {name}: " + "  ".join(f"{hop} {ms:.3f}" for ms, hop in cells), flush=True)


def parse_size(text: str) -> int:
    """'64K', '256M', '1G' (binary units) or plain bytes."""
    units = {"K": 1 << 10, "M": MiB, "G": 1 << 30}
    text = text.strip().upper().removesuffix("IB").removesuffix("B")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def sweep_sizes(args: argparse.Namespace) -> list[int]:
    if args.sizes:
        return [parse_size(s) for s in args.sizes.split(",")]
    if args.quick:
        return [s for s in (64 << 10, 64 * MiB, 256 * MiB, 1024 * MiB) if s <= args.max_size_mib * MiB]
    sizes, size = [], 64 << 10
    while size <= args.max_size_mib * MiB:
        sizes.append(size)
        size *= 4
    return sizes


def _spin(stop: threading.Event) -> None:
    """Hold the GIL as much as a Python thread can until `stop` (--busy-thread)."""
    while not stop.is_set():
        sum(range(100))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument(
        "--max-size-mib", type=int, default=None, help="largest message (default: 256 on cpu, 1024 on cuda)"
    )
    parser.add_argument("--sizes", default="", help="message sizes instead of the sweep, e.g. 64K,1M,64M")
    parser.add_argument(
        "--iters", type=int, default=None, help="timed iterations per size (median; default 5)"
    )
    parser.add_argument("--max-message-mib", type=int, default=None,
                        help="KVSender max_message_bytes (default: the KVSender's for the device)")  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="64K, 64M, 256M, 1G and the 8B request, 5 iters")
    parser.add_argument("--skip-8b", action="store_true", help="no 8B 2k-token request rows")
    parser.add_argument("--transport", default="ucx", choices=["ucx", "direct"],
                        help="direct: the decode offers its pool and the prefill copies into it (one host)")  # fmt: skip
    parser.add_argument("--busy-thread", action="store_true",
                        help="a Python thread spinning in this (the prefill's) process meanwhile, as a scheduler "
                             "thread launching kernels holds the GIL (transfer/ucx.py, GIL_SWITCH_INTERVAL_S)")  # fmt: skip
    parser.add_argument("--trace", action="store_true",
                        help="also print the median ms after send() at which rooms pass each hop")  # fmt: skip
    args = parser.parse_args(argv)
    if args.trace:  # before the decode process spawns: it inherits the environment
        set_transfer_trace()
        base.TRACE = True
    stop_busy = threading.Event()
    if args.busy_thread:
        threading.Thread(target=_spin, args=(stop_busy,), daemon=True, name="busy").start()
    args.max_size_mib = args.max_size_mib or (1024 if args.device == "cuda" else 256)
    iters = args.iters or 5
    sizes = sweep_sizes(args)
    device, decode_device = "cpu", "cpu"
    if args.device == "cuda":
        device, decode_device = "cuda:0", "cuda:1" if torch.cuda.device_count() > 1 else "cuda:0"
    max_message = args.max_message_mib * MiB if args.max_message_mib else default_max_message_bytes(device)
    direct = args.transport == "direct"
    bench = Bench(device, decode_device, max(sizes, default=MiB), max_message, direct)
    print(f"prefill on {device}, decode on {decode_device}; median of {iters} (x4 below 64 MiB); "
          f"pages scattered; transport {args.transport}; max message {max_message // MiB} MiB")  # fmt: skip
    print("decode ms: send() until the decode's poll() has the room; prefill ms: until the prefill's poll()")
    print(
        "(after the decode's ack); GB/s and '% of raw' from decode ms; raw: one ucxx tag message + 1-byte ack"
    )
    head = ("transfer", "MiB", "decode ms", "prefill ms", "GB/s", "raw ms", "raw GB/s", "% of raw")
    head += ("copy ms", "% of copy") if direct else ()
    print(("{:>22} {:>9} {:>10} {:>10}" + " {:>9}" * (len(head) - 4)).format(*head))
    if direct:
        print("copy ms: the same scattered pages copied pool to pool inside this process (the ceiling)")
    try:
        for size in sizes:
            pages = max(1, size // page_bytes(SWEEP_LAYOUT))
            n = iters if size >= 64 * MiB else iters * 4
            engine_s = _median(lambda p=pages: bench.transfer("sweep", p), n)
            hops = bench.take_trace()
            raw_s = _median(lambda s=size: bench.raw(s), n)
            copy_s = _median(lambda p=pages: bench.copy("sweep", p), n) if direct else None
            print(_fmt_row("message", size, engine_s, raw_s, copy_s), flush=True)
            if args.trace:
                print_trace("message", hops)
        if not args.skip_8b:
            llama_bytes = LLAMA8B_TOKENS * page_bytes(LLAMA8B_LAYOUT) // 16
            raw_s = _median(lambda: bench.raw(llama_bytes), iters)
            copy_s = _median(lambda: bench.copy("llama", LLAMA8B_TOKENS // 16), iters) if direct else None
            for chunks in (1, 4):
                engine_s = _median(lambda c=chunks: bench.transfer("llama", LLAMA8B_TOKENS // 16, c), iters)
                hops = bench.take_trace()
                name = f"8B 2k tok, {chunks} chunk{'s' * (chunks > 1)}"
                print(_fmt_row(name, llama_bytes, engine_s, raw_s, copy_s), flush=True)
                if args.trace:
                    print_trace(name, hops)
    finally:
        stop_busy.set()
        failures = bench.close()
    if failures:
        print(f"decode-side failures: {failures}")


if __name__ == "__main__":
    main()
