"""`launch_local`: one command, a working PD deployment, nothing left behind."""

from __future__ import annotations

import signal
import sys
import time

import httpx
import pytest
from disagg.common.config import env_cpu_threads

from tests.procs import Process, alive, descendants, free_port

pytestmark = pytest.mark.slow


def test_launch_local_serves_and_stops_cleanly():
    port = free_port()
    cmd = [sys.executable, "-m", "disagg.common.server.launch_local", "--port", str(port), "--",
           "--max-total-tokens", "4096", "--context-length", "512"]  # fmt: skip
    launcher = Process(cmd, env=env_cpu_threads(1), pipe=True).launch()
    proc = launcher.proc
    try:
        ready = launcher.wait_for_line("ready", timeout=300)
        assert f"http://127.0.0.1:{port}" in ready  # the URL is printed
        body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8, "temperature": 0}
        r = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body, timeout=120)
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"]
        children = descendants(proc.pid)
        assert len(children) >= 3  # router, prefill, decode (and their scheduler processes)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        time.sleep(1)
        assert not [pid for pid in children if alive(pid)]
    finally:
        launcher.stop()
