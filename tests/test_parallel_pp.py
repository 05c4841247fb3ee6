"""Pipeline parallelism (--pp-size) over gloo: transformers' greedy tokens, stages that overlap."""

from __future__ import annotations

import pytest
from disagg.common.engine.model_runner import BatchPlan
from disagg.common.engine.offline import Engine
from disagg.common.parallel.pipeline import layer_range, micro_batch_bounds, split_plan

from tests.conftest import hf_greedy, make_tiny_model

GREEDY = {"max_new_tokens": 10, "temperature": 0, "ignore_eos": True}
# several requests per step (so a step splits into micro-batches), a prompt longer than a chunk
PROMPTS = [[1, 2, 3, 4, 5], [7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19], [300], [42] * 6]


def _generate(path: str, **kw) -> list[list[int]]:
    engine = Engine(model_path=path, page_size=4, chunked_prefill_size=16, **kw)
    try:
        return [o["output_ids"] for o in engine.generate(PROMPTS, GREEDY)]
    finally:
        engine.shutdown()


def test_layers_split_into_contiguous_stages():
    assert [layer_range(3, s, 2) for s in range(2)] == [(0, 1), (1, 3)]
    assert [layer_range(30, s, 4) for s in range(4)] == [(0, 7), (7, 15), (15, 22), (22, 30)]


def test_a_plan_splits_into_micro_batches_of_whole_requests():
    q_lens = [5, 1, 1, 8, 1]
    ids = list(range(16))
    plan = BatchPlan(ids=ids, positions=ids, pages=ids, offsets=[0] * 16, logits_index=[4, 5, 6, 15],
                     q_lens=q_lens, kv_lens=[5, 9, 3, 8, 4], tables=[[r] for r in range(5)])  # fmt: skip
    bounds = micro_batch_bounds(q_lens, 3)
    assert bounds[0][0] == 0 and bounds[-1][1] == 5 and len(bounds) == 3
    parts = split_plan(plan, 3)
    assert sum((p.ids for p in parts), []) == ids
    assert sum((p.tables for p in parts), []) == plan.tables
    # the logits rows, renumbered inside each micro-batch, still name the same tokens in order
    rows = [p.ids[i] for p in parts for i in p.logits_index]
    assert rows == [ids[i] for i in plan.logits_index]
    assert micro_batch_bounds([3] * 8, 8) == [(i, i + 1) for i in range(8)]


@pytest.fixture(scope="module")
def pp_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("pp")
    from tests.conftest import TINY_CONFIGS

    TINY_CONFIGS.setdefault(
        "qwen3_moe",
        dict(model_type="qwen3_moe", architectures=["Qwen3MoeForCausalLM"], head_dim=16, num_experts=4,
             num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True, tie_word_embeddings=False),
    )  # fmt: skip
    # 3 layers: the stages are uneven (1 + 2); qwen2 ties the LM head to the embedding (both ends need it)
    return {
        name: make_tiny_model(root / name, name, num_hidden_layers=3) for name in ("llama", "qwen2", "qwen3_moe")
    }


@pytest.mark.slow
@pytest.mark.parametrize(
    "family,kw",
    [
        ("llama", dict(pp_size=2)),
        ("qwen2", dict(pp_size=3)),
        ("qwen3_moe", dict(pp_size=2, tp=2, ep=2)),
    ],
    ids=["llama-pp2", "qwen2-tied-pp3", "qwen3moe-pp2-tp2-ep2"],
)
def test_pipeline_matches_transformers(pp_models, family, kw):
    path = pp_models[family]
    assert _generate(path, **kw) == [hf_greedy(path, p, GREEDY["max_new_tokens"]) for p in PROMPTS]


@pytest.mark.slow
def test_pp2_tp2_dense_matches_transformers(pp_models):
    path = pp_models["llama"]
    assert _generate(path, pp_size=2, tp=2) == [hf_greedy(path, p, GREEDY["max_new_tokens"]) for p in PROMPTS]


def test_impossible_pipeline_fails_clearly(pp_models):
    with pytest.raises(ValueError, match="--pp-size 4: the model has 3 layers"):
        Engine(model_path=pp_models["llama"], pp_size=4)
