"""The router's upstream HTTP/1.1 client against a raw asyncio server (in-process, fast)."""

from __future__ import annotations

import asyncio

import pytest
from disagg.router.upstream import UpstreamError, UpstreamPool

from tests.procs import free_port

ANSWERS = {
    b"/length": b'HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 12\r\n\r\n{"ok": true}',
    b"/chunked": b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
    b"6\r\ndata: \r\n5\r\nhello\r\n0\r\n\r\n",
    b"/close": b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nuntil close",
}


async def serve(connections: list, close_idle: bool = False, drop_second: bool = False):
    """close_idle: close each connection after its answer; drop_second: keep it open, but close it
    without an answer when a second request comes on it (a worker gone with idle connections open)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        connections.append(writer)
        answered = 0
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError:
                break
            if drop_second and answered:
                break
            answered += 1
            length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            await reader.readexactly(length)
            path = head.split(b" ")[1]
            if path == b"/hang":
                await asyncio.sleep(10)
            writer.write(ANSWERS[path])
            await writer.drain()
            if path == b"/close" or close_idle:
                break
        writer.close()

    port = free_port()
    server = await asyncio.start_server(handle, "127.0.0.1", port)
    return server, f"http://127.0.0.1:{port}"


def run(coro):
    return asyncio.run(coro)


def test_lengths_chunks_close_and_keep_alive():
    async def scenario():
        connections: list = []
        server, url = await serve(connections)
        pool = UpstreamPool()
        try:
            r = await pool.request("POST", url, "/length", {"content-type": "application/json"}, b"{}")
            assert (r.status, r.content_type, await r.read()) == (200, "application/json", b'{"ok": true}')
            r = await pool.request("POST", url, "/chunked", {}, b"x")
            assert r.content_type == "text/event-stream" and await r.read() == b"data: hello"
            assert len(connections) == 1  # keep-alive: one connection so far
            r = await pool.request("GET", url, "/close", {})
            assert await r.read() == b"until close"
            r = await pool.request("GET", url, "/length", {})
            assert await r.read() == b'{"ok": true}'
            assert len(connections) == 2  # the closed one was replaced
        finally:
            await pool.close()
            server.close()

    run(scenario())


def test_idle_connection_closed_by_the_worker_is_replaced_silently():
    async def scenario():
        connections: list = []
        server, url = await serve(connections, close_idle=True)
        pool = UpstreamPool()
        try:
            for _ in range(3):
                r = await pool.request("GET", url, "/length", {})
                assert await r.read() == b'{"ok": true}'
                await asyncio.sleep(0.01)
            assert len(connections) == 3
        finally:
            await pool.close()
            server.close()

    run(scenario())


def test_every_idle_connection_dead_gets_a_new_one():
    async def scenario():
        connections: list = []
        server, url = await serve(connections, drop_second=True)
        pool = UpstreamPool()
        try:
            first = await asyncio.gather(*(pool.request("GET", url, "/length", {}) for _ in range(3)))
            for r in first:
                assert await r.read() == b'{"ok": true}'
            assert len(connections) == 3  # three idle connections in the pool, all dead on next use
            r = await pool.request("GET", url, "/length", {})
            assert await r.read() == b'{"ok": true}'
            assert len(connections) == 4  # one idle connection tried, then a new one
        finally:
            await pool.close()
            server.close()

    run(scenario())


def test_refused_and_timeout_raise():
    async def scenario():
        connections: list = []
        server, url = await serve(connections)
        pool = UpstreamPool()
        try:
            with pytest.raises(UpstreamError):
                await pool.request("GET", f"http://127.0.0.1:{free_port()}", "/length", {})
            with pytest.raises(TimeoutError):
                await pool.request("GET", url, "/hang", {}, timeout=0.1)
            r = await pool.request("GET", url, "/length", {})
            assert await r.read() == b'{"ok": true}'
            before = len(connections)
            with pytest.raises(TimeoutError):  # on an idle connection: not sent again on a new one
                await pool.request("GET", url, "/hang", {}, timeout=0.1)
            assert len(connections) == before
        finally:
            await pool.close()
            server.close()

    run(scenario())


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_worker_closing_a_new_connection_before_the_request_is_an_upstream_error(loop):
    """A worker dying under load: it accepts, then closes before the request is written. The router
    runs on uvloop, whose write on a closed transport raises RuntimeError (it was an HTTP 500 from the
    router); the caller must see an UpstreamError it retries elsewhere."""

    async def scenario():
        async def slam(reader, writer):
            writer.transport.abort()  # RST, as a killed process's socket

        port = free_port()
        server = await asyncio.start_server(slam, "127.0.0.1", port)
        pool = UpstreamPool()
        try:
            conn = await pool._connect(("http", "127.0.0.1", port))
            for _ in range(100):  # until the loop noticed the reset
                if conn.closed or conn.transport.is_closing():
                    break
                await asyncio.sleep(0.01)
            response = conn.send(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n", 1.0)
            assert response is not None
            with pytest.raises(UpstreamError, match="closed"):
                await asyncio.wait_for(conn.head, 5)
        finally:
            await pool.close()
            server.close()

    if loop == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(scenario())
    else:
        run(scenario())
