"""Shutdown of the real server: SIGTERM drains (503 for new requests, running ones finish, those past
the grace period are aborted) and leaves no process; killing the parent takes the children with it;
a tp=3 server gives the engine's tokens and its ranks stop with it."""

from __future__ import annotations

import json
import signal
import threading
import time

import httpx
import pytest

from tests.conftest import REFERENCE_ENGINE
from tests.procs import alive, descendants, wait_until
from tests.server_helpers import ServerProcess

pytestmark = pytest.mark.slow

ARGS = ["--max-total-tokens", "4096", "--context-length", "2048", "--log-level", "warning"]


def stream_generate(url: str, max_new_tokens: int, started: threading.Event, result: dict) -> None:
    body = {"text": "Count to a thousand:", "stream": True,
            "sampling_params": {"max_new_tokens": max_new_tokens, "temperature": 0, "ignore_eos": True}}  # fmt: skip
    last = None
    with httpx.stream("POST", url + "/generate", json=body, timeout=120) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                last = json.loads(line[6:])
                started.set()
    result["last"] = last


def start_stream(url: str, max_new_tokens: int) -> tuple[threading.Thread, dict]:
    started, result = threading.Event(), {}
    t = threading.Thread(target=stream_generate, args=(url, max_new_tokens, started, result), daemon=True)
    t.start()
    assert started.wait(60), "no first token"
    return t, result


def test_sigterm_drains_then_exits_leaving_no_process(default_model_path):
    server = ServerProcess(*ARGS, "--grace-period", "12").start()
    try:
        children = descendants(server.proc.pid)
        assert len(children) >= 2  # scheduler + detokenizer
        short, short_result = start_stream(server.url, 5)
        long, long_result = start_stream(server.url, 1500)
        server.proc.send_signal(signal.SIGTERM)
        assert wait_until(lambda: httpx.get(server.url + "/v1/models").status_code == 503, timeout=5)
        r = httpx.post(server.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2})
        assert r.status_code == 503 and r.json()["error"]["type"] == "service_unavailable"
        assert httpx.get(server.url + "/health").status_code == 503  # load balancers take it out
        short.join(60)
        long.join(60)
        assert (
            short_result["last"]["meta_info"]["finish_reason"]["type"] == "length"
        )  # finished in the grace period
        assert long_result["last"]["meta_info"]["finish_reason"]["type"] == "abort"  # cut at its end
        assert server.proc.wait(30) == 0
        assert wait_until(lambda: not any(alive(p) for p in children), timeout=10)
    finally:
        server.stop()


def test_children_die_with_the_parent(default_model_path):
    server = ServerProcess(*ARGS).start()
    try:
        children = descendants(server.proc.pid)
        assert children
        server.proc.send_signal(signal.SIGKILL)  # no chance to clean up
        server.proc.wait(10)
        t0 = time.monotonic()
        assert wait_until(lambda: not any(alive(p) for p in children), timeout=10), "orphans left"
        assert time.monotonic() - t0 < 10
    finally:
        server.stop()


def test_tp3_server_matches_the_engine_and_its_ranks_stop_with_it(engines):
    engine = engines.get(**REFERENCE_ENGINE)
    ids = engine.tokenizer.encode("The capital of France is")
    want = engine.generate([ids], {"max_new_tokens": 8, "temperature": 0})
    del engine
    engines.close()  # freed before the server's three ranks start
    server = ServerProcess(*ARGS, "--tp", "3").start()
    try:
        procs = descendants(server.proc.pid)
        assert len(procs) >= 4  # scheduler (rank 0), ranks 1 and 2, detokenizer
        got = httpx.post(server.url + "/generate", timeout=120, json={
            "input_ids": ids, "sampling_params": {"max_new_tokens": 8, "temperature": 0}}).json()  # fmt: skip
        assert got["output_ids"] == want[0]["output_ids"]
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(30) == 0
        assert wait_until(lambda: not any(alive(p) for p in procs), timeout=10)
    finally:
        server.stop()
