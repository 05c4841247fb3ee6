"""The router as a process in front of fake worker processes: faults are exact here.

Fake workers (disagg.router.fake_worker) are steered over HTTP: /_fake/config, /_fake/log, /_fake/reset.
"""

from __future__ import annotations

import re
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.procs import fake_worker, free_port, router, wait_until
from tests.server_helpers import metric_value

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def workers():
    procs = [fake_worker(f"w{i}") for i in range(2)]
    try:
        for p in procs:
            p.start()
        yield procs
    finally:
        for p in procs:
            p.stop()


@pytest.fixture(autouse=True)
def reset_workers(workers):
    for w in workers:
        httpx.post(w.url + "/_fake/reset")


def configure(worker, **conf):
    httpx.post(worker.url + "/_fake/config", json=conf).raise_for_status()


def fake_log(worker) -> dict:
    return httpx.get(worker.url + "/_fake/log").json()


def metric(router_proc, name: str, **labels) -> float:
    return metric_value(httpx.get(router_proc.url + "/metrics").text, name, **labels)


def start_router(workers, *extra) -> object:
    return router(["--worker-urls", *(w.url for w in workers), *extra]).start()


def test_round_robin_json_and_streaming_passthrough(workers):
    with start_router(workers, "--policy", "round_robin") as r:
        names = [
            httpx.post(r.url + "/generate", json={"text": "hi"}).json()["meta_info"]["worker"]
            for _ in range(4)
        ]
        assert sorted(names) == ["w0", "w0", "w1", "w1"] and names[0] != names[1]
        with httpx.stream(
            "POST",
            r.url + "/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "hi"}], "stream": True},
        ) as resp:
            assert resp.headers["content-type"].startswith("text/event-stream")
            lines = [line for line in resp.iter_lines() if line]
        assert lines[-1] == "data: [DONE]" and len(lines) == 4
        models = httpx.get(r.url + "/v1/models").json()
        assert models["data"][0]["id"] == "fake-model"


def test_request_id_in_and_out_and_prometheus_port(workers):
    prom_port = free_port()
    with start_router(workers, "--prometheus-port", str(prom_port)) as r:
        resp = httpx.post(
            r.url + "/v1/completions", json={"prompt": "x"}, headers={"x-request-id": "abc-123"}
        )
        assert resp.headers["x-request-id"] == "abc-123"
        received = [req["headers"]["x-request-id"] for w in workers for req in fake_log(w)["requests"]]
        assert received == ["abc-123"]
        generated = httpx.post(r.url + "/v1/completions", json={"prompt": "x"}).headers["x-request-id"]
        assert re.fullmatch(r"[0-9a-f]{32}", generated)
        scraped = httpx.get(f"http://127.0.0.1:{prom_port}/metrics").text
        assert 'disagg_router_requests_total{route="/v1/completions",status_code="200"} 2.0' in scraped


def test_api_key_enforced_and_worker_key_sent(workers):
    with start_router(
        workers,
        "--api-key",
        "client-secret",
        "--worker-api-key",
        "worker-secret",
        "--admin-api-key",
        "admin-secret",
    ) as r:
        denied = httpx.post(r.url + "/generate", json={"text": "hi"})
        assert denied.status_code == 401
        assert denied.json()["error"]["type"] == "authentication_error"
        assert (
            httpx.post(
                r.url + "/generate", json={"text": "hi"}, headers={"authorization": "Bearer wrong"}
            ).status_code
            == 401
        )
        ok = httpx.post(
            r.url + "/generate", json={"text": "hi"}, headers={"authorization": "Bearer client-secret"}
        )
        assert ok.status_code == 200
        auths = [req["headers"]["authorization"] for w in workers for req in fake_log(w)["requests"]]
        assert auths == ["Bearer worker-secret"]
        # the client key is a valid key, but not the admin's
        assert (
            httpx.get(r.url + "/workers", headers={"authorization": "Bearer client-secret"}).status_code
            == 403
        )
        assert (
            httpx.get(r.url + "/workers", headers={"authorization": "Bearer admin-secret"}).status_code == 200
        )


def test_eplb_rebalance_reaches_every_worker_admin_only(workers):
    with start_router(workers, "--api-key", "client-secret", "--admin-api-key", "admin-secret") as r:
        admin, client = ({"authorization": f"Bearer {k}-secret"} for k in ("admin", "client"))
        assert httpx.post(r.url + "/eplb_rebalance", json={}, headers=client).status_code == 403
        assert all(fake_log(w)["admin"] == [] for w in workers)  # refused before any worker heard of it
        done = httpx.post(r.url + "/eplb_rebalance", json={}, headers=admin)
        assert done.status_code == 200
        answers = {w["url"]: w["answer"] for w in done.json()["workers"]}
        assert answers == {
            w.url: {"success": True, "worker": name} for w, name in zip(workers, ("w0", "w1"), strict=True)
        }
        # one worker refuses (e.g. no expert load counted): its 400 and why, the other's answer kept
        configure(workers[1], mode="fail", status=400)
        refused = httpx.post(r.url + "/eplb_rebalance", json={}, headers=admin)
        assert refused.status_code == 400
        body = refused.json()
        assert body["error"]["code"] == "rebalance_failed" and workers[1].url in body["error"]["message"]
        assert {w["status"] for w in body["workers"]} == {200, 400}


def test_payload_too_large_and_bad_json(workers):
    with start_router(workers, "--max-payload-size", "100", "--policy", "cache_aware") as r:
        resp = httpx.post(r.url + "/generate", json={"text": "x" * 200})
        assert resp.status_code == 413 and "max-payload-size" in resp.json()["error"]["message"]
        bad = httpx.post(
            r.url + "/generate", content=b"{not json", headers={"content-type": "application/json"}
        )
        assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error"
        assert all(not fake_log(w)["requests"] for w in workers)


def test_worker_error_is_retried_on_the_other_worker(workers):
    configure(workers[0], mode="fail", status=503)
    with start_router(workers, "--policy", "round_robin", "--retry-initial-backoff-ms", "1") as r:
        for _ in range(4):
            assert httpx.post(r.url + "/generate", json={"text": "hi"}).json()["meta_info"]["worker"] == "w1"
        assert metric(r, "disagg_router_retries_total") >= 2
        assert metric(r, "disagg_router_worker_errors_total", worker=workers[0].url) >= 2
        # a 4xx is the client's fault: passed through, not retried
        configure(workers[0], mode="fail", status=400)
        configure(workers[1], mode="fail", status=400)
        resp = httpx.post(r.url + "/generate", json={"text": "hi"})
        assert resp.status_code == 400 and "error" in resp.json()


def test_all_workers_failing_gives_an_error_object(workers):
    for w in workers:
        configure(w, mode="fail", status=500)
    with start_router(workers, "--retry-max-retries", "3", "--retry-initial-backoff-ms", "1") as r:
        resp = httpx.post(r.url + "/generate", json={"text": "hi"})
        assert resp.status_code == 500 and resp.json()["error"]["message"].endswith("failing on purpose")
        assert metric(r, "disagg_router_retries_total") == 2


def test_circuit_breaker_opens_and_closes(workers):
    one = workers[:1]
    with start_router(
        one,
        "--disable-retries",
        "--cb-failure-threshold",
        "2",
        "--cb-success-threshold",
        "1",
        "--cb-timeout-duration-secs",
        "2",
    ) as r:
        # failing probes too: a passing probe half-opens an open breaker at once (docs/failures.md),
        # which would race the checks below
        configure(workers[0], mode="fail", status=500, healthy=False)
        for _ in range(2):
            assert httpx.post(r.url + "/generate", json={"text": "hi"}).status_code == 500
        assert metric(r, "disagg_router_circuit_breaker_state", worker=workers[0].url) == 1
        blocked = httpx.post(r.url + "/generate", json={"text": "hi"})
        assert (blocked.status_code, blocked.json()["error"]["type"]) == (503, "service_unavailable"), (
            blocked.text
        )
        assert len(fake_log(workers[0])["requests"]) == 2  # the open breaker kept the third away
        configure(workers[0], mode="ok", healthy=True)
        # open -> half-open (timeout or passing probe) -> closed by the first success
        assert wait_until(lambda: httpx.post(r.url + "/generate", json={"text": "hi"}).status_code == 200, 15)
        assert metric(r, "disagg_router_circuit_breaker_state", worker=workers[0].url) == 0


def test_queue_full_429_and_queue_timeout_408(workers):
    configure(workers[0], delay_secs=2.0)
    with (
        start_router(
            workers[:1], "--max-concurrent-requests", "1", "--queue-size", "1", "--queue-timeout-secs", "0.5"
        ) as r,
        ThreadPoolExecutor(3) as pool,
    ):
        running = pool.submit(httpx.post, r.url + "/generate", json={"text": "a"}, timeout=10)
        time.sleep(0.3)
        queued = pool.submit(httpx.post, r.url + "/generate", json={"text": "b"}, timeout=10)
        time.sleep(0.1)
        full = httpx.post(r.url + "/generate", json={"text": "c"})
        assert full.status_code == 429 and full.json()["error"]["type"] == "rate_limit_error"
        assert queued.result().status_code == 408
        assert running.result().status_code == 200
        assert metric(r, "disagg_router_rejected_total", reason="queue_full") == 1
        assert metric(r, "disagg_router_rejected_total", reason="queue_timeout") == 1


def test_worker_killed_under_load_then_comes_back(workers):
    spare = fake_worker("spare").start()
    try:
        with start_router(
            [workers[0], spare],
            "--policy",
            "round_robin",
            "--health-check-interval-secs",
            "0.5",
            "--health-failure-threshold",
            "1",
            "--health-success-threshold",
            "1",
            "--retry-initial-backoff-ms",
            "5",
        ) as r:
            statuses = []

            def client_loop(deadline):
                with httpx.Client() as c:
                    while time.monotonic() < deadline:
                        statuses.append(c.post(r.url + "/generate", json={"text": "hi"}).status_code)

            deadline = time.monotonic() + 3.0
            with ThreadPoolExecutor(4) as pool:
                loops = [pool.submit(client_loop, deadline) for _ in range(4)]
                time.sleep(1.0)
                spare.stop()
                for f in loops:
                    f.result()
            assert statuses and set(statuses) == {200}
            assert metric(r, "disagg_router_retries_total") >= 1
            assert metric(r, "disagg_router_worker_healthy", worker=spare.url) == 0

            spare.start()  # same port: the health checker brings it back
            assert wait_until(
                lambda: metric(r, "disagg_router_worker_healthy", worker=spare.url) == 1, timeout=10
            )
            names = {
                httpx.post(r.url + "/generate", json={"text": "hi"}).json()["meta_info"]["worker"]
                for _ in range(4)
            }
            assert names == {"w0", "spare"}
    finally:
        spare.stop()


def test_admin_add_and_remove_workers(workers):
    with start_router(workers[:1], "--policy", "round_robin") as r:
        added = httpx.post(r.url + "/workers", json={"url": workers[1].url})
        assert added.status_code == 201 and added.json()["healthy"] is True
        listed = {w["url"] for w in httpx.get(r.url + "/workers").json()["workers"]}
        assert listed == {workers[0].url, workers[1].url}
        names = {
            httpx.post(r.url + "/generate", json={"text": "hi"}).json()["meta_info"]["worker"]
            for _ in range(4)
        }
        assert names == {"w0", "w1"}
        assert httpx.request("DELETE", r.url + "/workers", params={"url": workers[0].url}).status_code == 200
        names = {
            httpx.post(r.url + "/generate", json={"text": "hi"}).json()["meta_info"]["worker"]
            for _ in range(3)
        }
        assert names == {"w1"}
        assert httpx.post(r.url + "/workers", json={"url": "ftp://nowhere"}).status_code == 400
        assert (
            httpx.request("DELETE", r.url + "/workers", params={"url": "http://nowhere:1"}).status_code == 404
        )


def test_client_disconnect_closes_the_worker_stream(workers):
    configure(workers[0], chunks=50, chunk_delay_secs=0.1)
    with start_router(workers[:1]) as r:
        with httpx.stream(
            "POST", r.url + "/generate", json={"text": "hi", "stream": True, "rid": "r-1"}
        ) as resp:
            next(resp.iter_lines())
        assert wait_until(
            lambda: fake_log(workers[0])["disconnects"] and fake_log(workers[0])["aborts"], timeout=10
        )
        assert fake_log(workers[0])["aborts"] == [{"rid": "r-1"}]
        assert wait_until(
            lambda: metric(r, "disagg_router_active_requests", worker=workers[0].url) == 0, timeout=10
        )


def test_graceful_shutdown_finishes_inflight_streams(workers):
    import signal
    import threading

    configure(workers[0], chunks=10, chunk_delay_secs=0.1)
    r = start_router(workers[:1], "--shutdown-grace-period-secs", "10")
    try:
        with httpx.stream("POST", r.url + "/generate", json={"text": "hi", "stream": True}) as resp:
            lines = iter(resp.iter_lines())
            first = next(lines)
            threading.Timer(0.2, r.proc.send_signal, args=(signal.SIGTERM,)).start()
            rest = [line for line in lines if line]
        assert first.startswith("data: ") and rest[-1] == "data: [DONE]" and len(rest) == 10
        assert r.proc.wait(10) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once drained
        with pytest.raises(httpx.ConnectError):
            httpx.post(r.url + "/generate", json={"text": "hi"})
    finally:
        r.stop()
