"""The router's failure rules in-process (fast): how a broken stream ends, what a continuation asks
for, how health probes move a worker and its breaker. The upstream is a scripted loopback socket
server, so a cut in the middle of an event or a close without `[DONE]` is exact."""

from __future__ import annotations

import asyncio
import json

import httpx
import orjson
from disagg.router.app import create_app
from disagg.router.config import RouterConfig
from disagg.router.health import HealthChecker, Probe
from disagg.router.legs import Leg
from disagg.router.relay import stalled
from disagg.router.streams import StreamState, continuation
from disagg.router.workers import BreakerState, CircuitBreaker, Role, WorkerRegistry


def sse(obj) -> bytes:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n".encode()


def chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


STREAM_HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"


def gen_event(ids: list[int], finish: dict | None = None) -> dict:
    text = "".join(f" t{i}" for i in ids)
    meta = {"id": "gen-1", "finish_reason": finish, "prompt_tokens": 3, "completion_tokens": len(ids)}
    return {"text": text, "output_ids": ids, "meta_info": meta}


class Upstream:
    """A loopback HTTP worker answering /health with 200 and each POST with the next script entry:
    the raw bytes to write, then close the connection (mid-answer when the script says so); None:
    never answer."""

    def __init__(self, scripts: list[bytes]):
        self.scripts = list(scripts)
        self.bodies: list[dict] = []

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(
            (
                int(line.split(b":")[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length")
            ),
            0,
        )
        body = await reader.readexactly(length)
        if head.startswith(b"GET"):
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
        elif head.startswith(b"POST /abort_request"):
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{}")
        else:
            self.bodies.append(orjson.loads(body))
            script = self.scripts.pop(0)
            if script is None:
                await asyncio.sleep(30)
            writer.write(script)
        await writer.drain()
        writer.close()


async def through_router(upstream: Upstream, path: str, body: dict, **config) -> tuple[int, list[str]]:
    """POST `body` through an in-process router to `upstream`: (status, the SSE data lines)."""
    url = await upstream.start()
    app = create_app(RouterConfig(worker_urls=(url,), retry_initial_backoff_ms=1, **config))
    await app.state.start()
    try:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://router") as client:
            r = await client.post(path, json=body)
        if not r.headers.get("content-type", "").startswith("text/event-stream"):
            return r.status_code, [r.text]
        return r.status_code, [line[6:] for line in r.text.split("\n") if line.startswith("data: ")]
    finally:
        await app.state.stop()
        upstream.server.close()


def test_a_stream_cut_mid_event_ends_with_an_error_event_then_done():
    chat = {"choices": [{"index": 0, "delta": {"content": "Hel"}}]}
    cut = STREAM_HEAD + chunk(sse(chat)) + chunk(b'data: {"choices": [{"ind')  # then the socket closes
    status, data = asyncio.run(
        through_router(Upstream([cut]), "/v1/chat/completions", {"messages": [], "stream": True})
    )
    assert status == 200
    assert json.loads(data[0]) == chat  # the whole event passed through, the half one dropped
    error = json.loads(data[1])["error"]
    assert error["code"] == "upstream_unavailable" and error["type"] == "server_error"
    assert data[2:] == ["[DONE]"]


def test_a_stream_closed_without_done_is_not_a_clean_end():
    events = sse({"choices": [{"index": 0, "text": "a"}]})
    closed = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n" + events
    status, data = asyncio.run(
        through_router(Upstream([closed]), "/v1/completions", {"prompt": "x", "stream": True})
    )
    assert json.loads(data[-2])["error"]["code"] == "upstream_unavailable" and data[-1] == "[DONE]"


def test_a_broken_generate_stream_continues_with_prompt_plus_sent_tokens():
    first = STREAM_HEAD + chunk(sse(gen_event([7])) + sse(gen_event([7, 8])))  # then the socket closes
    rest = (
        STREAM_HEAD
        + chunk(
            sse(gen_event([9])) + sse(gen_event([9, 10], {"type": "length", "length": 2})) + sse("[DONE]")
        )
        + b"0\r\n\r\n"
    )
    upstream = Upstream([first, rest])
    body = {
        "input_ids": [1, 2, 3],
        "sampling_params": {"max_new_tokens": 4, "temperature": 0},
        "stream": True,
    }
    status, data = asyncio.run(through_router(upstream, "/generate", body))
    events = [json.loads(d) for d in data[:-1]]
    assert [e["output_ids"] for e in events] == [[7], [7, 8], [7, 8, 9], [7, 8, 9, 10]]
    assert events[-1]["text"] == " t7 t8 t9 t10"
    meta = events[-1]["meta_info"]
    assert meta["finish_reason"] == {"type": "length", "length": 4} and meta["completion_tokens"] == 4
    assert data[-1] == "[DONE]" and status == 200
    again = upstream.bodies[1]  # the continuation: prompt + what the client got, the rest of the budget
    assert again["input_ids"] == [1, 2, 3, 7, 8] and again["sampling_params"]["max_new_tokens"] == 2
    assert "text" not in again


def test_no_migration_when_disabled_or_for_a_batch():
    first = STREAM_HEAD + chunk(sse(gen_event([7])))
    body = {"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 4}, "stream": True}
    _, data = asyncio.run(through_router(Upstream([first]), "/generate", body, max_migrations=0))
    assert json.loads(data[-2])["error"]["code"] == "upstream_unavailable" and data[-1] == "[DONE]"
    state = StreamState(native=True)
    state.feed(sse(gen_event([7])))
    assert continuation({"text": ["a", "b"], "stream": True}, state) is None
    text = continuation({"text": "Hi", "sampling_params": {}}, state)
    assert text["text"] == "Hi t7" and text["sampling_params"]["max_new_tokens"] == 127


def test_a_stream_whose_final_event_arrived_only_misses_done():
    final = gen_event([7, 8], {"type": "length", "length": 2})
    cut = STREAM_HEAD + chunk(sse(gen_event([7])) + sse(final))
    body = {"input_ids": [1], "sampling_params": {"max_new_tokens": 2}, "stream": True}
    upstream = Upstream([cut])
    _, data = asyncio.run(through_router(upstream, "/generate", body))
    assert [json.loads(d)["output_ids"] for d in data[:-1]] == [[7], [7, 8]] and data[-1] == "[DONE]"
    assert len(upstream.bodies) == 1  # nothing re-run
    # in a batch, one prompt's last event is not the end of the stream
    state = StreamState(native=True)
    state.feed(sse({**final, "index": 0}))
    assert not state.finished
    state.feed(sse(final))
    assert state.finished and state.sent_ids == [7, 8]


def test_a_json_answer_lost_on_every_attempt_is_a_typed_502_or_504():
    body = {"text": "hi"}
    status, (text,) = asyncio.run(
        through_router(Upstream([b"", b""]), "/generate", body, retry_max_retries=2)
    )
    error = json.loads(text)["error"]
    assert status == 502 and error["code"] == "upstream_unavailable" and error["type"] == "server_error"
    status, (text,) = asyncio.run(
        through_router(Upstream([None]), "/generate", body, retry_max_retries=1, request_timeout_secs=0.3)
    )
    assert status == 504 and json.loads(text)["error"]["code"] == "worker_timeout"


def test_probes_mark_down_fail_inflight_legs_and_half_open_the_breaker():
    registry = WorkerRegistry(lambda url: CircuitBreaker(url, 1, 1, 3600.0))
    worker = registry.add("http://127.0.0.1:9", Role.DECODE, healthy=True)
    worker.was_healthy = True
    checker = HealthChecker(RouterConfig(health_failure_threshold=2), registry, None, {})
    leg, busy = Leg(worker), Leg(worker)
    leg.start()
    busy.start()
    leg.last_byte -= 60  # nothing from the worker for a minute; `busy` just got bytes
    checker.record(worker, Probe.FAILED)  # a timeout may be a busy worker: one is not enough
    assert worker.healthy and leg.failure is None
    checker.record(worker, Probe.FAILED)
    # down (no new traffic); the leg silent past --worker-stall-timeout fails now, the busy one runs on
    assert not worker.healthy and leg.failure == "worker_timeout" and busy.failure is None
    busy.last_byte -= 60
    checker.record(worker, Probe.FAILED)  # still failing: it went quiet too
    assert busy.failure == "worker_timeout"
    leg.end()
    busy.end()
    assert not worker.inflight
    checker.record(worker, Probe.OK)
    checker.record(worker, Probe.OK)
    assert worker.healthy
    # a refused connection is a dead process: down at the first probe, every leg on it fails
    fresh = Leg(worker)
    fresh.start()
    checker.record(worker, Probe.REFUSED)
    assert not worker.healthy and fresh.failure == "upstream_unavailable"
    fresh.end()
    checker.record(worker, Probe.OK)
    checker.record(worker, Probe.OK)
    # requests opened the breaker while the probes pass: a probe half-opens it, not the 1 h timeout
    worker.breaker.record_failure()
    assert worker.breaker.state is BreakerState.OPEN and not worker.is_available
    checker.record(worker, Probe.OK)
    assert worker.breaker.state is BreakerState.HALF_OPEN and worker.is_available
    worker.breaker.record_success()
    assert worker.breaker.state is BreakerState.CLOSED


def test_a_request_failure_gets_the_worker_probed_at_the_next_tick():
    registry = WorkerRegistry(lambda url: CircuitBreaker(url, 1, 1, 60.0))
    worker = registry.add("http://127.0.0.1:9", Role.DECODE, healthy=True)
    checker = HealthChecker(RouterConfig(), registry, None, {})
    checker._due[worker] = float("inf")
    registry.suspect(worker)
    assert checker._due[worker] == 0.0


def test_a_silent_stream_on_a_busy_worker_waits_on_a_silent_worker_is_marked_down():
    registry = WorkerRegistry(lambda url: CircuitBreaker(url, 1, 1, 60.0))
    worker = registry.add("http://127.0.0.1:9", Role.DECODE, healthy=True)
    config = RouterConfig(worker_stall_timeout=10, request_timeout_secs=100)
    quiet, busy = Leg(worker), Leg(worker)
    quiet.start()
    busy.start()
    quiet.last_byte -= 20  # this stream got nothing for 20 s (e.g. retracted, waiting for KV pages)
    busy.got_bytes()  # while another stream on the worker just got bytes: busy, not hung
    assert stalled(config, quiet) == b"" and worker.healthy and quiet.failure is None
    quiet.last_byte -= 100  # but not past --request-timeout-secs
    assert stalled(config, quiet)[0] == "worker_timeout" and worker.healthy
    worker.last_bytes -= 20  # no stream on it got anything: hung
    code, message = stalled(config, busy)
    assert code == "worker_timeout" and "--worker-stall-timeout" in message and not worker.healthy
    quiet.end()
    busy.end()
