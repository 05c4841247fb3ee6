"""A lean pooled HTTP/1.1 client for the router's upstream calls (asyncio protocol + httptools parser).

Why not a general client: the router's only job is to move bytes, and per proxied request aiohttp
costs ~85 us of CPU and httpx ~1 ms on this machine; this costs ~25 us. It does exactly what the
router needs: keep-alive connections per worker, one write per request, the response head, then
the body as it arrives (Content-Length, chunked, or until close), read timeouts, and abort by
closing the connection. No redirects, cookies, proxies or compression.
"""

from __future__ import annotations

import asyncio
import collections
import ssl
from urllib.parse import urlsplit

import httptools

_MAX_BUFFER = 1 << 20  # pause reading a worker's socket when this much body waits unread


class UpstreamError(Exception):
    """Connection refused/reset, a malformed answer, or the worker closed mid-answer."""


UPSTREAM_ERRORS = (UpstreamError, OSError, TimeoutError)


class UpstreamResponse:
    __slots__ = (
        "status",
        "headers",
        "_conn",
        "_chunks",
        "_buffered",
        "_waiter",
        "_done",
        "_error",
        "_timeout",
    )

    def __init__(self, conn: _Connection, timeout: float | None):
        self.status = 0
        self.headers: dict[str, str] = {}
        self._conn = conn
        self._chunks: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._waiter: asyncio.Future | None = None
        self._done = False
        self._error: BaseException | None = None
        self._timeout = timeout

    @property
    def content_type(self) -> str:
        return self.headers.get("content-type", "").split(";", 1)[0].strip()

    async def readany(self) -> bytes:
        """The next body bytes as they arrived; b"" once the body is complete."""
        while not self._chunks:
            if self._error is not None:
                raise self._error
            if self._done:
                return b""
            await self._wait()
        chunk = b"".join(self._chunks) if len(self._chunks) > 1 else self._chunks[0]
        self._chunks.clear()
        self._buffered = 0
        self._conn.resume()
        return chunk

    async def read(self) -> bytes:
        parts = []
        while chunk := await self.readany():
            parts.append(chunk)
        return b"".join(parts)

    def set_read_timeout(self, timeout: float | None) -> None:
        """Bound each later wait for body bytes (a running stream's stall limit)."""
        self._timeout = timeout

    def close(self) -> None:
        """Abort: drop the connection (the worker sees a disconnect)."""
        if not self._done:
            self._conn.abort()

    async def _wait(self) -> None:
        loop = asyncio.get_running_loop()
        self._waiter = waiter = loop.create_future()
        handle = loop.call_later(self._timeout, _expire, waiter) if self._timeout else None
        try:
            await waiter
        finally:
            self._waiter = None
            if handle is not None:
                handle.cancel()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _feed(self, data: bytes) -> None:
        self._chunks.append(data)
        self._buffered += len(data)
        if self._buffered > _MAX_BUFFER:
            self._conn.pause()
        self._wake()

    def _finish(self) -> None:
        self._done = True
        self._wake()

    def _fail(self, error: BaseException) -> None:
        if not self._done:
            self._error = error
            self._wake()


def _expire(waiter: asyncio.Future) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError("worker did not answer in time"))


class AbortHandle:
    """Lets another task abort a request in flight (connecting, waiting for the head, or reading)."""

    __slots__ = ("response", "aborted")

    def __init__(self) -> None:
        self.response: UpstreamResponse | None = None
        self.aborted = False

    def abort(self) -> None:
        self.aborted = True
        if self.response is not None:
            self.response.close()  # no-op once the answer is complete (its connection may be reused)


class _Connection(asyncio.Protocol):
    def __init__(self, pool: UpstreamPool, key: tuple):
        self.pool = pool
        self.key = key
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.response: UpstreamResponse | None = None
        self.head: asyncio.Future | None = None  # resolves when the response head has arrived
        self.got_bytes = False
        self.closed = False
        self._raw_headers: list[tuple[bytes, bytes]] = []
        self._paused = False

    # ---- asyncio.Protocol ----------------------------------------------------------------------
    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.got_bytes = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._lost(UpstreamError(f"malformed answer: {exc}"))
            self.transport.close()

    def connection_lost(self, exc) -> None:
        self.closed = True
        self.pool._discard(self)
        response = self.response
        if response is not None and response.status and not response._done and self._until_close():
            response._finish()  # no length given: the body ran until the worker closed
            self.response = None
            return
        self._lost(UpstreamError(f"connection lost: {exc}" if exc else "worker closed the connection"))

    # ---- httptools callbacks -------------------------------------------------------------------
    def on_header(self, name: bytes, value: bytes) -> None:
        self._raw_headers.append((name, value))

    def on_headers_complete(self) -> None:
        response = self.response
        response.status = self.parser.get_status_code()
        response.headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in self._raw_headers}
        if not self.head.done():
            self.head.set_result(None)

    def on_body(self, body: bytes) -> None:
        self.response._feed(body)

    def on_message_complete(self) -> None:
        response, self.response = self.response, None
        response._finish()
        if self.parser.should_keep_alive() and not self.closed:
            self.pool._release(self)
        else:
            self.transport.close()

    # ---- used by the pool and the response -----------------------------------------------------
    def send(self, request: bytes, timeout: float | None) -> UpstreamResponse:
        self.response = response = UpstreamResponse(self, timeout)
        self.head = asyncio.get_running_loop().create_future()
        self.got_bytes = False
        self._raw_headers = []
        try:
            if self.closed or self.transport.is_closing():
                raise RuntimeError("the transport is closed")
            self.transport.write(request)
        except RuntimeError as exc:  # uvloop raises this (not OSError) on a transport already closed
            # the worker closed the connection between connect (or the pool) and this write: the
            # request never left, so it fails like any lost connection (retried by the caller)
            self._lost(UpstreamError(f"worker closed the connection before the request was sent ({exc})"))
        return response

    def _until_close(self) -> bool:
        h = self.response.headers
        return "content-length" not in h and "chunked" not in h.get("transfer-encoding", "")

    def _lost(self, error: BaseException) -> None:
        if self.head is not None and not self.head.done():
            self.head.set_exception(error)
        if self.response is not None:
            self.response._fail(error)
            self.response = None

    def abort(self) -> None:
        self._lost(UpstreamError("request aborted"))  # wakes whoever waits on this connection
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    def pause(self) -> None:
        if not self._paused and not self.closed:
            self._paused = True
            self.transport.pause_reading()

    def resume(self) -> None:
        if self._paused and not self.closed:
            self._paused = False
            self.transport.resume_reading()


class UpstreamPool:
    """Keep-alive connections per (scheme, host, port); no cap: the router's admission gate limits load."""

    def __init__(self, connect_timeout: float = 10.0, read_timeout: float | None = None):
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self._idle: dict[tuple, list[_Connection]] = collections.defaultdict(list)
        self._ssl: ssl.SSLContext | None = None

    async def request(
        self,
        method: str,
        url: str,
        path: str,
        headers: dict[str, str],
        body: bytes = b"",
        timeout: float | None = None,
        handle: AbortHandle | None = None,
    ) -> UpstreamResponse:
        """Send; return once the response head (status, headers) arrived. The body follows via
        readany()/read(). `url` is the worker's base URL; `timeout` bounds each wait for bytes."""
        key = _key(url)
        request = _serialize(method, path, f"{key[1]}:{key[2]}", headers, body)
        timeout = timeout if timeout is not None else self.read_timeout
        conn = self._take(key)
        while True:
            reused = conn is not None
            if conn is None:
                conn = await self._connect(key)
            if handle is not None and handle.aborted:
                conn.abort()
                raise UpstreamError("request aborted")
            response = conn.send(request, timeout)
            if handle is not None:
                handle.response = response
            try:
                await _wait_for(conn.head, timeout)
            except UPSTREAM_ERRORS as exc:
                conn.abort()
                gone = reused and not conn.got_bytes and not isinstance(exc, TimeoutError)
                if gone and not (handle is not None and handle.aborted):
                    # NOTE: the worker had closed this idle connection; once more on a new one, not
                    # on another idle one: a worker that died leaves all of them dead
                    conn = None
                    continue
                raise
            except BaseException:
                conn.abort()
                raise
            return response

    async def close(self) -> None:
        for conns in self._idle.values():
            for conn in conns:
                conn.abort()
        self._idle.clear()

    async def _connect(self, key: tuple) -> _Connection:
        scheme, host, port = key
        loop = asyncio.get_running_loop()
        if scheme == "https" and self._ssl is None:
            self._ssl = ssl.create_default_context()
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(
                    lambda: _Connection(self, key), host, port, ssl=self._ssl if scheme == "https" else None
                ),
                self.connect_timeout,
            )
        except OSError as exc:
            raise UpstreamError(f"cannot connect to {host}:{port}: {exc}") from None
        return conn

    def _take(self, key: tuple) -> _Connection | None:
        idle = self._idle.get(key)
        while idle:
            conn = idle.pop()
            if not conn.closed and not conn.transport.is_closing():
                return conn
        return None

    def _release(self, conn: _Connection) -> None:
        self._idle[conn.key].append(conn)

    def _discard(self, conn: _Connection) -> None:
        idle = self._idle.get(conn.key)
        if idle and conn in idle:
            idle.remove(conn)


async def _wait_for(fut: asyncio.Future, timeout: float | None) -> None:
    if timeout is None:
        await fut
        return
    handle = asyncio.get_running_loop().call_later(timeout, _expire, fut)
    try:
        await fut
    finally:
        handle.cancel()


_KEYS: dict[str, tuple] = {}


def _key(url: str) -> tuple:
    key = _KEYS.get(url)
    if key is None:
        parts = urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        key = _KEYS[url] = (parts.scheme, parts.hostname, port)
    return key


def _serialize(method: str, path: str, host: str, headers: dict[str, str], body: bytes) -> bytes:
    lines = [f"{method} {path} HTTP/1.1\r\nhost: {host}\r\ncontent-length: {len(body)}\r\n"]
    lines.extend(f"{k}: {v}\r\n" for k, v in headers.items())
    lines.append("\r\n")
    return "".join(lines).encode("latin-1") + body
