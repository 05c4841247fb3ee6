"""Fast checks of the isolation pieces without a model: how engine errors are classified, who may
abort what, the size bound before tokenizing, and that a crash is an error object after which the
same keep-alive connection still serves (a real uvicorn, a raw socket)."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import pytest
import uvicorn
from disagg.common.engine.request import SchedulerStats
from disagg.common.engine.scheduler import NOT_FINITE
from disagg.common.server.http_server import create_app
from disagg.common.server.ipc import AbortReqMsg, PongMsg
from disagg.common.server.metrics import ServerMetrics
from disagg.common.server.serving import ServerState, engine_error
from disagg.common.server.tokenizer_manager import ANY_OWNER, ReqState, TokenizerManager


@pytest.mark.parametrize(
    "error,status,code",
    [
        ("KV transfer failed: timeout: the decode server did not ask for room 5", 504, "kv_transfer_failed"),
        ("KV transfer failed: peer_died: connection reset", 502, "kv_transfer_failed"),
        ("aborted", 400, "request_aborted"),
        (NOT_FINITE, 500, "numerical_error"),
        ("bootstrap_room 7 is already in use on this decode server", 409, "bootstrap_room_in_use"),
        ("bootstrap_host, bootstrap_port and bootstrap_room must be given together", 400, "invalid_value"),
        ("input token ids must be in [0, 49152)", 400, "invalid_value"),
    ],
)
def test_engine_errors_are_classified_once(error, status, code):
    err = engine_error(error)
    assert (err.status, err.code) == (status, code)
    assert err.type == ("server_error" if status >= 500 else "invalid_request_error")


class FakeTokenizer:
    def get_vocab(self) -> dict:
        return {"a": 0, "hello": 1, "<|im_start|>": 2}  # longest token: 12 characters

    def encode(self, text: str, **_) -> list[int]:
        return [1] * (len(text) // 5)


def fake_manager() -> tuple[TokenizerManager, list]:
    tm = TokenizerManager(FakeTokenizer(), None, context_length=100, metrics=ServerMetrics())
    sent = []
    tm._send = sent.append
    return tm, sent


def test_abort_only_own_requests_exact_ids_and_n_siblings():
    tm, sent = fake_manager()
    for rid, owner in [("gen-abc", "alice"), ("cmpl-1-0", "alice"), ("cmpl-1-1", "alice"), ("gen-x", "bob")]:
        tm.reqs[rid] = ReqState(owner=owner)
    assert tm.abort("gen", "alice") == 0  # a prefix of an id is not the id
    assert tm.abort("gen-x", "alice") == 0  # bob's request
    assert tm.abort("cmpl-1", "alice") == 2  # the n=2 samples of alice's request
    assert [m.rid for m in sent] == ["cmpl-1-0", "cmpl-1-1"] and all(isinstance(m, AbortReqMsg) for m in sent)
    assert tm.abort("gen-x", ANY_OWNER) == 1  # the admin
    assert tm.abort(None) == 4
    sent.clear()
    for rid in ("gen-abc-r1", "gen-abc-m1-0", "gen-abcd"):  # the router's retry and migration of gen-abc
        tm.reqs[rid] = ReqState(owner="alice")
    assert tm.abort("gen-abc", "alice") == 3
    assert sorted(m.rid for m in sent) == ["gen-abc", "gen-abc-m1-0", "gen-abc-r1"]


def test_text_too_long_for_the_context_is_refused_before_tokenizing():
    tm, _ = fake_manager()
    assert tm.max_prompt_chars == 100 * 12 * 2
    tm.check_size(2400, "prompt")
    with pytest.raises(Exception) as exc:
        tm.check_size(2401, "prompt")
    assert exc.value.status == 400 and exc.value.code == "context_length_exceeded"
    assert asyncio.run(tm.tokenize("hello" * 10)) == [1] * 10


class IdleManager:
    """Enough of a TokenizerManager for the app's lifespan and routes that never reach a scheduler."""

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass


def http_exchange(sock: socket.socket, request: bytes) -> bytes:
    sock.sendall(request)
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(
        next(x.split(b":")[1] for x in head.split(b"\r\n") if x.lower().startswith(b"content-length"))
    )
    while len(body) < length:
        body += sock.recv(65536)
    return head.split(b"\r\n")[0] + b" " + body


def test_a_crash_is_an_error_object_and_the_connection_stays_usable():
    state = ServerState(IdleManager(), ServerMetrics(), "m", "m", 128)
    app = create_app(state)

    @app.get("/boom")
    async def boom():
        raise RuntimeError("a bug")

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="critical"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.02)
        with socket.create_connection(("127.0.0.1", port)) as sock:
            get = lambda path: f"GET {path} HTTP/1.1\r\nhost: x\r\n\r\n".encode()  # noqa: E731
            crashed = http_exchange(sock, get("/boom"))
            assert crashed.startswith(b"HTTP/1.1 500") and b'"code":"internal_error"' in crashed
            bad = http_exchange(
                sock, b'POST /abort_request HTTP/1.1\r\nhost: x\r\ncontent-length: 9\r\n\r\n{"rid":5}'
            )
            assert bad.startswith(b"HTTP/1.1 400") and b'"param":"rid"' in bad
            missing = http_exchange(sock, get("/nothing"))
            assert missing.startswith(b"HTTP/1.1 404") and b'"code":"not_found"' in missing
            assert http_exchange(sock, get("/v1/models")).startswith(b"HTTP/1.1 200")  # the same socket
    finally:
        server.should_exit = True
        thread.join(10)


class BusyManager(IdleManager):
    """A scheduler that answered once, then is busy past every stats timeout (a long step)."""

    def __init__(self):
        self.answer = True
        self.num_in_flight = 0

    async def ping(self, timeout: float, want_stats: bool = False, **_) -> PongMsg | None:
        if not self.answer:
            return None
        stats = SchedulerStats(num_running=2, num_waiting=1, num_total_pages=64, num_free_pages=40, num_used_pages=24,
                               num_request_pages=20, num_cached_pages=4, kv_usage=0.375, cache_hit_rate=0.5,
                               num_retractions=0)  # fmt: skip
        self.last_stats, self.last_stats_at = stats, time.monotonic()
        return PongMsg(1, stats)


def test_server_info_shows_the_last_stats_marked_stale_while_the_scheduler_is_busy():
    from fastapi.testclient import TestClient

    tm = BusyManager()
    with TestClient(create_app(ServerState(tm, ServerMetrics(), "m", "m", 128))) as client:
        fresh = client.get("/server_info").json()["internal_states"][0]
        assert fresh["num_running"] == 2 and "stale_for_s" not in fresh
        tm.answer = False
        time.sleep(0.05)
        stale = client.get("/server_info").json()["internal_states"][0]
        assert {k: v for k, v in stale.items() if k != "stale_for_s"} == fresh  # not an empty dict
        assert stale["stale_for_s"] >= 0.05
