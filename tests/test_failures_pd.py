"""The router's side of the failure contract (docs/failures.md) against real PD processes.

One prefill and two decode servers; faults are real: SIGKILL, SIGSTOP/SIGCONT, restart on the same
port. Each test asserts what the client sees, how fast, and that the servers hold nothing after.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import signal
import threading
import time

import httpx
import pytest

from tests.pd_helpers import PD_ARGS, assert_pool_free, is_idle, start_all, stats
from tests.procs import fake_worker, router
from tests.server_helpers import ServerProcess, free_port, metric_value, wait_until

pytestmark = pytest.mark.slow

TRANSFER_TIMEOUT_S = 10.0
MAX_NEW = 96
PROMPTS = [[(1000 + 37 * i + 11 * j) % 30000 + 100 for j in range(96)] for i in range(4)]
# long prompts (6 prefill chunks each) for faults that must hit a request while it is prefilled
LONG_PROMPTS = [[(500 + 53 * i + 7 * j) % 30000 + 100 for j in range(380)] for i in range(4)]


class Fleet:
    """Two prefill and two decode servers; most tests use the first prefill alone."""

    def __init__(self):
        self.bootstrap_ports = [free_port(), free_port()]
        common = [*PD_ARGS, "--disaggregation-transfer-timeout", str(TRANSFER_TIMEOUT_S)]
        self.prefills = [ServerProcess("--disaggregation-mode", "prefill", "--disaggregation-bootstrap-port",
                                       str(port), *common) for port in self.bootstrap_ports]  # fmt: skip
        self.prefill = self.prefills[0]
        self.decodes = [ServerProcess("--disaggregation-mode", "decode", *common) for _ in range(2)]

    def router(self, *extra: str, decodes: list[str] | None = None, prefills: int = 1):
        args = ["--pd-disaggregation", "--policy", "round_robin", "--retry-initial-backoff-ms", "5", *extra]
        for server, port in list(zip(self.prefills, self.bootstrap_ports, strict=True))[:prefills]:
            args += ["--prefill", server.url, str(port)]
        for url in decodes if decodes is not None else [d.url for d in self.decodes]:
            args += ["--decode", url]
        return router(args).start(timeout=60)

    def restart(self, server: ServerProcess) -> float:
        """Start a killed server again on its port; the monotonic time its own /health passed."""
        if server.proc is not None and server.proc.poll() is None:
            os.killpg(server.proc.pid, signal.SIGKILL)
        server.proc.wait()
        server.proc = None
        start_all([server], timeout=180)
        return time.monotonic()


@pytest.fixture(scope="module")
def fleet():
    f = Fleet()
    try:
        start_all([*f.prefills, *f.decodes])
        yield f
    finally:
        for s in (*f.prefills, *f.decodes):
            if s.proc is not None:
                try:
                    os.killpg(s.proc.pid, signal.SIGCONT)
                except ProcessLookupError:
                    pass
            s.stop()


class Stream:
    """One streaming /generate through the router, read in a thread; `tokens` grows as events come."""

    def __init__(self, url: str, prompt: list[int], max_new: int = MAX_NEW):
        self.url, self.prompt, self.max_new = url, prompt, max_new
        self.tokens = 0
        self.events: list[dict] = []
        self.error: dict | None = None
        self.error_at: float | None = None
        self.done = False
        self.after_done = 0  # events after [DONE]: must stay 0
        self.ended = 0.0

    def run(self) -> Stream:
        body = {"input_ids": self.prompt, "stream": True,
                "sampling_params": {"max_new_tokens": self.max_new, "temperature": 0, "ignore_eos": True}}  # fmt: skip
        with httpx.stream("POST", self.url + "/generate", json=body, timeout=120) as r:
            assert r.status_code == 200, r.read()
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                if self.done:
                    self.after_done += 1
                elif line == "data: [DONE]":
                    self.done = True
                elif "error" in (event := json.loads(line[6:])):
                    self.error, self.error_at = event["error"], time.monotonic()
                else:
                    self.events.append(event)
                    self.tokens = len(event["output_ids"])
        self.ended = time.monotonic()
        return self

    @property
    def ids(self) -> list[int]:
        return self.events[-1]["output_ids"] if self.events else []

    @property
    def ok(self) -> bool:
        last = self.events[-1]["meta_info"] if self.events else {}
        return self.done and self.error is None and (last.get("finish_reason") or {}).get("type") == "length"

    def assert_no_repeat_or_loss(self) -> None:
        """Every event extends the previous one: no token sent twice, none dropped."""
        for prev, event in zip(self.events, self.events[1:], strict=False):
            assert event["output_ids"][: len(prev["output_ids"])] == prev["output_ids"]
            assert event["text"].startswith(prev["text"])


def chat_stream(url: str) -> dict:
    """A streaming chat completion: its chunks, the error event if any, whether [DONE] came last."""
    body = {"messages": [{"role": "user", "content": "Count slowly from one to a hundred."}],
            "max_tokens": MAX_NEW, "temperature": 0, "ignore_eos": True, "stream": True}  # fmt: skip
    out = {"chunks": 0, "error": None, "done": False}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=120) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line == "data: [DONE]":
                out["done"] = True
            elif line.startswith("data: "):
                assert not out["done"]
                event = json.loads(line[6:])
                if "error" in event:
                    out["error"], out["error_at"] = event["error"], time.monotonic()
                out["chunks"] += "choices" in event
    return out


class OpenAIStream:
    """One streaming chat or text completion through the router, read in a thread."""

    def __init__(self, url: str, path: str, body: dict):
        self.url, self.path = url, path
        self.body = {**body, "max_tokens": MAX_NEW, "temperature": 0, "ignore_eos": True, "stream": True}
        self.tokens = 0  # chunks with output so far
        self.text, self.ids, self.usage = "", [], None
        self.heads: set[tuple] = set()  # (id, object, created, choice index) of every chunk
        self.lines: list[str] = []  # as received (shown when a check fails)
        self.error: dict | None = None
        self.done = False
        self.ended = 0.0

    def run(self) -> OpenAIStream:
        with httpx.stream("POST", self.url + self.path, json=self.body, timeout=120) as r:
            assert r.status_code == 200, r.read()
            for line in r.iter_lines():
                if line == "data: [DONE]":
                    self.done = True
                elif line.startswith("data: "):
                    assert not self.done  # nothing after [DONE]
                    self.lines.append(line)
                    self._event(json.loads(line[6:]))
        self.ended = time.monotonic()
        return self

    def _event(self, event: dict) -> None:
        if "error" in event:
            self.error = event["error"]
            return
        self.usage = event.get("usage") or self.usage
        for c in event["choices"]:
            self.heads.add((event["id"], event["object"], event["created"], c["index"]))
            self.text += c["delta"].get("content", "") if "delta" in c else c["text"]
            self.ids += c.get("token_ids", [])
            self.tokens += 1

    @property
    def ok(self) -> bool:
        return self.done and self.error is None and len(self.heads) == 1

    @property
    def counts(self) -> tuple | None:
        """Usage's prompt, completion and total tokens (the cached share depends on the run)."""
        u = self.usage
        return (u["prompt_tokens"], u["completion_tokens"], u["total_tokens"]) if u else None


OPENAI_STREAMS = [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Count slowly from one to a hundred."}],
                              "stream_options": {"include_usage": True}}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Name the planets."}],
                              "return_token_ids": True}),
    ("/v1/completions", {"prompt": "The history of the printing press", "stream_options": {"include_usage": True}}),
    ("/v1/completions", {"prompt": PROMPTS[0][:40], "return_token_ids": True}),
]  # fmt: skip


def run_streams(url: str, until=None, action=None, prompts=PROMPTS, max_new: int = MAX_NEW, openai=False):
    """The four streams at once; `action()` runs once `until(streams)` holds."""
    if openai:
        streams = [OpenAIStream(url, path, body) for path, body in OPENAI_STREAMS]
    else:
        streams = [Stream(url, p, max_new) for p in prompts]
    with cf.ThreadPoolExecutor(len(streams)) as pool:
        futures = [pool.submit(s.run) for s in streams]
        if action is not None:
            assert wait_until(lambda: until(streams), timeout=120, interval=0.05)
            action()
        for f in futures:
            f.result()
    return streams


class HealthWatch:
    """Polls the router's view of one worker every 20 ms from a thread: when it changed, and to what."""

    def __init__(self, router_proc, worker_url: str):
        self.args = (router_proc, worker_url)
        self.changes: list[tuple[float, bool]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self) -> HealthWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _poll(self) -> None:
        last = None
        while not self._stop.wait(0.02):
            try:
                now = healthy(*self.args)
            except httpx.HTTPError:
                continue
            if now != last:
                self.changes.append((time.monotonic(), now))
                last = now

    def first(self, value: bool, after: float, within: float = 0.0) -> float | None:
        """Seconds from `after` until the router first showed `value` (waiting up to `within` s
        after `after` for it: the requests may all be done before the router's checks tell)."""
        while True:
            seen = next((t - after for t, v in list(self.changes) if v == value and t >= after), None)
            if seen is not None or time.monotonic() > after + within:
                return seen
            time.sleep(0.05)


def healthy(router_proc, worker_url: str) -> bool:
    text = httpx.get(router_proc.url + "/metrics").text
    return metric_value(text, "disagg_router_worker_healthy", worker=worker_url) == 1


def router_metric(router_proc, name: str, **labels) -> float:
    return metric_value(httpx.get(router_proc.url + "/metrics").text, name, **labels)


def requests_done(server: ServerProcess) -> float:
    return metric_value(httpx.get(server.url + "/metrics").text, "disagg_requests_total")


def test_decode_killed_mid_stream_continues_on_the_other_decode(fleet):
    d0, d1 = fleet.decodes
    with fleet.router() as r, HealthWatch(r, d0.url) as watch:  # --max-migrations 1 by default
        reference = [s.ids for s in run_streams(r.url)]
        assert all(len(ids) == MAX_NEW for ids in reference)
        killed = {}

        def kill():
            killed["at"] = time.monotonic()
            os.killpg(d0.proc.pid, signal.SIGKILL)

        def mid_stream(streams):
            return all(s.tokens >= 8 for s in streams) and stats(d0)["queues"]["running"] >= 1

        streams = run_streams(r.url, mid_stream, kill)
        # 0 failed requests, the same greedy tokens as undisturbed, nothing repeated or lost
        assert [s.ok for s in streams] == [True] * 4, [s.error for s in streams]
        assert [s.ids for s in streams] == reference
        for s in streams:
            s.assert_no_repeat_or_loss()
            assert s.after_done == 0
        assert router_metric(r, "disagg_router_migrations_total", outcome="ok") >= 1
        # the dead decode is out of rotation at once (its refused probe), nothing held on the prefill
        down_after = watch.first(False, killed["at"])
        assert down_after is not None and down_after < 5
        print(f"\n4/4 streams whole after the kill of a decode; marked down after {down_after:.2f} s, "
              f"streams done {max(s.ended for s in streams) - killed['at']:.2f} s after the kill")  # fmt: skip
        assert wait_until(lambda: is_idle(fleet.prefill), timeout=10)
        assert is_idle(d1)

        # restarted on the same port: serving within seconds of its own health check passing
        passed = fleet.restart(d0)
        # NOTE: `passed` is up to 0.5 s late (the test polls /health at that pace): `back` may be < 0
        assert wait_until(lambda: watch.first(True, killed["at"]) is not None, timeout=10)
        back = watch.first(True, killed["at"]) + killed["at"] - passed
        before = requests_done(d0)
        for _ in range(2):  # round robin over the two decodes
            body = {"input_ids": PROMPTS[0][:20], "sampling_params": {"max_new_tokens": 2}}
            assert httpx.post(r.url + "/generate", json=body, timeout=60).status_code == 200
        assert requests_done(d0) > before
        print(f"\nrestarted decode healthy in the router {back:.2f} s after its /health passed")
        assert back < 10


def test_decode_killed_mid_openai_stream_continues_on_the_other_decode(fleet):
    d0, d1 = fleet.decodes
    try:
        with fleet.router() as r:
            reference = run_streams(r.url, openai=True)
            assert all(s.ok for s in reference)
            killed = {}

            def kill():
                killed["at"] = time.monotonic()
                os.killpg(d0.proc.pid, signal.SIGKILL)

            def mid_stream(streams):
                return all(s.tokens >= 8 for s in streams) and stats(d0)["queues"]["running"] >= 1

            streams = run_streams(r.url, mid_stream, kill, openai=True)
            # 0 failed; each client saw one stream (one id, one choice index) with the undisturbed greedy
            # text, token ids and usage: nothing repeated or lost at the seam
            assert [s.ok for s in streams] == [True] * 4, [(s.error, s.heads) for s in streams]
            assert [s.text for s in streams] == [s.text for s in reference]
            assert [s.ids for s in streams] == [s.ids for s in reference], streams[1].lines[:16]
            assert [s.counts for s in streams] == [s.counts for s in reference]
            assert streams[1].ids and streams[0].counts[1] == MAX_NEW
            assert router_metric(r, "disagg_router_migrations_total", outcome="ok") >= 1
            print(f"\n4/4 OpenAI streams whole {max(s.ended for s in streams) - killed['at']:.2f} s after "
                  "the kill of a decode")  # fmt: skip
            assert wait_until(lambda: is_idle(fleet.prefill), timeout=10)
            assert is_idle(d1)
    finally:  # the next tests need both decodes
        fleet.restart(d0)


def test_decode_killed_without_migration_ends_streams_with_an_error_event(fleet):
    d0, d1 = fleet.decodes
    with (
        fleet.router("--max-migrations", "0") as r,
        fleet.router("--max-migrations", "0", decodes=[d1.url]) as only_d1,  # a chat surely on d1
        HealthWatch(r, d1.url) as watch,
        cf.ThreadPoolExecutor(1) as pool,
    ):
        killed = {}
        chat = pool.submit(chat_stream, only_d1.url)

        def kill():
            killed["at"] = time.monotonic()
            os.killpg(d1.proc.pid, signal.SIGKILL)

        def mid_stream(streams):
            return all(s.tokens >= 8 for s in streams) and stats(d1)["queues"]["running"] >= 2

        streams = run_streams(r.url, mid_stream, kill)
        # the typed error event then [DONE], never a silent cut
        chat = chat.result()
        assert chat["done"] and chat["error"]["code"] == "upstream_unavailable" and chat["chunks"] >= 1
        assert chat["error_at"] - killed["at"] < 5
        broken = [s for s in streams if not s.ok]
        assert len(broken) >= 1  # the streams on d1; those on d0 finish
        for s in broken:  # an error event then [DONE]: never a silent truncation
            assert s.done and s.error["code"] == "upstream_unavailable" and s.error["type"] == "server_error"
            assert s.error_at - killed["at"] < 5
            assert 0 < len(s.ids) < MAX_NEW
        assert all(s.ok for s in streams if s not in broken)
        assert wait_until(lambda: watch.first(False, killed["at"]) is not None, timeout=5)
        down_after = watch.first(False, killed["at"])
        assert down_after < 5
        print(f"\n{len(broken)}/4 streams ended with an error event, the last "
              f"{max(s.error_at for s in broken) - killed['at']:.2f} s after the kill; "
              f"marked down after {down_after:.2f} s")  # fmt: skip
        # new traffic avoids the dead decode
        body = {"input_ids": PROMPTS[1][:20], "sampling_params": {"max_new_tokens": 2}}
        assert httpx.post(r.url + "/generate", json=body, timeout=60).status_code == 200
        assert wait_until(lambda: is_idle(fleet.prefill) and is_idle(d0), timeout=10)
    fleet.restart(d1)


def test_hung_decode_is_detected_and_its_streams_move(fleet):
    d0, d1 = fleet.decodes
    with fleet.router() as r, HealthWatch(r, d0.url) as watch:
        wait_until(lambda: healthy(r, d0.url) and healthy(r, d1.url), timeout=10)
        stopped = {}

        def stop():
            stopped["at"] = time.monotonic()
            os.killpg(d0.proc.pid, signal.SIGSTOP)

        def mid_stream(streams):
            return all(s.tokens >= 8 for s in streams) and stats(d0)["queues"]["running"] >= 1

        try:
            streams = run_streams(r.url, mid_stream, stop)
            took = time.monotonic() - stopped["at"]
            detected = watch.first(False, stopped["at"], within=20)
            stalls = router_metric(r, "disagg_router_worker_marked_down_total", reason="stream_stall")
            probes = router_metric(r, "disagg_router_worker_marked_down_total", reason="health_failures")
            assert not healthy(r, d0.url) and detected is not None and detected <= 15
            assert stalls + probes == 1
            # the hung decode's streams moved once it was detected: all whole
            assert [s.ok for s in streams] == [True] * 4, [s.error for s in streams]
            for s in streams:
                s.assert_no_repeat_or_loss()
            how = "a stalled stream" if stalls else "its health probes"
            print(f"\nSIGSTOPped decode marked down {detected:.2f} s after the stop ({how}); "
                  f"every stream done after {took:.2f} s")  # fmt: skip
            body = {"input_ids": PROMPTS[2][:20], "sampling_params": {"max_new_tokens": 2}}
            before = requests_done(d1)
            assert httpx.post(r.url + "/generate", json=body, timeout=60).status_code == 200
            assert requests_done(d1) == before + 1  # new traffic avoids the hung one
        finally:
            os.killpg(d0.proc.pid, signal.SIGCONT)
        # resumed: back in rotation, and it holds nothing for the streams it lost
        assert wait_until(lambda: healthy(r, d0.url), timeout=15)
        assert_pool_free(d0)
        assert_pool_free(d1)


def test_failed_decode_leg_aborts_the_prefill_at_once(fleet):
    fake = fake_worker("fake-decode").start()
    try:
        httpx.post(fake.url + "/_fake/config", json={"mode": "fail", "status": 503}).raise_for_status()
        with fleet.router("--retry-max-retries", "3", decodes=[fake.url]) as r:
            body = {"input_ids": PROMPTS[3] * 3, "sampling_params": {"max_new_tokens": 4}, "rid": "orphan"}
            resp = httpx.post(r.url + "/generate", json=body, timeout=60)
            answered = time.monotonic()
            assert resp.status_code == 503
            # three attempts, each one's prefill told to stop before the next began
            assert len(httpx.get(fake.url + "/_fake/log").json()["requests"]) == 3
            assert router_metric(r, "disagg_router_leg_aborts_total", role="prefill") == 3
            # the prefill frees the room at once, not after the transfer timeout
            assert wait_until(lambda: is_idle(fleet.prefill), timeout=TRANSFER_TIMEOUT_S / 2, interval=0.05)
            print(f"\nprefill idle {time.monotonic() - answered:.2f} s after the client's 503")
            # a 4xx is the client's mistake: one attempt, not counted against the worker
            httpx.post(fake.url + "/_fake/reset")
            httpx.post(fake.url + "/_fake/config", json={"mode": "fail", "status": 400}).raise_for_status()
            errors = router_metric(r, "disagg_router_worker_errors_total", worker=fake.url)
            assert httpx.post(r.url + "/generate", json=body, timeout=60).status_code == 400
            assert len(httpx.get(fake.url + "/_fake/log").json()["requests"]) == 1
            assert router_metric(r, "disagg_router_worker_errors_total", worker=fake.url) == errors
    finally:
        fake.stop()
    assert_pool_free(fleet.prefill)


def busy(server: ServerProcess) -> bool:
    return any(stats(server)["queues"].values())


def flush_cache(server: ServerProcess) -> None:
    """Drop `server`'s prefix cache: the reference run cached the prompts, and a cached prefill can
    come and go between two polls of `busy` (a clean-clone CI run of 2026-12-04: the poll never saw it in 120 s)."""
    assert wait_until(
        lambda: httpx.post(server.url + "/flush_cache", timeout=10).status_code == 200, timeout=30
    )


def test_hung_prefill_is_detected_and_its_requests_retried(fleet):
    p0, p1 = fleet.prefills
    with fleet.router(prefills=2) as r, HealthWatch(r, p1.url) as watch:
        reference = [s.ids for s in run_streams(r.url, prompts=LONG_PROMPTS, max_new=24)]
        stopped = {}

        def stop():
            stopped["at"] = time.monotonic()
            os.killpg(p1.proc.pid, signal.SIGSTOP)

        flush_cache(p1)
        try:
            streams = run_streams(r.url, lambda _: busy(p1), stop, prompts=LONG_PROMPTS, max_new=24)
            detected = watch.first(False, stopped["at"], within=20)
            # requests caught on the hung prefill are retried on the other one: none fails
            assert [s.ok for s in streams] == [True] * 4, [s.error for s in streams]
            assert [s.ids for s in streams] == reference
            assert detected is not None and detected <= 15
            print(f"\nSIGSTOPped prefill marked down {detected:.2f} s after the stop; 4/4 requests whole "
                  f"{max(s.ended for s in streams) - stopped['at']:.2f} s after it")  # fmt: skip
        finally:
            os.killpg(p1.proc.pid, signal.SIGCONT)
        assert wait_until(lambda: healthy(r, p1.url), timeout=15)
        for server in (p1, p0, *fleet.decodes):  # the resumed prefill kept nothing of what it lost
            assert_pool_free(server)


def test_prefill_killed_mid_request_is_retried_on_the_other_prefill(fleet):
    p0, p1 = fleet.prefills
    with fleet.router(prefills=2) as r, HealthWatch(r, p1.url) as watch:
        reference = [s.ids for s in run_streams(r.url, prompts=LONG_PROMPTS, max_new=24)]
        killed = {}

        def kill():
            killed["at"] = time.monotonic()
            os.killpg(p1.proc.pid, signal.SIGKILL)

        flush_cache(p1)
        streams = run_streams(r.url, lambda _: busy(p1), kill, prompts=LONG_PROMPTS, max_new=24)
        assert [s.ok for s in streams] == [True] * 4, [s.error for s in streams]
        assert [s.ids for s in streams] == reference
        down = watch.first(False, killed["at"])
        assert down is not None and down < 5
        print(f"\nkilled prefill marked down after {down:.2f} s; 4/4 requests whole "
              f"{max(s.ended for s in streams) - killed['at']:.2f} s after the kill")  # fmt: skip
        for server in (p0, *fleet.decodes):
            assert_pool_free(server)
