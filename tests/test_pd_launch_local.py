"""`launch_local`: one command, a working PD deployment, nothing left behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx
import pytest
from disagg.router.testing import free_port

from tests.server_helpers import alive, descendants

pytestmark = pytest.mark.slow


def test_launch_local_serves_and_stops_cleanly():
    port = free_port()
    cmd = [sys.executable, "-m", "disagg.common.server.launch_local", "--port", str(port), "--",
           "--max-total-tokens", "4096", "--context-length", "512"]  # fmt: skip
    env = {**os.environ, "DISAGG_CPU_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env,
                            start_new_session=True)  # fmt: skip
    try:
        deadline, ready = time.monotonic() + 300, ""
        while time.monotonic() < deadline and "ready" not in ready:
            ready = proc.stdout.readline()
            assert ready or proc.poll() is None, "launch_local exited during start-up"
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
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
