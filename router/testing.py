"""Helpers to start fake workers and routers as child processes (tests and `disagg.router.bench`),
and a slow or partitioned TCP link for network fault tests."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx


def free_port() -> int:
    """A free loopback port from the kernel (the router stands alone: tests use common.net's picker,
    which avoids the ephemeral range, and pass its ports in)."""
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


class SlowLink:
    """A TCP proxy on 127.0.0.1 in front of `port`, for network fault tests (run in a thread).

    Each chunk, either way, waits `delay` seconds before it is passed on (a slow, high-latency
    link). `partition()` holds every byte and every close until `heal()` (a network partition that
    later heals: nothing is lost, nothing passes meanwhile). `url` is where to connect instead."""

    def __init__(self, port: int, delay: float = 0.0):
        self.target, self.delay = port, delay
        self._open = None  # asyncio.Event, set while bytes may pass
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> SlowLink:
        self._thread.start()
        self._ready.wait(10)
        return self

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def partition(self) -> None:
        self._loop.call_soon_threadsafe(self._open.clear)

    def heal(self) -> None:
        self._loop.call_soon_threadsafe(self._open.set)

    def __enter__(self) -> SlowLink:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._open = asyncio.Event()
        self._open.set()
        server = self._loop.run_until_complete(asyncio.start_server(self._serve, "127.0.0.1", 0))
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            server_r, server_w = await asyncio.open_connection("127.0.0.1", self.target)
        except OSError:
            client_w.close()
            return
        await asyncio.gather(self._pump(client_r, server_w), self._pump(server_r, client_w))

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                if self.delay:
                    await asyncio.sleep(self.delay)
                await self._open.wait()
                writer.write(data)
                await writer.drain()
        except OSError:
            pass
        finally:
            await self._open.wait()  # a close passes a partition no sooner than bytes do
            writer.close()
