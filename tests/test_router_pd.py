"""PD mode against fake prefill/decode processes: bootstrap fields, decode's answer, retries, aborts."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.procs import fake_worker, router, wait_until
from tests.test_router_e2e import configure, fake_log, metric

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def fleet():
    procs = {name: fake_worker(name) for name in ("p0", "p1", "d0", "d1")}
    try:
        for p in procs.values():
            p.start()
        yield procs
    finally:
        for p in procs.values():
            p.stop()


@pytest.fixture(autouse=True)
def reset_fleet(fleet):
    for w in fleet.values():
        httpx.post(w.url + "/_fake/reset")


def pd_router(prefills, decodes, *extra):
    args = ["--pd-disaggregation", "--retry-initial-backoff-ms", "1"]
    for url, port in prefills:
        args += ["--prefill", url] + ([str(port)] if port is not None else [])
    for d in decodes:
        args += ["--decode", d.url]
    return router(args + list(extra)).start()


def test_both_legs_get_the_same_bootstrap_fields_and_decode_answers(fleet):
    p0, d0 = fleet["p0"], fleet["d0"]
    with pd_router([(p0.url, 8998)], [d0]) as r:
        resp = httpx.post(
            r.url + "/generate",
            json={"text": "hello", "sampling_params": {"max_new_tokens": 4}},
            headers={"x-request-id": "req-7"},
        )
        assert resp.status_code == 200 and resp.json()["meta_info"]["worker"] == "d0"
        assert resp.headers["x-request-id"] == "req-7"
        (pbody,) = [q["body"] for q in fake_log(p0)["requests"]]
        (dbody,) = [q["body"] for q in fake_log(d0)["requests"]]
        assert pbody == dbody
        assert pbody["bootstrap_host"] == "127.0.0.1" and pbody["bootstrap_port"] == 8998
        assert 0 <= pbody["bootstrap_room"] < 2**63
        assert pbody["text"] == "hello" and pbody["sampling_params"] == {"max_new_tokens": 4}
        assert resp.json()["meta_info"]["bootstrap_room"] == pbody["bootstrap_room"]


def test_streaming_passes_decode_stream_through(fleet):
    p0, d0 = fleet["p0"], fleet["d0"]
    configure(d0, chunks=5)
    with pd_router([(p0.url, None)], [d0]) as r:
        body = {"messages": [{"role": "user", "content": "hi"}], "stream": True}
        with httpx.stream("POST", r.url + "/v1/chat/completions", json=body) as resp:
            lines = [line for line in resp.iter_lines() if line]
        assert len(lines) == 6 and lines[-1] == "data: [DONE]"
        # the decode's chunks, as it sent them (a movable stream is re-serialized by the router: compare JSON)
        assert all(json.loads(line.removeprefix("data: "))["worker"] == "d0" for line in lines[:-1])
        (pbody,) = [q["body"] for q in fake_log(p0)["requests"]]
        assert pbody["bootstrap_port"] is None and pbody["stream"] is True


def test_failed_prefill_aborts_decode_and_retries_on_another_pair(fleet):
    p0, p1, d0, d1 = fleet["p0"], fleet["p1"], fleet["d0"], fleet["d1"]
    configure(p0, mode="fail", status=503)
    configure(d0, delay_secs=0.5)  # decode is still busy when prefill fails
    configure(d1, delay_secs=0.5)
    with pd_router([(p0.url, 1001), (p1.url, 1002)], [d0, d1], "--policy", "round_robin") as r:
        resp = httpx.post(r.url + "/generate", json={"text": "hi", "rid": "rid-1"})
        assert resp.status_code == 200
        attempts = fake_log(d0)["requests"] + fake_log(d1)["requests"]
        assert len(attempts) == 2
        assert attempts[0]["body"]["bootstrap_room"] != attempts[1]["body"]["bootstrap_room"]
        final = [q["body"] for q in fake_log(p1)["requests"]]
        assert final[0]["bootstrap_port"] == 1002
        aborted = fake_log(d0)["aborts"] + fake_log(d1)["aborts"]
        assert aborted == [{"rid": "rid-1"}]
        assert metric(r, "disagg_router_retries_total") == 1
        assert metric(r, "disagg_router_worker_errors_total", worker=p0.url) == 1


def test_failed_decode_is_retried(fleet):
    p0, d0, d1 = fleet["p0"], fleet["d0"], fleet["d1"]
    configure(d0, mode="fail", status=500)
    with pd_router([(p0.url, None)], [d0, d1], "--decode-policy", "round_robin") as r:
        for _ in range(3):
            resp = httpx.post(r.url + "/v1/completions", json={"prompt": "hi"})
            assert resp.status_code == 200 and resp.json()["worker"] == "d1"


def test_client_disconnect_aborts_both_legs(fleet):
    p0, d0 = fleet["p0"], fleet["d0"]
    configure(p0, mode="hang")
    configure(d0, mode="hang")
    with pd_router([(p0.url, None)], [d0]) as r:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(r.url + "/generate", json={"text": "hi", "stream": True, "rid": "gone"}, timeout=0.5)
        assert wait_until(lambda: fake_log(p0)["aborts"] and fake_log(d0)["aborts"], timeout=10)
        assert fake_log(p0)["aborts"] == [{"rid": "gone"}] and fake_log(d0)["aborts"] == [{"rid": "gone"}]
        assert wait_until(
            lambda: len(fake_log(p0)["disconnects"]) == 1 and len(fake_log(d0)["disconnects"]) == 1,
            timeout=10,
        )
        assert wait_until(lambda: metric(r, "disagg_router_active_requests") == 0, timeout=10)


def test_health_needs_both_roles(fleet):
    p0, d0 = fleet["p0"], fleet["d0"]
    configure(d0, healthy=False)
    with pd_router([(p0.url, None)], [d0]) as r:
        resp = httpx.get(r.url + "/health")
        assert resp.status_code == 503 and "decode" in resp.json()["error"]["message"]
        assert httpx.post(r.url + "/generate", json={"text": "hi"}).status_code == 503
        added = httpx.post(r.url + "/workers", json={"url": fleet["d1"].url, "role": "decode"})
        assert added.status_code == 201
        assert httpx.get(r.url + "/health").status_code == 200
        assert httpx.post(r.url + "/generate", json={"text": "hi"}).json()["meta_info"]["worker"] == "d1"
