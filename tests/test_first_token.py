"""A PD request's first token leaves the decode server as soon as its KV landed, not when the
decode's running step ends (common/engine/device_wait.py, issue 24)."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

from tests.conftest import REFERENCE_ENGINE
from tests.pd_helpers import PDCluster, assert_pool_free
from tests.server_helpers import metric_value

pytestmark = pytest.mark.slow

STEP_S = 4.0  # every decode forward takes this much longer (DISAGG_STEP_DELAY_S): long decode steps
RUNNING = "The history of the printing press begins"
PROBE = "The capital of France is"


class SlowDecodeCluster(PDCluster):
    """A PD pair whose decode steps each take STEP_S longer (`env`: both servers' extra environment)."""

    def __init__(self, *args, env: dict | None = None, **kw):
        self.env = env or {}
        super().__init__(*args, **kw)

    def _make_servers(self) -> None:
        super()._make_servers()
        self.prefill.env.update(self.env)
        self.decode.env.update({**self.env, "DISAGG_STEP_DELAY_S": str(STEP_S)})


@pytest.fixture(scope="module")
def pd():
    with SlowDecodeCluster() as cluster:
        yield cluster


def stream_events(client: httpx.Client, prompt: str, max_tokens: int, events: list, started=None) -> None:
    """Greedy streaming /generate; appends (time.monotonic(), output_ids so far) per event."""
    body = {
        "text": prompt,
        "stream": True,
        "sampling_params": {"max_new_tokens": max_tokens, "temperature": 0},
    }
    with client.stream("POST", "/generate", json=body) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data: {"):
                events.append((time.monotonic(), json.loads(line[6:])["output_ids"]))
                if started is not None:
                    started.set()


def greedy_ids(engine, prompts: list[str], max_tokens: int) -> list[list[int]]:
    outs = engine.generate(
        [engine.tokenizer.encode(p) for p in prompts], {"max_new_tokens": max_tokens, "temperature": 0}
    )
    return [o["output_ids"] for o in outs]


def check_first_token_leaves_mid_step(pd: PDCluster, want: list[list[int]], exact: bool = True) -> None:
    """A request decodes throughout (STEP_S steps); a probe's first token must reach the client
    seconds before the running request's next token, its greedy tokens `want[1]` (and `want[0]`;
    exact=False: their first tokens, and four tokens each)."""
    running, probe, started = [], [], threading.Event()
    with pd.client() as client:
        bg = threading.Thread(target=stream_events, args=(client, RUNNING, 4, running, started))
        bg.start()
        assert started.wait(120), "the running request never started"
        sent = time.monotonic()
        stream_events(client, PROBE, 4, probe)
        bg.join(120)
    first = probe[0][0]
    running_after = [t for t, _ in running if t > first]
    # the step as the client saw it (the running request's token gaps; a GPU's sleep kernel only
    # approximates STEP_S): the slow-down must dominate it, or there is nothing to tell apart
    gaps = sorted(b - a for (a, _), (b, _) in zip(running[:-1], running[1:], strict=True))
    step = gaps[len(gaps) // 2]
    assert step > STEP_S / 2, running
    # the probe's first token came while the running request's step went on: its next token (the
    # step's end) follows a good part of a step later; before, both left at that step's end together
    assert running_after and running_after[0] - first > step / 3, (first, running)
    # the probe arrived as a step began: the decode asked the prefill for its KV at once (it admits
    # requests while a step runs), not at that step's end; before, its first token came a step late
    assert first - sent < step / 2, (first - sent, step)
    got = [running[-1][1], probe[-1][1]]
    if exact:
        assert got == want  # greedy tokens, token for token
    else:
        assert [g[:1] for g in got] == [w[:1] for w in want] and [len(g) for g in got] == [4, 4], (got, want)
    metrics = httpx.get(pd.decode.url + "/metrics", timeout=10).text
    # both first tokens left well within a step of their KV (the histogram's 0.5 s bucket)
    name = "disagg_kv_transfer_step_seconds_bucket"
    assert metric_value(metrics, name, role="decode", step="first_token", le="0.5") == 2.0, metrics
    # and no prefill chunk waited half a step for the decode to say where its pages are
    waits = httpx.get(pd.prefill.url + "/metrics", timeout=10).text
    within = metric_value(waits, name, role="prefill", step="wait_request", le="0.5")
    assert within == metric_value(waits, name, role="prefill", step="wait_request", le="+Inf") > 0, waits
    assert_pool_free(pd.prefill)
    assert_pool_free(pd.decode)


def test_first_token_leaves_before_the_running_decode_step_ends(pd, engines):
    check_first_token_leaves_mid_step(pd, greedy_ids(engines.get(**REFERENCE_ENGINE), [RUNNING, PROBE], 4))
