"""POST /eplb_rebalance (admin): a tiny Qwen3-MoE server at --tp 2 --ep 2 with 2 redundant expert
slots and the all-to-all MoE re-places its experts from the load its requests routed, moving the
weights between the two ranks; the next requests give the same tokens (transformers' float32
greedy ones); a caller without the admin key gets 401/403 with an OpenAI-style error object, and a
server that does not count the load says so. The summary gives each EP rank its load before/after."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from disagg.common.engine.offline import Engine
from disagg.common.models.eplb import balanced_placement, placement_summary, rebalance_experts

from tests.conftest import TINY_MOE_CONFIGS, hf_greedy, make_tiny_model
from tests.server_helpers import SMALL_SERVER_ARGS, ServerProcess

ADMIN_KEY, CLIENT_KEY = "admin-secret", "client-secret"
PROMPTS = [[1, 2, 3, 4, 5], [7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19], [300]]
NUM_EXPERTS = TINY_MOE_CONFIGS["qwen3_moe"]["num_experts"]


def _tiny_moe(folder) -> str:
    return make_tiny_model(folder / "qwen3_moe", "qwen3_moe")


@pytest.fixture(scope="module")
def moe_server(tmp_path_factory, default_model_path):
    path = _tiny_moe(tmp_path_factory.mktemp("eplb"))
    server = ServerProcess("--model-path", path, "--tokenizer-path", default_model_path, *SMALL_SERVER_ARGS,
                           "--tp", "2", "--ep", "2", "--moe-a2a-backend", "all_to_all", "--ep-num-redundant-experts",
                           "2", "--enable-eplb", "--page-size", "4", "--admin-api-key", ADMIN_KEY,
                           api_key=CLIENT_KEY).start()  # fmt: skip
    try:
        yield server, path
    finally:
        server.stop()


def _generate(client, max_new_tokens: int = 8) -> list[list[int]]:
    sampling = {"max_new_tokens": max_new_tokens, "temperature": 0, "ignore_eos": True}
    body = {"input_ids": PROMPTS, "sampling_params": sampling}
    resp = client.post("/generate", json=body)
    assert resp.status_code == 200, resp.text
    return [out["output_ids"] for out in resp.json()]


@pytest.mark.slow
def test_rebalance_re_places_the_experts_and_keeps_the_tokens(moe_server):
    server, path = moe_server
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    with server.client() as client:
        before = _generate(client)  # counted load: every prompt and decode token routed
        resp = client.post("/eplb_rebalance", headers=admin)
        assert resp.status_code == 200, resp.text
        summary = resp.json()
        idle = client.post("/eplb_rebalance", headers=admin).json()  # no load since: nothing moves
        after = _generate(client)  # on the new placement (weights moved between the ranks)
        with ThreadPoolExecutor(1) as pool:  # requests in flight while the experts move
            running = pool.submit(_generate, client, 32)
            time.sleep(0.5)
            again = client.post("/eplb_rebalance", headers=admin)
            long = running.result()
    assert before == [hf_greedy(path, p, 8) for p in PROMPTS] and after == before
    assert again.status_code == 200 and long == [hf_greedy(path, p, 32) for p in PROMPTS]
    assert summary["success"] and summary["num_layers"] == 2 and summary["routed_pairs"] > 0
    default = [p % NUM_EXPERTS for p in range(NUM_EXPERTS + 2)]  # the start-up placement
    for layer in summary["layers"]:
        placement = layer["physical_to_logical"]
        assert sorted(set(placement)) == list(range(NUM_EXPERTS)) and len(placement) == NUM_EXPERTS + 2
        assert len(layer["rank_load_before"]) == len(layer["rank_load_after"]) == 2  # one per EP rank
        assert sum(layer["rank_load_after"]) == pytest.approx(sum(layer["rank_load_before"]))
    assert any(layer["physical_to_logical"] != default for layer in summary["layers"])
    assert summary["num_layers_moved"] >= 1
    assert summary["balancedness_after"] > summary["balancedness_before"]
    assert idle["num_layers_moved"] == 0 and idle["routed_pairs"] == 0
    assert [layer["physical_to_logical"] for layer in idle["layers"]] == [
        layer["physical_to_logical"] for layer in summary["layers"]
    ]


@pytest.mark.slow
def test_rebalance_behind_dp_replicas_re_places_each_replica(tmp_path, default_model_path):
    """--dp-size 2 (two engines behind one controller): each replica re-places from its own load."""
    path = _tiny_moe(tmp_path)
    server = ServerProcess("--model-path", path, "--tokenizer-path", default_model_path, *SMALL_SERVER_ARGS,
                           "--dp-size", "2", "--ep-num-redundant-experts", "2", "--enable-eplb", "--page-size",
                           "4").start()  # fmt: skip
    try:
        with server.client() as client:
            before = _generate(client)
            resp = client.post("/eplb_rebalance")
            after = _generate(client)
    finally:
        server.stop()
    assert resp.status_code == 200, resp.text
    summary = resp.json()
    assert len(summary["replicas"]) == 2 and summary["num_layers"] == 4 and summary["routed_pairs"] > 0
    for replica in summary["replicas"]:
        assert all(
            sorted(set(layer["physical_to_logical"])) == list(range(NUM_EXPERTS))
            for layer in replica["layers"]
        )
    assert before == [hf_greedy(path, p, 8) for p in PROMPTS] and after == before


@pytest.mark.slow
@pytest.mark.parametrize("key,status", [(CLIENT_KEY, 403), (None, 401), ("wrong", 401)])
def test_rebalance_needs_the_admin_key(moe_server, key, status):
    server, _ = moe_server
    with server.client() as client:
        headers = {"Authorization": f"Bearer {key}"} if key else {"Authorization": ""}
        resp = client.post("/eplb_rebalance", headers=headers)
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert error["message"] and error["type"] in ("permission_error", "authentication_error")


def test_summary_gives_each_rank_its_load_before_and_after():
    """Expert 3 hot, 0 warm; 6 slots on 2 ranks. p % E puts 3 and a copy of 0 on rank 1; the load's
    placement gives 3 and 0 a copy on each rank."""
    load = {0: [10.0, 0, 0, 30]}
    before = {0: [0, 1, 2, 3, 0, 1]}
    after = {0: [0, 1, 3, 0, 2, 3]}
    assert after[0] == balanced_placement(load[0], 6, 2)
    summary = placement_summary(load, before, after, 2)
    (layer,) = summary["layers"]
    assert layer["rank_load_before"] == [5.0, 35.0] and layer["rank_load_after"] == [20.0, 20.0]
    assert layer["balancedness_before"] == pytest.approx(20 / 35) and layer["balancedness_after"] == 1.0
    assert summary["num_layers_moved"] == 1 and summary["routed_pairs"] == 40


def test_rebalance_without_counted_load_is_refused(tmp_path):
    """Redundant slots but neither --enable-eplb nor periodic re-placement: the load is not counted,
    so the endpoint answers why (a 400) instead of re-placing from nothing."""
    path = _tiny_moe(tmp_path)
    engine = Engine(model_path=path, page_size=4, max_total_tokens=1024, ep_num_redundant_experts=2)
    try:
        answer = rebalance_experts(engine.scheduler)
    finally:
        engine.shutdown()
    assert "--enable-eplb" in answer["error"]
