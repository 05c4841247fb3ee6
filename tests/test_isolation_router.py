"""Hostile clients through the router (--api-key, --admin-api-key, --worker-api-key) in front of a
real server (its own --api-key and the same --admin-api-key): a client's mistake is answered once
(no retry, nothing counted against the worker), the router's own errors are OpenAI-style objects
with string codes, only the admin aborts everyone or flushes caches, and nothing is held afterwards."""

from __future__ import annotations

import json
import sys
import time

import httpx
import pytest

from tests.procs import Process, free_port
from tests.server_helpers import SMALL_SERVER_ARGS, ServerProcess, metric_value
from tests.test_isolation_server import ADMIN_KEY, MALFORMED, finish, long_body, started, wait_until

pytestmark = pytest.mark.slow

CLIENT_KEY, WORKER_KEY = "router-client-key", "worker-key"


@pytest.fixture(scope="module")
def server(default_model_path):
    with ServerProcess(*SMALL_SERVER_ARGS, "--admin-api-key", ADMIN_KEY, api_key=WORKER_KEY) as srv:
        yield srv.start()


@pytest.fixture(scope="module")
def router(server):
    port = free_port()
    argv = [sys.executable, "-m", "disagg.router.launch_router", "--worker-urls", server.url,
            "--api-key", CLIENT_KEY, "--worker-api-key", WORKER_KEY, "--admin-api-key", ADMIN_KEY,
            "--host", "127.0.0.1", "--port", str(port)]  # fmt: skip
    proc = Process(argv, f"http://127.0.0.1:{port}", ready_path="/health")
    proc.start(timeout=60)
    proc.wait_ready(30, status=200)
    try:
        yield proc
    finally:
        proc.stop()


def client(router, key: str | None = CLIENT_KEY) -> httpx.Client:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.Client(base_url=router.url, headers=headers, timeout=120)


def router_metric(router, name: str, **labels) -> float:
    return metric_value(httpx.get(router.url + "/metrics").text, name, **labels)


def server_idle(server) -> bool:
    s = httpx.get(server.url + "/server_info", headers=server.headers).json()["internal_states"][0]
    return (
        "stale_for_s" not in s
        and s["num_running"] == 0
        and s["num_waiting"] == 0
        and s["num_used_pages"] == s["num_cached_pages"]
    )


def test_client_mistakes_pass_through_once_and_never_count_against_the_worker(router, server):
    errors = router_metric(router, "disagg_router_worker_errors_total")
    retries = router_metric(router, "disagg_router_retries_total")
    inference = [m for m in MALFORMED if m[1] != "/abort_request"]
    with (
        client(router) as c,
        client(router) as other,
        other.stream("POST", "/generate", json=long_body("b")) as s,
    ):
        lines = started(s)  # another client's stream runs through the whole barrage
        for name, path, body, status, _param, _ in inference:
            content = body if isinstance(body, bytes) else json.dumps(body)
            r = c.post(path, content=content, headers={"content-type": "application/json"})
            assert r.status_code == status, (name, r.text)
            err = r.json()["error"]
            assert err["type"] == "invalid_request_error" and isinstance(err["code"], str), (name, err)
        # the worker is still in rotation: no breaker opened by the clients' mistakes
        r = c.post("/generate", json={"text": "Hi", "sampling_params": {"max_new_tokens": 2}})
        assert r.status_code == 200, r.text
        assert finish(lines) == {"type": "length", "length": 60}
    assert router_metric(router, "disagg_router_worker_errors_total") == errors
    assert router_metric(router, "disagg_router_retries_total") == retries


ROUTER_OWN = [
    ("GET", "/no/such/route", None, 404),
    ("POST", "/health", None, 405),
    ("POST", "/workers", b"[1]", 400),
    ("POST", "/workers", b"{bad", 400),
    ("POST", "/workers", b'{"url": 5}', 400),
    ("POST", "/workers", b'{"url": "http://127.0.0.1:9", "role": "boss"}', 400),
    ("POST", "/workers", b'{"url": "http://127.0.0.1:9", "bootstrap_port": "x"}', 400),
    ("DELETE", "/workers", b"[1]", 400),
    ("POST", "/remove_worker", b'{"url": ["x"]}', 404),
    ("POST", "/abort_request", b"{bad", 400),
    ("POST", "/abort_request", b'{"rid": 5}', 400),
    ("POST", "/abort_request", b'{"abort_all": "yes"}', 400),
    ("POST", "/abort_request", b"[]", 400),
]


@pytest.mark.parametrize(
    "method,path,body,status", ROUTER_OWN, ids=[f"{m} {p} {b}" for m, p, b, _ in ROUTER_OWN]
)
def test_router_own_errors_are_error_objects(router, method, path, body, status):
    with client(router, ADMIN_KEY) as c:
        r = c.request(method, path, content=body, headers={"content-type": "application/json"})
        assert r.status_code == status, r.text
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and isinstance(err["code"], str), err
        assert c.get("/v1/models").status_code == 200  # the same connection still serves


def test_only_the_admin_aborts_everyone_or_flushes(router, server):
    with (
        client(router) as c,
        client(router) as other,
        other.stream("POST", "/generate", json=long_body("bystander")) as s,
    ):
        lines = started(s)
        for path, body in (("/abort_request", {"abort_all": True}), ("/flush_cache", None)):
            r = c.post(path, json=body)
            assert r.status_code == 403 and r.json()["error"]["code"] == "admin_key_required", r.text
            assert httpx.post(router.url + path, json=body).status_code == 401  # no key at all
        assert c.get("/workers").status_code == 403
        assert finish(lines) == {"type": "length", "length": 60}  # the bystander was not touched
    with client(router) as c, c.stream("POST", "/generate", json=long_body("my-own")) as s:
        lines = started(s)
        assert c.post("/abort_request", json={"rid": "my-own"}).json()["aborted"] == 1
        assert finish(lines)["type"] == "abort"
    with (
        client(router) as c,
        client(router, ADMIN_KEY) as root,
        c.stream("POST", "/generate", json=long_body("x1")) as s,
    ):
        lines = started(s)
        assert root.post("/abort_request", json={"abort_all": True}).json()["aborted"] == 1
        assert finish(lines)["type"] == "abort"
        assert wait_until(lambda: server_idle(server))
        r = root.post("/flush_cache")
        assert r.status_code == 200, r.text
        assert [(w["url"], w["status"]) for w in r.json()["workers"]] == [(server.url, 200)]


def test_probes_and_metrics_need_no_key(router, server):
    for url in (
        router.url + "/health",
        router.url + "/metrics",
        server.url + "/health",
        server.url + "/metrics",
    ):
        assert httpx.get(url).status_code == 200, url
    assert httpx.get(router.url + "/v1/models").status_code == 401
    assert wait_until(lambda: server_idle(server))
    time.sleep(0)  # nothing else held: the server is idle after every test above
