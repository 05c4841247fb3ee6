"""Soak the failure contract: many requests through router + 1 prefill + 2 decodes, a share of them
abandoned by their clients mid-stream, one decode SIGKILLed half-way. The requests take turns on
the streamed routes: /generate, /v1/chat/completions, /v1/completions (all of them move to the other
decode when theirs dies). Afterwards every surviving
server must hold no request page and no open room, and its memory must be flat.

    python -m disagg.common.bench.soak --requests 1000 --abort-share 0.2

Prints one table: how each request ended (finished / abandoned by its client / error event /
silently cut: must be 0), the pages and rooms left on each surviving server, and the memory (RSS of
each server's process group) after the warm-up and at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil
from disagg.common.bench.pd_sweep import Child, Deployment, signal_group
from disagg.common.config import env_cpu_threads
from disagg.common.net import free_port

PROMPTS = ["The capital of France is", "Write a haiku about the sea.", "List three prime numbers:",
           "Explain what a KV cache is in one sentence.", "Once upon a time"]  # fmt: skip


def children(args: argparse.Namespace) -> list[Child]:
    py, env = sys.executable, env_cpu_threads(1)
    flags = [
        "--max-total-tokens",
        str(args.max_total_tokens),
        "--context-length",
        "512",
        "--log-level",
        "warning",
    ]
    bootstrap, p_port, d_ports = free_port(), free_port(), [free_port(), free_port()]
    prefill = Child("prefill", [py, "-m", "disagg.prefill.launch", "--port", str(p_port),
                                "--disaggregation-bootstrap-port", str(bootstrap), *flags],
                    f"http://127.0.0.1:{p_port}/health", env)  # fmt: skip
    decodes = [Child(f"decode{i}", [py, "-m", "disagg.decode.launch", "--port", str(port), *flags],
                     f"http://127.0.0.1:{port}/health", env) for i, port in enumerate(d_ports)]  # fmt: skip
    legs = ["--pd-disaggregation", "--prefill", f"http://127.0.0.1:{p_port}", str(bootstrap)]
    for d in decodes:
        legs += ["--decode", d.ready_url.removesuffix("/health")]
    port = free_port()
    router = Child("router", [py, "-m", "disagg.router.launch_router", "--host", "127.0.0.1", "--port", str(port),
                              "--log-level", args.router_log_level, *legs], f"http://127.0.0.1:{port}/readiness", env)  # fmt: skip
    return [prefill, *decodes, router]


def request_for(route: str, i: int) -> tuple[str, dict]:
    """(path, body) of the i-th request: 24 greedy tokens on one of the streamed routes."""
    text = PROMPTS[i % len(PROMPTS)]
    if route == "chat":
        return "/v1/chat/completions", {"messages": [{"role": "user", "content": text}], "max_tokens": 24,
                                        "temperature": 0, "stream": True}  # fmt: skip
    if route == "completions":
        return "/v1/completions", {"prompt": text, "max_tokens": 24, "temperature": 0, "stream": True}
    return "/generate", {
        "text": text,
        "stream": True,
        "sampling_params": {"max_new_tokens": 24, "temperature": 0},
    }


async def one_request(client: httpx.AsyncClient, i: int, abandon: bool, route: str) -> str:
    """Stream one request; how it ended: finished, abandoned, error, cut."""
    path, body = request_for(route, i)
    events = 0
    try:
        async with client.stream("POST", path, json=body) as r:
            if r.status_code != 200:
                return f"status {r.status_code}"
            async for line in r.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    return "finished"
                if "error" in json.loads(data):
                    return "error"
                events += 1
                if abandon and events >= 1 + i % 3:
                    return "abandoned"  # the client goes away mid-stream: the connection closes here
    except httpx.HTTPError as e:
        return f"transport {type(e).__name__}"
    return "cut"  # the stream ended with neither [DONE] nor an error event: the contract's one sin


def group_rss_mb(child: Child) -> float:
    total = 0
    for p in psutil.process_iter(["pid"]):
        try:
            if os.getpgid(p.pid) == child.proc.pid:  # the server started its own process group
                total += p.memory_info().rss
        except (psutil.Error, ProcessLookupError, OSError):
            pass
    return total / 2**20


async def run(args: argparse.Namespace, d: Deployment) -> dict:
    rng = random.Random(args.seed)
    abandon = [rng.random() < args.abort_share for _ in range(args.requests)]
    outcomes: dict[str, int] = {}
    by_route: dict[str, dict[str, int]] = {}
    done, killed, rss = 0, None, {}
    servers = [c for c in d.children if c.name != "router"]
    victim = next(c for c in servers if c.name == "decode1")
    gate = asyncio.Semaphore(args.concurrency)
    start = time.monotonic()

    async def worker(i: int) -> None:
        nonlocal done, killed
        async with gate:
            route = args.routes[i % len(args.routes)]
            outcome = await one_request(client, i, abandon[i], route)
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
        by_route.setdefault(route, {}).setdefault(outcome, 0)
        by_route[route][outcome] += 1
        done += 1
        if done == args.warmup:
            rss["warm"] = {c.name: group_rss_mb(c) for c in servers}
        if done == args.requests // 2 and killed is None:
            killed = time.monotonic() - start
            signal_group(victim.proc.pid, signal.SIGKILL)
            print(f"killed decode1 after {done} requests ({killed:.1f}s)", flush=True)
        if done % 100 == 0:
            print(f"{done}/{args.requests} requests, {time.monotonic() - start:.0f}s: {outcomes}", flush=True)

    async with httpx.AsyncClient(base_url=d.url, timeout=120) as client:
        await asyncio.gather(*(worker(i) for i in range(args.requests)))
    elapsed = time.monotonic() - start
    left = {}
    survivors = [c for c in servers if c is not victim]
    for c in survivors:  # idle within a bound: aborted rooms end within their transfer timeout
        url = c.ready_url.removesuffix("/health")
        deadline = time.monotonic() + 40
        while True:
            s = httpx.get(url + "/server_info", timeout=10).json()["internal_states"][0]
            busy = s["num_request_pages"] or s["num_open_rooms"] or any(s["queues"].values())
            if not busy or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.5)
        left[c.name] = (s["num_request_pages"], s["num_open_rooms"], sum(s["queues"].values()))
    rss["end"] = {c.name: group_rss_mb(c) for c in survivors}
    return dict(outcomes=outcomes, by_route=by_route, elapsed=elapsed, killed_at=killed, left=left, rss=rss)


def report(args: argparse.Namespace, r: dict) -> None:
    print(f"\n{args.requests} streamed requests ({', '.join(args.routes)} in turn), concurrency {args.concurrency}, "
          f"{args.abort_share:.0%} abandoned by their clients, decode1 SIGKILLed at {r['killed_at']:.1f}s; "
          f"{r['elapsed']:.0f}s in all")  # fmt: skip
    print("\n| how requests ended | count |\n| --- | ---: |")
    for k, v in sorted(r["outcomes"].items()):
        routes = ", ".join(f"{route} {n.get(k, 0)}" for route, n in sorted(r["by_route"].items()))
        print(f"| {k} | {v} ({routes}) |")
    print("\n| surviving server | request pages left | open rooms left | queued requests left | "
          "RSS after warm-up MB | RSS at end MB |\n| --- | ---: | ---: | ---: | ---: | ---: |")  # fmt: skip
    for name, (pages, rooms, queued) in r["left"].items():
        print(
            f"| {name} | {pages} | {rooms} | {queued} | {r['rss']['warm'][name]:.0f} | {r['rss']['end'][name]:.0f} |"
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=1000)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--abort-share", type=float, default=0.2)
    p.add_argument("--warmup", type=int, default=100, help="requests before the first memory reading")
    p.add_argument("--max-total-tokens", type=int, default=4096)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--routes", nargs="+", choices=["generate", "chat", "completions"],
                   default=["generate", "chat", "completions"], help="the streamed routes, taken in turn")  # fmt: skip
    p.add_argument("--log-dir", type=Path, default=None)
    p.add_argument("--router-log-level", default="warning", help="info: each retry and migration in its log")
    args = p.parse_args()
    log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix="disagg-soak-"))
    with Deployment("soak", children(args), log_dir, ready_timeout=300) as d:
        result = asyncio.run(run(args, d))
    report(args, result)
    if result["outcomes"].get("cut") or any(pages or rooms for pages, rooms, _ in result["left"].values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
