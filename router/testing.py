"""Helpers to start fake workers and routers as child processes (tests and `disagg.router.bench`)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Process:
    """A child process serving HTTP on `url`; `stop()` kills it (and is safe to call twice)."""

    def __init__(
        self,
        argv: list[str],
        url: str,
        ready_path: str = "/health",
        env: dict | None = None,
        quiet: bool = True,
    ):
        self.argv, self.url, self.ready_path = argv, url, ready_path
        self.env = {**os.environ, **(env or {})}
        self.quiet = quiet
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 30.0, wait_ready: bool = True) -> Process:
        out = subprocess.DEVNULL if self.quiet else None
        self.proc = subprocess.Popen(self.argv, env=self.env, stdout=out, stderr=out, start_new_session=True)
        if wait_ready:
            self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 30.0, status: int | None = None) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.argv} exited with {self.proc.returncode}")
            try:
                r = httpx.get(self.url + self.ready_path, timeout=1.0)
                if status is None or r.status_code == status:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise TimeoutError(f"{self.url} not ready after {timeout}s")

    def stop(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()

    def __enter__(self) -> Process:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def fake_worker(name: str, port: int | None = None, record: bool = True) -> Process:
    port = port or free_port()
    argv = [sys.executable, "-m", "disagg.router.fake_worker", "--port", str(port), "--name", name]
    if not record:
        argv.append("--no-record")
    return Process(argv, f"http://127.0.0.1:{port}")


def router(args: list[str], port: int | None = None, quiet: bool = True) -> Process:
    port = port or free_port()
    argv = [
        sys.executable,
        "-m",
        "disagg.router.launch_router",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        *args,
    ]
    return Process(argv, f"http://127.0.0.1:{port}", ready_path="/liveness", quiet=quiet)
