"""Hostile clients against a PD deployment (prefill + decode + router): the malformed inputs get the
same 4xx error objects from prefill, decode and the router (no retry, no breaker count), bootstrap
rooms outside [0, 2**63) are 400, and a KV transfer that fails is the system's failure: a 5xx with
code kv_transfer_failed, streamed or not, before any 200. Nothing is held afterwards."""

from __future__ import annotations

import json
import random

import httpx
import pytest

from tests.pd_helpers import PDCluster, assert_pool_free
from tests.server_helpers import metric_value
from tests.test_isolation_server import MALFORMED

pytestmark = pytest.mark.slow

TIMEOUT_S = 3.0  # --disaggregation-transfer-timeout


@pytest.fixture(scope="module")
def pd():
    with PDCluster(timeout=TIMEOUT_S) as cluster:
        yield cluster


def post(url: str, path: str, body) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body)
    return httpx.post(url + path, content=content, headers={"content-type": "application/json"}, timeout=60)


@pytest.mark.parametrize("side", ["prefill", "decode", "router"])
def test_malformed_inputs_are_4xx_on_every_side(pd, side):
    url = pd.url if side == "router" else getattr(pd, side).url
    errors = metric_value(httpx.get(pd.url + "/metrics").text, "disagg_router_worker_errors_total")
    for name, path, body, status, param, _ in MALFORMED:
        if side == "router" and (path == "/abort_request" or "bootstrap_" in str(body)):
            continue  # the router's own abort checks are in test_isolation_router; it sets the rooms itself
        r = post(url, path, body)
        assert r.status_code == status, (side, name, r.text)
        err = r.json()["error"]
        assert isinstance(err["code"], str), (side, name, err)
        # NOTE: the PD router parses the body itself (orjson): a lone surrogate is "not valid JSON" there
        assert err["param"] == param or (side == "router" and "surrogate" in name), (side, name, err)
    assert metric_value(httpx.get(pd.url + "/metrics").text, "disagg_router_worker_errors_total") == errors
    assert_pool_free(pd.prefill)
    assert_pool_free(pd.decode)


@pytest.mark.parametrize("room", [2**63, 2**64, -1])
def test_rooms_out_of_range_are_400_on_both_servers(pd, room):
    body = {
        "text": "Hi",
        "bootstrap_host": "127.0.0.1",
        "bootstrap_port": pd.bootstrap_port,
        "bootstrap_room": room,
    }
    for server in (pd.prefill, pd.decode):
        r = post(server.url, "/generate", body)
        assert r.status_code == 400 and r.json()["error"]["param"] == "bootstrap_room", r.text


@pytest.mark.parametrize("stream", [False, True])
def test_failed_kv_transfer_is_a_typed_5xx(pd, stream):
    # a room the prefill server never gets: the decode side's transfer times out
    body = {"text": "Hello", "sampling_params": {"max_new_tokens": 4}, "stream": stream,
            "bootstrap_host": "127.0.0.1", "bootstrap_port": pd.bootstrap_port,
            "bootstrap_room": random.getrandbits(63)}  # fmt: skip
    r = post(pd.decode.url, "/generate", body)
    assert r.status_code == 504, r.text  # not a 200 stream with an error inside: a router can retry it
    err = r.json()["error"]
    assert err["code"] == "kv_transfer_failed" and err["type"] == "server_error"
    assert_pool_free(pd.decode)
    # the same request through the router works (and a client request still does)
    r = httpx.post(
        pd.url + "/generate", json={"text": "Hello", "sampling_params": {"max_new_tokens": 2}}, timeout=60
    )
    assert r.status_code == 200 and len(r.json()["output_ids"]) == 2
