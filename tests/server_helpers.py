"""Start `python -m disagg.common.server.launch_server` as a real process for end-to-end tests."""

from __future__ import annotations

import signal
import sys

import httpx

from tests.procs import (
    Process,
    free_port,
    wait_until,  # noqa: F401 - tests/test_failures_pd.py still imports it from here
)

# small KV pool and context: fast start-up, cheap "too long" cases
SMALL_SERVER_ARGS = ["--max-total-tokens", "4096", "--context-length", "512", "--log-level", "warning"]


class ServerProcess(Process):
    """A server on a free port; `stop()` sends SIGTERM (it stops its own children), then kills the group."""

    def __init__(self, *args: str, api_key: str | None = None, env: dict | None = None):
        self.port = free_port()
        self.api_key = api_key
        self.args = [*args, *(["--api-key", api_key] if api_key else [])]
        argv = [
            sys.executable,
            "-m",
            "disagg.common.server.launch_server",
            "--port",
            str(self.port),
            *self.args,
        ]
        super().__init__(argv, f"http://127.0.0.1:{self.port}", env=env)

    @property
    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def client(self, **kw) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=self.headers, timeout=kw.pop("timeout", 120), **kw)

    def start(self, timeout: float = 300, wait_ready: bool = True) -> ServerProcess:
        self.launch()
        if wait_ready:
            self.wait_healthy(timeout)
        return self

    def wait_healthy(self, timeout: float = 300) -> None:
        try:
            self.wait_ready(timeout, status=200, interval=0.5)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        super().stop(signal.SIGTERM, grace=30, group=False)


def metric_value(text: str, name: str, **labels) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            if all(f'{k}="{v}"' in line for k, v in labels.items()):
                total += float(line.rsplit(" ", 1)[1])
    return total
