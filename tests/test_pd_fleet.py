"""2 prefill + 2 decode servers behind our router: every server serves, tokens stay the engine's greedy ones.

The CPU stand-in for issue 10's fleet run (2+2 servers, TP2 each, on 8 GPUs): the four servers start
once for the module; the router restarts per policy.
"""

from __future__ import annotations

import concurrent.futures as cf

import httpx
import pytest

from tests.conftest import REFERENCE_ENGINE
from tests.pd_helpers import PD_ARGS, SERVER_ENV, assert_pool_free, generate_ids, start_all
from tests.procs import Process, free_port, router
from tests.server_helpers import ServerProcess, metric_value

pytestmark = pytest.mark.slow

MAX_TOKENS = 8
SHARED = "Disaggregated serving splits the prompt phase from the token phase. "
# (prompt, stream): short prompts, two pairs share a prefix (the cache_aware policy keeps them together)
REQUESTS = [
    ("The capital of France is", False),
    ("def fibonacci(n):", True),
    (SHARED + "Its main benefit is", False),
    (SHARED + "Its main cost is", True),
    ("Three primary colors are", True),
    ("Once upon a time, in a small village,", False),
    ("import numpy as np\nx =", False),
    ("Once upon a time, in a small village, a baker", True),
]


# NOTE: four servers at once: pools of 1024 tokens (the 8 short requests need ~300) keep the run small
FLEET_ARGS = [*PD_ARGS, "--max-total-tokens", "1024"]


class Fleet:
    """Two prefill and two decode servers (no router): `fleet.router(policy)` puts one in front."""

    def __init__(self):
        self.bootstrap_ports = [free_port(), free_port()]
        self.prefills = [ServerProcess("--disaggregation-mode", "prefill", "--disaggregation-bootstrap-port",
                                       str(port), "--dtype", "float32", *FLEET_ARGS)
                         for port in self.bootstrap_ports]  # fmt: skip
        self.decodes = [ServerProcess("--disaggregation-mode", "decode", "--dtype", "float32", *FLEET_ARGS)
                        for _ in range(2)]  # fmt: skip

    @property
    def servers(self) -> list[ServerProcess]:
        return [*self.prefills, *self.decodes]

    def router(self, policy: str) -> Process:
        legs = ["--pd-disaggregation"]
        for server, bootstrap_port in zip(self.prefills, self.bootstrap_ports, strict=True):
            legs += ["--prefill", server.url, str(bootstrap_port)]
        for server in self.decodes:
            legs += ["--decode", server.url]
        return router([*legs, "--policy", policy], env=SERVER_ENV)

    def stop(self) -> None:
        for server in self.servers:
            server.stop()


@pytest.fixture(scope="module")
def fleet():
    for attempt in range(3):
        fleet = Fleet()
        try:
            start_all(fleet.servers)
            break
        except BaseException as e:
            fleet.stop()
            # NOTE: a free port can be taken by another process before the server binds it
            if "Address already in use" not in str(e) or attempt == 2:
                raise
    try:
        yield fleet
    finally:
        fleet.stop()


@pytest.fixture(scope="module")
def reference(engines) -> list[list[int]]:
    engine = engines.get(**REFERENCE_ENGINE, dtype="float32")
    try:
        ids = [engine.tokenizer.encode(prompt) for prompt, _ in REQUESTS]
        outs = engine.generate(ids, {"max_new_tokens": MAX_TOKENS, "temperature": 0})
        return [o["output_ids"] for o in outs]
    finally:
        engines.close()  # freed before the four servers start


def generate(client: httpx.Client, prompt: str, stream: bool) -> list[int]:
    return generate_ids(client, prompt, stream, MAX_TOKENS)


def requests_served(server: ServerProcess) -> float:
    """Requests the server finished (its disagg_requests_total, every finish reason)."""
    text = httpx.get(server.url + "/metrics", timeout=10).text
    return metric_value(text, "disagg_requests_total")


@pytest.mark.parametrize("policy", ["cache_aware", "power_of_two"])
def test_every_server_of_the_fleet_serves_the_greedy_tokens(reference, fleet, policy):
    before = [requests_served(s) for s in fleet.servers]
    router = fleet.router(policy).start(timeout=60)
    try:
        # all at once: both policies spread concurrent requests over the idle servers
        with (
            httpx.Client(base_url=router.url, timeout=120) as client,
            cf.ThreadPoolExecutor(len(REQUESTS)) as pool,
        ):
            futures = [pool.submit(generate, client, prompt, stream) for prompt, stream in REQUESTS]
            got = [f.result() for f in futures]
    finally:
        router.stop()
    assert got == reference
    served = [requests_served(s) - b for s, b in zip(fleet.servers, before, strict=True)]
    # each request passes one prefill and one decode server
    assert sum(served[:2]) == len(REQUESTS) and sum(served[2:]) == len(REQUESTS), served
    assert all(n >= 1 for n in served), f"prefill, prefill, decode, decode served {served}"
    for server in fleet.servers:
        assert_pool_free(server)
