"""Start a prefill server, a decode server and a router (ours or SGLang's) as real processes."""

from __future__ import annotations

import json
from collections.abc import Callable

import httpx
import pytest
from disagg.common.config import env_cpu_threads

from tests.procs import Process, free_port, kill_group, router, sglang_router, wait_until
from tests.server_helpers import ServerProcess

# small pools and context (fast start-up), chunks of 64 tokens (long prompts travel in pieces)
PD_ARGS = ["--max-total-tokens", "4096", "--context-length", "512", "--chunked-prefill-size", "64",
           "--log-level", "warning", "--grace-period", "3"]  # fmt: skip
# NOTE: several servers share 2 cores: torch's CPU kernels crawl when oversubscribed
SERVER_ENV = env_cpu_threads(1)


def start_all(servers: list[ServerProcess], timeout: float = 300) -> None:
    """Launch every server (with SERVER_ENV), then wait for each: they start side by side."""
    for server in servers:
        server.env = {**SERVER_ENV, **server.env}
        server.launch()
    errors: list[BaseException] = []
    for server in servers:
        try:
            server.wait_healthy(timeout)
        except BaseException as e:  # noqa: BLE001 - re-raised below, once every server is waited for
            errors.append(e)
    if errors:
        raise errors[0]


class PDCluster:
    """prefill + decode (+ router): `with PDCluster(...) as pd: pd.client.post(...)`."""

    def __init__(self, prefill_args=(), decode_args=(), router: str | None = "disagg", timeout: float = 10.0):
        self.args = (list(prefill_args), list(decode_args), timeout)
        self.router_kind = router
        self.router: Process | None = None
        self._make_servers()

    def _make_servers(self) -> None:
        prefill_args, decode_args, timeout = self.args
        self.bootstrap_port = free_port()
        common = [*PD_ARGS, "--disaggregation-transfer-timeout", str(timeout)]
        self.prefill = ServerProcess("--disaggregation-mode", "prefill", "--disaggregation-bootstrap-port",
                                     str(self.bootstrap_port), *common, *prefill_args)  # fmt: skip
        self.decode = ServerProcess("--disaggregation-mode", "decode", *common, *decode_args)

    def start(self, attempts: int = 3) -> PDCluster:
        assert self.prefill.proc is None, "already started"
        for attempt in range(attempts):
            try:
                start_all([self.prefill, self.decode])
                if self.router_kind:
                    self.router = self._router().start(timeout=60)
                return self
            except BaseException as e:
                self.stop()
                # NOTE: a free port can be taken by another process before the server binds it
                if "Address already in use" not in str(e) or attempt == attempts - 1:
                    raise
                self._make_servers()
        return self

    def _router(self) -> Process:
        legs = ["--pd-disaggregation", "--prefill", self.prefill.url, str(self.bootstrap_port),
                "--decode", self.decode.url]  # fmt: skip
        return (router if self.router_kind == "disagg" else sglang_router)(legs, env=SERVER_ENV)

    @property
    def url(self) -> str:
        return self.router.url

    def client(self, **kw) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=kw.pop("timeout", 120), **kw)

    def stop(self) -> None:
        if self.router is not None:
            self.router.stop()
        for server in (self.prefill, self.decode):
            server.stop()

    def kill(self, server: ServerProcess) -> None:
        kill_group(server.proc.pid)

    def __enter__(self) -> PDCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def pd_fixtures(answers: Callable[[str], dict]):
    """The module fixtures of a test file that compares PD with a colocated server:
    `colocated, pd = pd_fixtures(answers)`. `colocated` is what `answers(url)` reads from a colocated
    server at PD_ARGS; `pd` a prefill + decode + router cluster, started after the colocated server
    stopped (one deployment at a time: they share 2 cores)."""

    @pytest.fixture(scope="module")
    def colocated(default_model_path) -> dict:
        srv = ServerProcess(*PD_ARGS, env=SERVER_ENV)
        try:
            return answers(srv.start().url)
        finally:
            srv.stop()

    @pytest.fixture(scope="module")
    def pd(colocated):
        with PDCluster() as cluster:
            yield cluster

    return colocated, pd


def stats(server: ServerProcess) -> dict:
    info = httpx.get(server.url + "/server_info", timeout=10).json()
    return info["internal_states"][0]


def is_idle(server: ServerProcess) -> bool:
    """No request anywhere in the server, no open room, and every page free or held by the prefix cache."""
    s = stats(server)
    if "stale_for_s" in s:  # the scheduler is busy in a step: these figures are older
        return False
    return not any(s["queues"].values()) and s["num_request_pages"] == 0 and s["num_open_rooms"] == 0


def assert_pool_free(server: ServerProcess, timeout: float = 30) -> None:
    assert wait_until(lambda: is_idle(server), timeout=timeout), stats_text(server)
    assert httpx.post(server.url + "/flush_cache", timeout=10).status_code == 200
    assert stats(server)["num_used_pages"] == 0


def stats_text(server: ServerProcess) -> str:
    s = dict(stats(server))
    s.pop("metrics_text", None)
    return json.dumps(s)


def generate_ids(client: httpx.Client, prompt: str, stream: bool, max_tokens: int, **extra) -> list[int]:
    """Greedy `/generate` through `client` (a router or a server), streaming or not: the output ids."""
    body = {"text": prompt, "sampling_params": {"max_new_tokens": max_tokens, "temperature": 0},
            "stream": stream, **extra}  # fmt: skip
    if not stream:
        r = client.post("/generate", json=body)
        assert r.status_code == 200, r.text
        return r.json()["output_ids"]
    last = None
    with client.stream("POST", "/generate", json=body) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                last = json.loads(line[6:])
    return last["output_ids"]
