"""How long a PD request's first token waits in the decode server after its KV landed.

    python -m disagg.common.bench.first_token --running 16 --probes 20

Starts a prefill and a decode server (the default model on the CPU unless --server-args says
otherwise), fills the decode's batch with --running streaming requests that keep decoding (so
every decode step is long), then sends --probes PD requests one at a time and prints, p50/p99:
- `kv -> out`: from "the decode's transfer engine has the room" to "the first token left the decode
  scheduler" (both on the decode's clock: its log under DISAGG_TRANSFER_TRACE=1);
- `kv -> client`: from the same moment to the first streamed token at this client (time.monotonic()
  is one clock for every process of a host);
- the client's TTFT, and the decode step time beside them (the background streams' token gaps).
The legs are posted as our router posts them (the same body plus bootstrap_host/port/room to the
prefill and to the decode; the prefill's answer is dropped), without a router process in between.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
from disagg.common.config import TRANSFER_TRACE_VAR, env_cpu_threads
from disagg.common.net import free_port

LOG_LINE = re.compile(r"first token out: room=(\d+) kv_ready=([\d.]+) out=([\d.]+)")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] if ordered else float("nan")


class Servers:
    """A prefill and a decode server in their own process groups; both killed on exit."""

    def __init__(self, args: argparse.Namespace):
        self.args, self.procs = args, []
        self.bootstrap = free_port()
        self.urls = {role: f"http://127.0.0.1:{free_port()}" for role in ("prefill", "decode")}
        self.log_dir = Path(args.log_dir)

    def __enter__(self) -> Servers:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **env_cpu_threads(1), TRANSFER_TRACE_VAR: "1"}
        try:
            for role, url in self.urls.items():
                argv = [sys.executable, "-m", f"disagg.{role}.launch", "--port", url.rsplit(":", 1)[1],
                        "--host", "127.0.0.1", "--log-level", "info", *shlex.split(self.args.server_args)]  # fmt: skip
                if role == "prefill":
                    argv += ["--disaggregation-bootstrap-port", str(self.bootstrap)]
                with open(self.log_dir / f"{role}.log", "w") as log:
                    self.procs.append(subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env,
                                                       start_new_session=True))  # fmt: skip
            for url in self.urls.values():
                self._wait_healthy(url)
        except BaseException:
            self.__exit__()
            raise
        return self

    def _wait_healthy(self, url: str, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(p.poll() is not None for p in self.procs):
                raise RuntimeError(f"a server exited during start-up: see {self.log_dir}")
            try:
                if httpx.get(url + "/health", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"{url} not healthy after {timeout:.0f}s")

    def decode_log(self) -> str:
        return (self.log_dir / "decode.log").read_text(errors="replace")

    def __exit__(self, *exc) -> None:
        for p in self.procs:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait()


class Client:
    """Posts both legs of PD requests, as the router does."""

    def __init__(self, servers: Servers, timeout: float):
        self.servers = servers
        self.http = httpx.AsyncClient(timeout=timeout)
        self.rng = random.Random(0)

    def body(self, prompt_len: int, max_tokens: int) -> tuple[int, dict]:
        room = self.rng.getrandbits(63)
        ids = [self.rng.randrange(1000, 20000) for _ in range(prompt_len)]
        return room, {"input_ids": ids, "stream": True, "bootstrap_host": "127.0.0.1",
                      "bootstrap_port": self.servers.bootstrap, "bootstrap_room": room,
                      "sampling_params": {"max_new_tokens": max_tokens, "temperature": 0, "ignore_eos": True}}  # fmt: skip

    async def stream(self, body: dict, on_token) -> None:
        """Both legs; `on_token(time.monotonic())` for every streamed chunk of the decode's answer."""
        prefill = asyncio.ensure_future(
            self.http.post(self.servers.urls["prefill"] + "/generate", json={**body, "stream": False})
        )
        try:
            url = self.servers.urls["decode"] + "/generate"
            async with self.http.stream("POST", url, json=body) as r:
                if r.status_code != 200:
                    raise RuntimeError(f"decode: HTTP {r.status_code}: {(await r.aread())[:200]!r}")
                async for line in r.aiter_lines():
                    if line.startswith("data: ") and line != "data: [DONE]":
                        if "error" in json.loads(line[6:]):
                            raise RuntimeError(f"decode: {line}")
                        on_token(time.monotonic())
        finally:
            await prefill


async def measure(args: argparse.Namespace, servers: Servers) -> dict:
    client = Client(servers, args.timeout)
    gaps: list[float] = []  # decode step times, from the background streams
    started = asyncio.Event()
    firsts: set[int] = set()

    def background_token(i: int, last: list[float]):
        def on(t: float) -> None:
            if last:
                gaps.append(t - last[0])
            last[:] = [t]
            firsts.add(i)
            if len(firsts) == args.running:
                started.set()

        return on

    background = [
        asyncio.ensure_future(
            client.stream(client.body(args.prompt_len, args.background_tokens)[1], background_token(i, []))
        )  # fmt: skip
        for i in range(args.running)
    ]
    if args.running:
        await asyncio.wait_for(started.wait(), args.timeout)
    gaps.clear()  # the steps of the probe phase only
    probes = []
    for _ in range(args.probes):
        room, body = client.body(args.prompt_len, 2)
        seen: list[float] = []
        start = time.monotonic()
        await client.stream(body, lambda t, seen=seen: seen.append(t))
        probes.append({"room": room, "sent": start, "client": seen[0]})
        await asyncio.sleep(args.gap_s * random.random())  # land anywhere in a decode step
    ended = sum(task.done() for task in background)
    if ended:  # the batch shrank during the probes: steps were shorter than asked for
        print(f"warning: {ended} background requests ended before the probes did (--background-tokens)")
    for task in background:
        task.cancel()
    await asyncio.gather(*background, return_exceptions=True)
    await client.http.aclose()
    return {"probes": probes, "step_s": gaps}


def report(result: dict, log: str) -> dict:
    times = {int(m[1]): (float(m[2]), float(m[3])) for m in LOG_LINE.finditer(log)}
    kv_out, kv_client, ttft = [], [], []
    for p in result["probes"]:
        if p["room"] not in times:
            raise RuntimeError(f"room {p['room']} missing from the decode's log (DISAGG_TRANSFER_TRACE=1?)")
        ready, out = times[p["room"]]
        kv_out.append(out - ready)
        kv_client.append(p["client"] - ready)
        ttft.append(p["client"] - p["sent"])
    rows = {
        "kv -> out": kv_out,
        "kv -> client": kv_client,
        "client TTFT": ttft,
        "decode step": result["step_s"],
    }
    return {name: {"p50_ms": 1e3 * percentile(v, 0.5), "p99_ms": 1e3 * percentile(v, 0.99), "n": len(v)}
            for name, v in rows.items()}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--running", type=int, default=16, help="background requests decoding throughout")
    p.add_argument("--probes", type=int, default=20, help="PD requests measured, one at a time")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument(
        "--background-tokens",
        type=int,
        default=420,
        help="max_new_tokens of each background request (they must fit in the decode's pool)",
    )
    p.add_argument("--gap-s", type=float, default=0.2, help="a random pause up to this between probes")
    p.add_argument("--server-args", default="--max-total-tokens 8192 --context-length 2048",
                   help="flags of both servers")  # fmt: skip
    p.add_argument("--log-dir", default="/tmp/disagg-first-token")
    p.add_argument("--timeout", type=float, default=300.0)
    p.add_argument("--json", help="write the table and every probe here")
    args = p.parse_args(argv)
    with Servers(args) as servers:
        result = asyncio.run(measure(args, servers))
        table = report(result, servers.decode_log())
    print(f"{args.running} running requests, {args.probes} probes of {args.prompt_len} tokens")
    print(f"{'':>14} {'p50 ms':>9} {'p99 ms':>9} {'n':>5}")
    for name, row in table.items():
        print(f"{name:>14} {row['p50_ms']:9.1f} {row['p99_ms']:9.1f} {row['n']:5d}")
    if args.json:
        Path(args.json).write_text(json.dumps({"table": table, **result}, indent=1))


if __name__ == "__main__":
    main()
