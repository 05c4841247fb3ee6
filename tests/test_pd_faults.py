"""Abort and failure paths of the PD servers: each ends the request on both sides, frees every page."""

from __future__ import annotations

import concurrent.futures as cf
import json
import random
import time

import httpx
import pytest

from tests.pd_helpers import PDCluster, assert_pool_free, is_idle, stats
from tests.procs import wait_until

pytestmark = pytest.mark.slow

TIMEOUT_S = 3.0  # --disaggregation-transfer-timeout of these clusters
LONG = "Every request leaves both pools exactly as it found them, whatever happens to it. " * 20


def pd_body(cluster: PDCluster, prompt: str = "Hello there", max_new_tokens: int = 8, **extra) -> dict:
    return {"text": prompt, "sampling_params": {"max_new_tokens": max_new_tokens, "temperature": 0},
            "bootstrap_host": "127.0.0.1", "bootstrap_port": cluster.bootstrap_port,
            "bootstrap_room": random.getrandbits(63), **extra}  # fmt: skip


# NOTE: the kill tests come first: each starts a cluster of its own, and before the module's shared
# cluster exists only one cluster is up at a time (two at once peaked at 6.6 GB).
@pytest.fixture
def pd_fresh():
    with PDCluster(timeout=TIMEOUT_S) as cluster:
        yield cluster


def test_decode_killed_mid_stream(pd_fresh):
    cluster = pd_fresh
    with cluster.client(timeout=60) as client, cf.ThreadPoolExecutor(4) as pool:
        futs = [pool.submit(stream_request, client, f"{i} {LONG}", 150) for i in range(4)]
        assert wait_until(lambda: stats(cluster.decode)["queues"]["running"] >= 1, timeout=60)
        cluster.kill(cluster.decode)
        ends = [f.result() for f in futs]
    assert all(kind == "error" for kind, _ in ends)  # every client hears of it ...
    assert max(t for _, t in ends) < 60  # ... promptly
    # prefill holds nothing for the dead decode server and keeps serving
    assert wait_until(lambda: is_idle(cluster.prefill), timeout=30)
    assert httpx.get(cluster.prefill.url + "/health_generate", timeout=30).status_code == 200
    assert_pool_free(cluster.prefill)


def test_prefill_killed_mid_request(pd_fresh):
    cluster = pd_fresh
    with cluster.client(timeout=60) as client, cf.ThreadPoolExecutor(4) as pool:
        futs = [pool.submit(stream_request, client, f"{i} {LONG}", 20) for i in range(4)]
        assert wait_until(lambda: stats(cluster.decode)["queues"]["transfer"] >= 1, timeout=60, interval=0.02)
        cluster.kill(cluster.prefill)
        ends = [f.result() for f in futs]
    assert any(kind == "error" for kind, _ in ends)  # at least the ones still transferring fail
    assert max(t for _, t in ends) < 60
    assert wait_until(lambda: is_idle(cluster.decode), timeout=30)
    assert httpx.get(cluster.decode.url + "/health_generate", timeout=30).status_code == 200
    assert_pool_free(cluster.decode)


@pytest.fixture(scope="module")
def pd():
    with PDCluster(timeout=TIMEOUT_S) as cluster:
        yield cluster


def assert_both_free(cluster: PDCluster) -> None:
    assert_pool_free(cluster.prefill)
    assert_pool_free(cluster.decode)


def test_decode_leg_alone_times_out(pd):
    # the prefill server never gets the request: decode's room fails with the transfer timeout
    start = time.monotonic()
    with cf.ThreadPoolExecutor(1) as pool:
        stuck = pool.submit(httpx.post, pd.decode.url + "/generate", json=pd_body(pd), timeout=60)
        with pd.client() as client:  # meanwhile both servers keep serving everyone else
            r = client.post("/generate", json={"text": "Hi", "sampling_params": {"max_new_tokens": 4}})
            assert r.status_code == 200 and not stuck.done()
        r = stuck.result()
    assert (
        r.status_code == 504 and r.json()["error"]["code"] == "kv_transfer_failed"
    )  # ours, not the client's
    assert "KV transfer failed: timeout" in r.json()["error"]["message"]
    assert time.monotonic() - start < TIMEOUT_S * 4
    assert_both_free(pd)


def test_prefill_leg_alone_times_out(pd):
    # the decode server never asks for the room: prefill gives up after the transfer timeout
    start = time.monotonic()
    r = httpx.post(pd.prefill.url + "/generate", json=pd_body(pd), timeout=60)
    assert (
        r.status_code == 504 and r.json()["error"]["code"] == "kv_transfer_failed"
    )  # ours, not the client's
    assert "KV transfer failed: timeout" in r.json()["error"]["message"]
    assert time.monotonic() - start < TIMEOUT_S * 4
    assert_both_free(pd)


def test_abort_while_waiting_for_kv_ends_both_sides(pd):
    body = pd_body(pd, rid="waiting-for-kv")
    with cf.ThreadPoolExecutor(1) as pool:
        fut = pool.submit(httpx.post, pd.decode.url + "/generate", json=body, timeout=60)
        assert wait_until(lambda: stats(pd.decode)["queues"]["transfer"] == 1, timeout=20)
        start = time.monotonic()
        httpx.post(pd.decode.url + "/abort_request", json={"rid": "waiting-for-kv"}, timeout=10)
        r = fut.result()
    assert time.monotonic() - start < TIMEOUT_S  # at once, not after the transfer timeout
    assert r.json()["error"]["message"] == "aborted"
    assert_both_free(pd)


def test_abort_on_prefill_before_decode_asked(pd):
    body = pd_body(pd, rid="prefill-only")
    with cf.ThreadPoolExecutor(1) as pool:
        fut = pool.submit(httpx.post, pd.prefill.url + "/generate", json=body, timeout=60)
        # the prompt is prefilled without waiting for the decode side; its pages wait to be asked for
        assert wait_until(lambda: stats(pd.prefill)["queues"]["transfer"] == 1, timeout=20)
        start = time.monotonic()
        httpx.post(pd.prefill.url + "/abort_request", json={"rid": "prefill-only"}, timeout=10)
        r = fut.result()
    assert time.monotonic() - start < TIMEOUT_S
    assert r.json()["error"]["message"] == "aborted"
    assert_both_free(pd)


def test_router_abort_request_stops_a_stream(pd):
    body = {"text": LONG, "sampling_params": {"max_new_tokens": 150, "temperature": 0, "ignore_eos": True},
            "stream": True, "rid": "abort-me"}  # fmt: skip
    with pd.client() as client, client.stream("POST", "/generate", json=body) as s:
        lines = s.iter_lines()
        first = next(x for x in lines if x.startswith("data: {"))
        assert json.loads(first[6:])["output_ids"]
        assert client.post("/abort_request", json={"rid": "abort-me"}).status_code == 200
        last = [x for x in lines if x.startswith("data: {")][-1]
    finish = json.loads(last[6:])["meta_info"]["finish_reason"]
    assert finish["type"] == "abort"
    assert len(json.loads(last[6:])["output_ids"]) < 150
    assert_both_free(pd)


def test_client_disconnects_free_both_pools(pd):
    body = {"text": LONG, "sampling_params": {"max_new_tokens": 150, "temperature": 0, "ignore_eos": True}}
    with pd.client() as client:
        with client.stream("POST", "/generate", json={**body, "stream": True}) as s:
            next(x for x in s.iter_lines() if x.startswith("data: {"))  # then hang up mid-stream
        with pytest.raises(httpx.ReadTimeout):  # a non-streaming client that gives up
            client.post("/generate", json=body, timeout=1.0)
    assert_both_free(pd)
    # and the servers still work
    with pd.client() as client:
        r = client.post("/generate", json={"text": "Hi", "sampling_params": {"max_new_tokens": 2}})
        assert r.status_code == 200 and len(r.json()["output_ids"]) == 2


def stream_request(client: httpx.Client, prompt: str, max_new_tokens: int) -> tuple[str, float]:
    """('ok' | 'error', seconds): how a stream ended, and when."""
    start = time.monotonic()
    body = {"text": prompt, "stream": True,
            "sampling_params": {"max_new_tokens": max_new_tokens, "temperature": 0, "ignore_eos": True}}  # fmt: skip
    try:
        with client.stream("POST", "/generate", json=body) as s:
            if s.status_code != 200:
                return "error", time.monotonic() - start
            events = [x for x in s.iter_lines() if x.startswith("data: ")]
    except httpx.HTTPError:
        return "error", time.monotonic() - start
    done = events and events[-1] == "data: [DONE]" and '"length"' in events[-2]
    return ("ok" if done else "error"), time.monotonic() - start
