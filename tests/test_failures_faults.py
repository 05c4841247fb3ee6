"""docs/failures.md rows about the router and the network, with real processes: the router killed
mid-stream, a slow or partitioned router -> decode link (a TCP proxy in this process), a decode KV
pool too small for the load. Each asserts what the client sees, how fast, and that the prefill and
the decode hold no page and no room afterwards."""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import signal
import time

import httpx
import pytest
from disagg.router.testing import SlowLink

from tests.pd_helpers import PD_ARGS, assert_pool_free, is_idle, start_all, stats
from tests.procs import free_port, router, wait_until
from tests.server_helpers import ServerProcess, metric_value

pytestmark = pytest.mark.slow

DECODE_POOL_TOKENS = 1536  # small: the exhaustion test overfills it; the others stay well under it
STALL_S = 3.0


class Servers:
    def __init__(self):
        self.bootstrap_port = free_port()
        common = [*PD_ARGS, "--disaggregation-transfer-timeout", "30"]
        self.prefill = ServerProcess("--disaggregation-mode", "prefill", "--disaggregation-bootstrap-port",
                                     str(self.bootstrap_port), *common)  # fmt: skip
        self.decode = ServerProcess("--disaggregation-mode", "decode", *common,
                                    "--max-total-tokens", str(DECODE_POOL_TOKENS))  # fmt: skip

    def router(self, decode_url: str | None = None, *extra: str):
        args = ["--pd-disaggregation", "--prefill", self.prefill.url, str(self.bootstrap_port),
                "--decode", decode_url or self.decode.url, "--worker-stall-timeout", str(STALL_S), *extra]  # fmt: skip
        return router(args).start(timeout=60)

    def assert_nothing_held(self, timeout: float = 30) -> None:
        for server in (self.prefill, self.decode):
            assert_pool_free(server, timeout)


@pytest.fixture(scope="module")
def servers():
    s = Servers()
    try:
        start_all([s.prefill, s.decode])
        yield s
    finally:
        s.prefill.stop()
        s.decode.stop()


def prompt(i: int, n: int) -> list[int]:
    return [(700 + 31 * i + 13 * j) % 30000 + 100 for j in range(n)]


class Stream:
    """One greedy streaming /generate; how it ended: 'done', 'error' (an error event) or 'cut' (the
    connection broke without either)."""

    def __init__(self, url: str, ids: list[int], max_new: int):
        self.url, self.max_new = url, max_new
        self.body = {"input_ids": ids, "stream": True,
                     "sampling_params": {"max_new_tokens": max_new, "temperature": 0, "ignore_eos": True}}  # fmt: skip
        self.events, self.error, self.end, self.at = 0, None, None, 0.0
        self.ids: list[int] = []

    def run(self) -> Stream:
        try:
            with httpx.stream("POST", self.url + "/generate", json=self.body, timeout=180) as r:
                if r.status_code != 200:
                    self.end, self.error = "error", json.loads(r.read())["error"]
                    return self
                for line in r.iter_lines():
                    if line == "data: [DONE]":
                        self.end = self.end or "done"
                    elif line.startswith("data: "):
                        event = json.loads(line[6:])
                        if "error" in event:
                            self.end, self.error = "error", event["error"]
                        else:
                            self.ids, self.events = event["output_ids"], self.events + 1
        except httpx.TransportError:
            self.end = "cut"
        finally:
            self.at = time.monotonic()
        if self.end is None:
            self.end = "cut"
        return self

    @property
    def ok(self) -> bool:
        return self.end == "done" and len(self.ids) == self.max_new


def run_streams(streams: list[Stream], until=None, action=None) -> list[Stream]:
    with cf.ThreadPoolExecutor(len(streams)) as pool:
        futures = [pool.submit(s.run) for s in streams]
        if action is not None:
            assert wait_until(lambda: until(streams), timeout=120, interval=0.05)
            action()
        return [f.result() for f in futures]


def finished(server: ServerProcess, reason: str) -> float:
    text = httpx.get(server.url + "/metrics", timeout=10).text
    return metric_value(text, "disagg_requests_total", finish_reason=reason)


def freed_within(servers: Servers, since: float, timeout: float = 30) -> float:
    """Seconds from `since` until both servers held nothing."""
    both = (servers.prefill, servers.decode)
    assert wait_until(lambda: all(is_idle(s) for s in both), timeout=timeout, interval=0.05)
    return time.monotonic() - since


def test_router_killed_mid_stream_workers_free_everything(servers):
    r = servers.router()
    try:
        streams = [Stream(r.url, prompt(i, 64), 160) for i in range(4)]
        aborted = finished(servers.decode, "abort")
        killed = {}

        def kill():
            killed["at"] = time.monotonic()
            os.killpg(r.proc.pid, signal.SIGKILL)

        def mid_stream(ss):
            return all(s.events >= 4 for s in ss)

        run_streams(streams, mid_stream, kill)
    finally:
        r.stop()
    # the clients: a broken connection, never a clean-looking end
    assert [s.end for s in streams] == ["cut"] * 4
    assert all(s.at - killed["at"] < 2 for s in streams)
    # the workers see their client (the router) gone and free every room and page
    freed = freed_within(servers, killed["at"])
    print(
        f"\nrouter SIGKILLed mid-stream: 4/4 clients cut at once; prefill and decode idle {freed:.2f} s later"
    )
    assert freed < 5
    assert finished(servers.decode, "abort") == aborted + 4  # aborted, not run to their end
    servers.assert_nothing_held()


def test_slow_then_partitioned_decode_link(servers):
    with SlowLink(servers.decode.port) as link:
        r = servers.router(link.url, "--max-migrations", "0")
        try:
            reference = [s.ids for s in run_streams([Stream(r.url, prompt(i, 48), 32) for i in range(2)])]
            # slow: 50 ms on every chunk each way; the streams finish, the same tokens
            link.delay = 0.05
            started = time.monotonic()
            slow = run_streams([Stream(r.url, prompt(i, 48), 32) for i in range(2)])
            took = time.monotonic() - started
            assert [s.ok for s in slow] == [True, True] and [s.ids for s in slow] == reference
            # partitioned mid-stream: typed error events within the stall timeout, not a hang
            link.delay = 0.0
            cut = {}

            def partition():
                cut["at"] = time.monotonic()
                link.partition()

            streams = run_streams(
                [Stream(r.url, prompt(i, 48), 96) for i in range(2)], lambda ss: all(s.events >= 4 for s in ss),
                partition,
            )  # fmt: skip
            assert [s.end for s in streams] == ["error", "error"]
            assert {s.error["code"] for s in streams} == {"worker_timeout"}
            ended = max(s.at for s in streams) - cut["at"]
            assert ended < STALL_S + 2
        finally:
            link.heal()
            r.stop()
        # healed: the decode sees the router's closed connections and frees what they held
        freed = freed_within(servers, time.monotonic())
        print(f"\nslow link (50 ms a chunk): 2/2 whole in {took:.2f} s; partitioned: worker_timeout error "
              f"events {ended:.2f} s after the cut; after healing, both servers idle in {freed:.2f} s")  # fmt: skip
    servers.assert_nothing_held()


def test_decode_pool_exhaustion_queues_then_finishes(servers):
    r = servers.router()
    try:
        # 8 x (240 + 96) tokens: 1.75 times the decode's pool
        streams = [Stream(r.url, prompt(i, 240), 96) for i in range(8)]
        peak = {"held": 0, "retractions": 0}

        def watch(_):
            s = stats(servers.decode)
            peak["held"] = max(peak["held"], s["queues"].get("prealloc", 0) + s["queues"].get("bootstrap", 0))
            peak["retractions"] = max(peak["retractions"], s.get("num_retractions", 0))
            return False

        started = time.monotonic()
        with cf.ThreadPoolExecutor(1) as pool:
            done = pool.submit(run_streams, streams)
            while not done.done():
                watch(None)
                time.sleep(0.1)
            done.result()
        took = time.monotonic() - started
    finally:
        r.stop()
    # the pool was short (requests waited for pages or were retracted) and yet every request ended:
    # finished whole, or a typed error event; none hung, none was cut
    assert peak["held"] >= 1 or peak["retractions"] >= 1, peak
    ends = [s.end for s in streams]
    assert all(s.ok for s in streams if s.end == "done")
    assert all(s.error["code"] in ("kv_pool_exhausted", "kv_transfer_failed", "worker_timeout")
               for s in streams if s.end == "error")  # fmt: skip
    assert "cut" not in ends and "done" in ends and took < 150
    print(f"\ndecode pool of {DECODE_POOL_TOKENS} tokens, 8 requests of 336: {ends.count('done')} finished, "
          f"{ends.count('error')} typed errors {sorted({s.error['code'] for s in streams if s.error})} in {took:.1f} s (peak {peak['held']} waiting for pages, "
          f"{peak['retractions']} retractions)")  # fmt: skip
    servers.assert_nothing_held()
