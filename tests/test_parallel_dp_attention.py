"""DP attention over gloo: each DP rank owns its own requests and KV pages, the MoE / dense layers
span every rank, and the greedy tokens equal transformers' float32 ones with uneven DP ranks
(one request, so one DP rank runs only idle steps, then three)."""

from __future__ import annotations

import concurrent.futures

import pytest
from disagg.common.engine.offline import Engine
from disagg.common.models.moe import SparseMoE
from disagg.common.parallel.dp_attention import DPAttentionScheduler, pick_dp_rank

from tests.conftest import TINY_MOE_CONFIGS, assert_pool_clean, hf_greedy, make_tiny_model
from tests.server_helpers import ServerProcess, metric_value

GREEDY = {"max_new_tokens": 10, "temperature": 0, "ignore_eos": True}
FIRST = [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]]  # one request: DP rank 1 runs idle steps only
THEN = [[20, 21, 22], [7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19], [300, 301]]
QWEN3_MOE = TINY_MOE_CONFIGS["qwen3_moe"]  # (tests/test_pd_dp_attention.py imports it)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from tests.test_common_deepseek import make_tiny_deepseek

    root = tmp_path_factory.mktemp("dp-attention")
    paths = {family: make_tiny_model(root / family, family) for family in ("qwen3_moe", "llama", "qwen2")}
    # MLA + DeepSeekMoE (shared experts); V3: q compression and a dense first layer
    return paths | {f"deepseek_{v}": make_tiny_deepseek(root / v, v) for v in ("v2", "v3")}


def test_requests_go_to_the_least_loaded_dp_rank_ties_in_turn():
    assert pick_dp_rank([0, 0], 0) == 0 and pick_dp_rank([0, 0], 1) == 1
    assert pick_dp_rank([2, 1, 1], 0) == 1 and pick_dp_rank([2, 1, 1], 2) == 2
    assert pick_dp_rank([0, 3], 1) == 0


def _generate_uneven(engine) -> tuple[list[list[int]], list[list[int]]]:
    """FIRST alone (DP rank 1 idle: its pool stays untouched), then THEN spread over both DP ranks."""
    scheduler = engine.scheduler
    assert isinstance(scheduler, DPAttentionScheduler) and len(scheduler.schedulers) == 2
    first = [o["output_ids"] for o in engine.generate(FIRST, GREEDY)]
    rank0, rank1 = scheduler.schedulers
    assert rank0.cache.num_cached_pages > 0 and rank1.cache.num_cached_pages == 0  # its KV only on DP rank 0
    then = [o["output_ids"] for o in engine.generate(THEN, GREEDY)]
    assert rank1.cache.num_cached_pages > 0  # DP rank 1 took requests of the second batch
    for s in scheduler.schedulers:
        assert_pool_clean(s)
    return first, then


CASES = {
    # MoE expert parallel through the all-to-all backend: each rank's own tokens to their experts
    "moe-a2a": ("qwen3_moe", dict(tp=2, dp_size=2, ep=2, moe_a2a_backend="all_to_all")),
    "moe-a2a-dp-lm-head": ("qwen3_moe", dict(tp=2, dp_size=2, ep=2, moe_a2a_backend="all_to_all", enable_dp_lm_head=True)),
    # EPLB: 2 redundant expert slots, re-placed every 4 steps from DP rank 0's counts
    "moe-a2a-eplb": ("qwen3_moe", dict(tp=2, dp_size=2, ep=2, moe_a2a_backend="all_to_all", ep_num_redundant_experts=2,
                                       eplb_rebalance_num_iterations=4)),
    # the all-reduce MoE: every DP rank's tokens gathered before the experts, scattered after
    "moe-gathered": ("qwen3_moe", dict(tp=2, dp_size=2, ep=2)),
    "dense": ("llama", dict(tp=2, dp_size=2)),
    # MLA: each DP rank caches only its requests' latents (TP replicates them on every rank)
    "deepseek-v3-a2a": ("deepseek_v3", dict(tp=2, dp_size=2, ep=2, moe_a2a_backend="all_to_all")),
    "deepseek-v2-gathered": ("deepseek_v2", dict(tp=2, dp_size=2, ep=2)),
}  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_dp_attention_generates_transformers_tokens_with_an_idle_dp_rank(models, case):
    family, kw = CASES[case]
    path = models[family]
    engine = Engine(model_path=path, page_size=4, chunked_prefill_size=8, max_total_tokens=512,
                    enable_dp_attention=True, **kw)  # fmt: skip
    try:
        moes = [m for m in engine.scheduler.runner.model.modules() if isinstance(m, SparseMoE)]
        a2a = kw.get("moe_a2a_backend") == "all_to_all"
        assert [m.a2a for m in moes] == [a2a] * len(moes) and bool(moes) == (family != "llama")
        first, then = _generate_uneven(engine)
        eplb = engine.scheduler.runner.eplb  # MoE: counts DP steps (re-places experts with the flag)
        assert (eplb is not None) == (family != "llama") and (eplb is None or eplb.steps > 2 * 4)
    finally:
        engine.shutdown()
    assert first == [hf_greedy(path, p, GREEDY["max_new_tokens"]) for p in FIRST]
    assert then == [hf_greedy(path, p, GREEDY["max_new_tokens"]) for p in THEN]


@pytest.mark.slow
def test_dp_attention_with_two_attention_ranks_per_dp_rank(models):
    """--tp 4 --dp-size 2: attention split 2 ways inside each DP rank; tied embeddings (the LM head
    follows the embedding's split)."""
    path = models["qwen2"]
    engine = Engine(model_path=path, page_size=4, chunked_prefill_size=8, max_total_tokens=512,
                    tp=4, dp_size=2, enable_dp_attention=True)  # fmt: skip
    try:
        first, then = _generate_uneven(engine)
    finally:
        engine.shutdown()
    assert first == [hf_greedy(path, p, GREEDY["max_new_tokens"]) for p in FIRST]
    assert then == [hf_greedy(path, p, GREEDY["max_new_tokens"]) for p in THEN]


def test_dp_attention_layouts_it_cannot_run_fail_clearly(models):
    with pytest.raises(ValueError, match="--dp-size 3 must divide --tp 2"):
        Engine(model_path=models["llama"], tp=2, dp_size=3, enable_dp_attention=True)
    with pytest.raises(ValueError, match="--ep equal to --tp"):
        Engine(model_path=models["qwen3_moe"], tp=2, dp_size=2, ep=1, moe_a2a_backend="all_to_all",
               enable_dp_attention=True)  # fmt: skip


@pytest.mark.slow
def test_server_with_dp_attention_answers_concurrent_requests(models, default_model_path):
    """launch_server --tp 2 --dp-size 2 --enable-dp-attention: concurrent /generate requests spread
    over both DP ranks give transformers' tokens; /metrics counts both DP ranks' pools."""
    path = models["qwen3_moe"]
    args = ["--model-path", path, "--tokenizer-path", default_model_path, "--page-size", "4", "--max-total-tokens",
            "512", "--log-level", "warning", "--tp", "2", "--dp-size", "2", "--ep", "2", "--moe-a2a-backend",
            "all_to_all", "--enable-dp-attention"]  # fmt: skip
    server = ServerProcess(*args).start()
    try:
        with server.client() as http:

            def generate(ids):
                body = {
                    "input_ids": ids,
                    "sampling_params": {"max_new_tokens": 8, "temperature": 0, "ignore_eos": True},
                }
                return http.post("/generate", json=body).json()["output_ids"]

            with concurrent.futures.ThreadPoolExecutor(3) as pool:
                out = list(pool.map(generate, THEN))
            metrics = http.get("/metrics").text
    finally:
        server.stop()
    assert out == [hf_greedy(path, p, 8) for p in THEN]
    assert metric_value(metrics, "disagg_num_total_pages") == 2 * 512 // 4  # one pool per DP rank
