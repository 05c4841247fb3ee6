"""The router in front of a real colocated `launch_server` (default model, CPU): same answers as direct."""

from __future__ import annotations

import sys

import httpx
import pytest

from tests.procs import Process, free_port, router

pytestmark = pytest.mark.slow

GREEDY = {"max_new_tokens": 8, "temperature": 0}


@pytest.fixture(scope="module")
def server():
    port = free_port()
    argv = [
        sys.executable,
        "-m",
        "disagg.common.server.launch_server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    proc = Process(argv, f"http://127.0.0.1:{port}")
    try:
        proc.start(timeout=300)
        yield proc
    finally:
        proc.stop()


def test_router_answers_like_the_server(server):
    body = {"text": "The capital of France is", "sampling_params": GREEDY}
    direct = httpx.post(server.url + "/generate", json=body, timeout=120).json()
    with router(["--worker-urls", server.url, "--policy", "cache_aware"]).start() as r:
        routed = httpx.post(r.url + "/generate", json=body, timeout=120)
        assert routed.status_code == 200 and routed.json()["text"] == direct["text"]
        chat = {"messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 8, "stream": True}
        with httpx.stream("POST", r.url + "/v1/chat/completions", json=chat, timeout=120) as resp:
            assert resp.headers["content-type"].startswith("text/event-stream")
            lines = [line for line in resp.iter_lines() if line]
        assert lines[0].startswith("data: {") and lines[-1] == "data: [DONE]"
        bad = httpx.post(r.url + "/v1/completions", json={"prompt": "x", "max_tokens": -3}, timeout=60)
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "max_tokens"
        assert httpx.get(r.url + "/health_generate", timeout=60).status_code == 200
