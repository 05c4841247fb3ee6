"""Router overhead benchmark: added latency (p50, p99) and max request rate, against calling the fake
workers directly and against SGLang's router (`sglang-router` on PyPI) on the same fake workers.

    python -m disagg.router.bench [--mode regular|pd|both] [--requests 2000] [--seconds 5] [--concurrency 32]
                                  [--repeat 3]

Each router runs pinned to one CPU (--router-cpu), the client and the fake workers to the others, so
both routers get the same CPU count. The client is a raw asyncio HTTP/1.1 keep-alive client, light
enough not to be the bottleneck of a Python router; its own cost is in the "direct" row.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import sys
import time

from disagg.router.testing import Process, fake_worker, free_port, router

BODY = b'{"text": "The capital of France is", "sampling_params": {"max_new_tokens": 8, "temperature": 0}}'


def _request(host: str, port: int) -> bytes:
    return (
        f"POST /generate HTTP/1.1\r\nHost: {host}:{port}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(BODY)}\r\n\r\n"
    ).encode() + BODY


async def _read_response(reader: asyncio.StreamReader) -> int:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    lower = head.lower()
    if b"transfer-encoding: chunked" in lower:
        while True:
            size = int((await reader.readuntil(b"\r\n")).strip().split(b";")[0], 16)
            await reader.readexactly(size + 2)
            if size == 0:
                return status
    start = lower.index(b"content-length:") + 15
    length = int(lower[start : lower.index(b"\r\n", start)])
    await reader.readexactly(length)
    return status


async def _connection(
    url: str, deadline: float, limit: int | None, latencies: list[float], errors: list[int]
):
    host, port = url.split("//")[1].split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    request = _request(host, int(port))
    try:
        while time.perf_counter() < deadline and (limit is None or len(latencies) < limit):
            t0 = time.perf_counter()
            writer.write(request)
            status = await _read_response(reader)
            latencies.append(time.perf_counter() - t0)
            if status != 200:
                errors.append(status)
    finally:
        writer.close()


async def measure_latency(url: str, n: int) -> tuple[float, float, list[int]]:
    latencies: list[float] = []
    errors: list[int] = []
    await _connection(url, time.perf_counter() + 120, n, latencies, errors)
    q = statistics.quantiles(latencies, n=100)
    return q[49] * 1e3, q[98] * 1e3, errors


async def measure_rate(url: str, seconds: float, concurrency: int) -> tuple[float, list[int]]:
    latencies: list[float] = []
    errors: list[int] = []
    t0 = time.perf_counter()
    deadline = t0 + seconds
    await asyncio.gather(*(_connection(url, deadline, None, latencies, errors) for _ in range(concurrency)))
    return len(latencies) / (time.perf_counter() - t0), errors


def _pin(proc: Process, cpus: str | None) -> Process:
    if cpus and shutil.which("taskset"):
        proc.argv = ["taskset", "-c", cpus, *proc.argv]
    return proc


def _sglang_router(args: list[str], cpus: str | None) -> Process:
    port = free_port()
    argv = [
        sys.executable,
        "-m",
        "sglang_router.launch_router",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--prometheus-port",
        str(free_port()),
        "--log-level",
        "error",
        *args,
    ]
    return _pin(Process(argv, f"http://127.0.0.1:{port}", ready_path="/health"), cpus)


def run_mode(mode: str, args: argparse.Namespace) -> list[tuple]:
    other_cpus = args.client_cpus
    workers = [_pin(fake_worker(name, record=False), other_cpus) for name in ("prefill", "decode")]
    rows = []
    try:
        for w in workers:
            w.start()
        target = workers[1]
        if mode == "pd":
            worker_args = ["--pd-disaggregation", "--prefill", workers[0].url, "--decode", workers[1].url]
        else:
            worker_args = ["--worker-urls", workers[1].url]
        common = ["--policy", args.policy]
        candidates = [
            ("direct (no router)", None),
            ("disagg router", _pin(router(worker_args + common + ["--log-level", "warn"]), args.router_cpu)),
        ]
        if not args.skip_sglang:
            candidates.append(("sglang-router 0.3.2", _sglang_router(worker_args + common, args.router_cpu)))
        results: dict[str, list[tuple]] = {name: [] for name, _ in candidates}
        for _ in range(args.repeat):  # interleaved, so load drift on a shared machine hits all alike
            for name, proc in candidates:
                results[name].append(_measure(proc, target.url, args))
        for name, runs in results.items():
            p50, p99, rate = (statistics.median(r[i] for r in runs) for i in range(3))
            rates = sorted(r[2] for r in runs)
            rows.append((mode, name, p50, p99, rate, rates[0], rates[-1], sum(r[3] for r in runs)))
    finally:
        for w in workers:
            w.stop()
    return rows


def _measure(proc: Process | None, direct_url: str, args: argparse.Namespace) -> tuple:
    url = direct_url
    if proc is not None:
        proc.start(timeout=60)
        url = proc.url
    try:
        asyncio.run(measure_latency(url, min(200, args.requests)))  # warm up
        p50, p99, lat_errors = asyncio.run(measure_latency(url, args.requests))
        rate, rate_errors = asyncio.run(measure_rate(url, args.seconds, args.concurrency))
    finally:
        if proc is not None:
            proc.stop()
    return p50, p99, rate, len(lat_errors) + len(rate_errors)


def print_table(rows: list[tuple]) -> None:
    direct = {r[0]: r for r in rows if r[1].startswith("direct")}
    print("| mode | target | p50 ms | p99 ms | added p50 ms | added p99 ms | max req/s (min-max) | errors |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for mode, name, p50, p99, rate, rate_lo, rate_hi, errors in rows:
        base = direct[mode]
        added50 = f"{p50 - base[2]:.3f}" if name != base[1] else "-"
        added99 = f"{p99 - base[3]:.3f}" if name != base[1] else "-"
        print(
            f"| {mode} | {name} | {p50:.3f} | {p99:.3f} | {added50} | {added99} | "
            f"{rate:.0f} ({rate_lo:.0f}-{rate_hi:.0f}) | {errors} |"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mode", default="both", choices=["regular", "pd", "both"])
    parser.add_argument(
        "--requests", type=int, default=2000, help="sequential requests for the latency figures"
    )
    parser.add_argument("--seconds", type=float, default=5.0, help="length of the max-rate run")
    parser.add_argument("--concurrency", type=int, default=32, help="connections in the max-rate run")
    parser.add_argument("--policy", default="round_robin")
    parser.add_argument("--repeat", type=int, default=3, help="interleaved rounds; medians are reported")
    ncpu = os.cpu_count() or 1
    parser.add_argument(
        "--router-cpu",
        default=str(ncpu - 1) if ncpu > 1 else None,
        help="CPU list the router is pinned to (taskset -c); empty: no pinning",
    )
    parser.add_argument(
        "--client-cpus",
        default=f"0-{ncpu - 2}" if ncpu > 1 else None,
        help="CPU list for the fake workers (the client runs unpinned)",
    )
    parser.add_argument("--skip-sglang", action="store_true")
    args = parser.parse_args(argv)
    if args.client_cpus and shutil.which("taskset"):
        os.sched_setaffinity(0, {int(c) for c in _cpu_list(args.client_cpus)})
    modes = ["regular", "pd"] if args.mode == "both" else [args.mode]
    rows = [row for mode in modes for row in run_mode(mode, args)]
    print(
        f"cpus: {ncpu}, router pinned to: {args.router_cpu}, client+workers on: {args.client_cpus}, "
        f"requests: {args.requests}, rate run: {args.seconds}s x {args.concurrency} connections"
    )
    print_table(rows)


def _cpu_list(spec: str) -> list[int]:
    out = []
    for part in spec.split(","):
        lo, _, hi = part.partition("-")
        out.extend(range(int(lo), int(hi or lo) + 1))
    return out


if __name__ == "__main__":
    main()
