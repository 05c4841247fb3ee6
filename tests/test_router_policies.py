"""Routing policies, the prefix tree, the circuit breaker and the admission gate (in-process, fast)."""

from __future__ import annotations

import asyncio
import random
import time

import pytest
from disagg.router.admission import AdmissionGate, Rejected
from disagg.router.config import RouterConfig
from disagg.router.launch import add_router_args, config_from_args
from disagg.router.policies import POLICIES, create_policy, request_text
from disagg.router.prefix_tree import PrefixTree, common_prefix_len
from disagg.router.workers import BreakerState, CircuitBreaker, Role, Worker


def make_workers(n: int, loads: list[int] | None = None) -> list[Worker]:
    workers = []
    for i in range(n):
        url = f"http://10.0.0.{i}:30000"
        w = Worker(url, Role.REGULAR, CircuitBreaker(url, 3, 2, 60.0))
        w.outstanding = loads[i] if loads else 0
        workers.append(w)
    return workers


def test_registry_has_the_four_sglang_policies():
    assert set(POLICIES) == {"round_robin", "random", "power_of_two", "cache_aware"}
    with pytest.raises(ValueError, match="unknown policy"):
        create_policy("fastest", RouterConfig())


def test_round_robin_cycles_through_workers():
    workers = make_workers(3)
    policy = create_policy("round_robin", RouterConfig())
    assert [policy.select(workers, None) for _ in range(6)] == workers * 2


def test_random_spreads_over_all_workers():
    random.seed(0)
    workers = make_workers(3)
    policy = create_policy("random", RouterConfig())
    assert {policy.select(workers, None) for _ in range(100)} == set(workers)


def test_power_of_two_never_picks_the_busiest_of_two():
    random.seed(0)
    workers = make_workers(2, loads=[5, 1])
    policy = create_policy("power_of_two", RouterConfig())
    assert all(policy.select(workers, None) is workers[1] for _ in range(20))
    workers3 = make_workers(3, loads=[0, 10, 10])
    picks = [policy.select(workers3, None) for _ in range(200)]
    assert picks.count(workers3[0]) > 100  # wins every draw it is in (2/3 of them)


def test_cache_aware_routes_a_shared_prefix_to_the_same_worker():
    workers = make_workers(3)
    policy = create_policy("cache_aware", RouterConfig(cache_threshold=0.5))
    system = "You are a helpful assistant. " * 10
    first = policy.select(workers, system + "What is 2+2?")
    for question in ("Name a color.", "Tell me a joke.", "Why is the sky blue?"):
        assert policy.select(workers, system + question) is first
    # an unrelated prompt goes to a worker with an empty (smallest) tree
    assert policy.select(workers, "Translate 'bonjour' to English.") is not first


def test_cache_aware_balances_when_load_is_skewed():
    workers = make_workers(2)
    policy = create_policy("cache_aware", RouterConfig(balance_abs_threshold=4, balance_rel_threshold=1.5))
    prompt = "shared prefix " * 20
    owner = policy.select(workers, prompt)
    owner.outstanding = 10  # 10 - 0 > 4 and 10 > 0 * 1.5: unbalanced
    other = workers[1] if owner is workers[0] else workers[0]
    assert policy.select(workers, prompt) is other
    owner.outstanding = 3  # within the absolute threshold: cache wins again
    assert policy.select(workers, prompt) is owner


def test_cache_aware_forgets_removed_workers_and_evicts():
    workers = make_workers(2)
    policy = create_policy("cache_aware", RouterConfig(max_tree_size=50))
    for i in range(20):
        policy.select(workers, f"prompt number {i} " * 3)
    policy.evict()
    assert all(tree.size <= 50 for tree in policy.trees.values())
    policy.on_worker_removed(workers[0])
    assert workers[0].url not in policy.trees


def test_prefix_tree_matches_inserts_and_evicts_lru():
    assert common_prefix_len("abcdef", "abcxyz") == 3
    tree = PrefixTree()
    tree.insert("hello world")
    tree.insert("hello there")
    assert tree.size == len("hello world") + len("there")
    assert tree.match_len("hello wonder") == len("hello wo")
    assert tree.match_len("goodbye") == 0
    time.sleep(0.01)
    tree.match_len("hello there")  # "there" is now the most recently used leaf
    tree.evict(max_size=len("hello there"))
    assert tree.match_len("hello there") == len("hello there")
    assert tree.match_len("hello world") == len("hello ")


def test_request_text_reads_generate_completions_and_chat_bodies():
    assert request_text({"text": "abc"}) == "abc"
    assert request_text({"prompt": ["p1", "p2"]}) == "p1"
    chat = {"messages": [{"role": "system", "content": "sys"}, {"role": "user", "content": [{"text": "hi"}]}]}
    assert request_text(chat) == "sys\nhi"
    assert request_text({"input_ids": [1, 2, 3]}) == "1 2 3"


def test_circuit_breaker_opens_half_opens_and_closes():
    breaker = CircuitBreaker("http://x:1", failure_threshold=2, success_threshold=2, timeout_secs=0.05)
    breaker.record_failure()
    assert breaker.state is BreakerState.CLOSED
    breaker.record_failure()
    assert breaker.state is BreakerState.OPEN and not breaker.allows()
    time.sleep(0.06)
    assert breaker.state is BreakerState.HALF_OPEN and breaker.allows()
    breaker.record_failure()  # a failure while half-open opens it again
    assert breaker.state is BreakerState.OPEN
    time.sleep(0.06)
    breaker.record_success()
    breaker.record_success()
    assert breaker.state is BreakerState.CLOSED


def test_admission_gate_queues_then_rejects():
    async def scenario():
        gate = AdmissionGate(max_concurrent=1, queue_size=1, queue_timeout_secs=0.1)
        await gate.acquire()
        waiter = asyncio.create_task(gate.acquire())
        await asyncio.sleep(0)
        with pytest.raises(Rejected) as full:
            await gate.acquire()
        assert full.value.status == 429
        gate.release()  # hands the slot to the queued request
        await waiter
        assert gate.active == 1
        queued = asyncio.create_task(gate.acquire())
        with pytest.raises(Rejected) as late:
            await queued
        assert late.value.status == 408 and gate.queued == 0
        gate.release()
        assert gate.active == 0

    asyncio.run(scenario())


def test_cli_parses_sglang_style_pd_flags():
    import argparse

    parser = argparse.ArgumentParser()
    add_router_args(parser)
    args = parser.parse_args(
        [
            "--pd-disaggregation",
            "--prefill",
            "http://p1:30000",
            "8998",
            "--prefill",
            "http://p2:30000",
            "none",
            "--prefill",
            "http://p3:30000",
            "--decode",
            "http://d1:30001",
            "--decode",
            "http://d2:30001",
            "--prefill-policy",
            "cache_aware",
            "--decode-policy",
            "power_of_two",
            "--selector",
            "app=sglang",
        ]
    )
    config = config_from_args(args)
    config.validate()
    assert [(p.url, p.bootstrap_port) for p in config.prefill] == [
        ("http://p1:30000", 8998),
        ("http://p2:30000", None),
        ("http://p3:30000", None),
    ]
    assert config.decode == ("http://d1:30001", "http://d2:30001")
    assert config.selector == {"app": "sglang"}
    with pytest.raises(ValueError, match="--prefill/--decode need --pd-disaggregation"):
        RouterConfig(decode=("http://d:1",)).validate()


def test_a_router_bug_answers_an_error_object_and_frees_its_admission_slot():
    from disagg.router.app import create_app
    from starlette.testclient import TestClient

    config = RouterConfig(
        worker_urls=("http://127.0.0.1:9",), max_concurrent_requests=1, queue_timeout_secs=1
    )
    app = create_app(config)
    with TestClient(app) as client:

        async def broken_forward(call, on_done):
            raise RuntimeError("boom")

        app.state.proxy.forward = broken_forward
        for _ in range(3):  # one slot: a leaked one would queue the next request into a 408
            r = client.post("/generate", json={"text": "hi"})
            assert r.status_code == 500
            assert r.json()["error"]["type"] == "internal_error" and "boom" in r.json()["error"]["message"]


def test_a_health_check_that_raises_counts_as_a_failure_and_the_checker_goes_on():
    from disagg.router.health import HealthChecker
    from disagg.router.workers import WorkerRegistry

    class BrokenClient:
        async def request(self, *args, **kwargs):
            raise RuntimeError("boom")

    config = RouterConfig(health_failure_threshold=1)
    registry = WorkerRegistry(lambda url: CircuitBreaker(url, 3, 2, 60.0))
    worker = registry.add("http://127.0.0.1:9", Role.REGULAR, healthy=True)
    checker = HealthChecker(config, registry, BrokenClient(), {})
    assert asyncio.run(checker.check(worker)) is False
    assert not worker.healthy
