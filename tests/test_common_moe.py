"""MoE: the token -> expert alignment keeps its invariants, the grouped (routed-only) expert path
gives the tokens the same expert mix as a plain per-expert reference on every rank of an EP
layout, tiny Qwen3-MoE / Mixtral models generate transformers' greedy tokens (also with redundant
experts placed and re-placed by EPLB), and the expert load reaches /metrics and a load file."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from disagg.common.engine.offline import Engine
from disagg.common.models.eplb import (
    balanced_placement,
    balancedness,
    load_from_metrics,
    moe_layers,
    read_expert_load,
    save_expert_load,
)
from disagg.common.models.moe import SparseMoE, expert_load, set_expert_load_stats
from disagg.common.models.moe_align import (
    grouped_experts,
    grouped_mm_experts,
    max_padded_pairs,
    moe_align_block_size,
)
from disagg.common.parallel.state import ParallelState, get_parallel, set_parallel
from transformers import Qwen3MoeConfig

from tests.conftest import TINY_MOE_CONFIGS, hf_greedy, make_tiny_model


@pytest.mark.parametrize(
    "tokens,k,experts,block", [(1, 8, 128, 16), (37, 3, 8, 4), (64, 2, 5, 16), (5, 2, 64, 1)]
)
def test_align_groups_every_routed_pair_once_in_single_expert_blocks(tokens, k, experts, block):
    torch.manual_seed(tokens)
    # ids past `experts` or negative belong to other EP ranks and must be left out
    ids = torch.randint(-3, experts + 3, (tokens, k))
    sorted_ids, expert_ids, num_padded = moe_align_block_size(ids, experts, block)
    n, used = tokens * k, int(num_padded)
    assert sorted_ids.shape == (max_padded_pairs(n, experts, block),)
    assert expert_ids.shape == (sorted_ids.numel() // block,)
    assert used % block == 0 and used <= sorted_ids.numel()
    ours = ((ids >= 0) & (ids < experts)).flatten().nonzero().flatten()
    real = sorted_ids[:used][sorted_ids[:used] < n].long()
    assert sorted(real.tolist()) == ours.tolist()  # each of our pairs exactly once, no other rank's
    assert (sorted_ids[used:] == n).all()  # nothing past the used length but the sentinel
    blocks, block_experts = sorted_ids[:used].view(-1, block).long(), expert_ids[: used // block].long()
    assert (block_experts >= 0).all() and (expert_ids[used // block :] == -1).all()
    assert block_experts.diff().ge(0).all()  # experts in ascending order
    for b, e in zip(blocks, block_experts, strict=True):
        pairs = b[b < n]
        assert len(pairs) > 0  # no block is all padding
        assert (ids.flatten()[pairs] == e).all()  # one expert per block
        assert (pairs.diff() > 0).all()  # stable: ascending pair order within an expert
    counts = torch.bincount(ids.flatten()[ours], minlength=experts)
    padded_sizes = torch.bincount(block_experts, minlength=experts) * block
    assert padded_sizes.tolist() == ((counts + block - 1) // block * block).tolist()


def _reference(moe: SparseMoE, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for slot in range(ids.shape[1]):
            e = int(ids[t, slot]) - moe.first_expert
            if 0 <= e < moe.num_local:
                gate, up = F.linear(x[t], moe.experts.w13[e]).chunk(2, dim=-1)
                out[t] += weights[t, slot] * F.linear(F.silu(gate) * up, moe.experts.w2[e])
    return out


@pytest.mark.parametrize("tp,ep,rank", [(1, 1, 0), (2, 2, 0), (2, 2, 1), (2, 1, 1), (4, 2, 3)])
def test_routed_experts_match_reference_on_every_rank(tp, ep, rank):
    config = Qwen3MoeConfig(hidden_size=16, moe_intermediate_size=8, num_experts=8, num_experts_per_tok=3)
    old = get_parallel()
    set_parallel(ParallelState(tp_rank=rank, tp_size=tp, ep_rank=rank // (tp // ep), ep_size=ep))
    try:
        torch.manual_seed(rank)
        moe = SparseMoE(config)
        for p in moe.parameters():
            torch.nn.init.normal_(p, std=0.3)
    finally:
        set_parallel(old)
    x = torch.randn(11, 16)
    probs = torch.softmax(moe.gate(x), dim=-1)
    weights, ids = probs.topk(3, dim=-1)
    ref = _reference(moe, x, ids, weights)
    assert ref.abs().sum() > 0
    local = ids - moe.first_expert
    torch.testing.assert_close(moe.routed_experts(x, local, weights), ref, rtol=1e-5, atol=1e-6)
    # the static (graph-capturable) layout, untrimmed, and another block size give the same sums
    w13, w2 = moe.experts.w13, moe.experts.w2
    for block, trim in ((16, False), (1, True), (4, False)):
        got = grouped_experts(x, w13, w2, weights, local, block_size=block, trim=trim)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    # the prefill path on the GPU (torch's grouped GEMM over expert-sorted rows; here its CPU loop):
    # other ranks' experts (ids outside [0, E)) left out the same way
    torch.testing.assert_close(grouped_mm_experts(x, w13, w2, weights, local), ref, rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def moe_model_paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe-tp1")
    return {name: make_tiny_model(root / name, name) for name in TINY_MOE_CONFIGS}


@pytest.mark.parametrize("family", list(TINY_MOE_CONFIGS))
def test_tiny_moe_models_generate_transformers_tokens(moe_model_paths, family):
    path = moe_model_paths[family]
    prompts = [[1, 2, 3, 4, 5], [7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19], [300]]
    engine = Engine(model_path=path, page_size=4, chunked_prefill_size=8, max_total_tokens=2048)
    try:
        greedy = {"max_new_tokens": 12, "temperature": 0, "ignore_eos": True}
        out = [o["output_ids"] for o in engine.generate(prompts, greedy)]
    finally:
        engine.shutdown()
    assert out == [hf_greedy(path, p, 12) for p in prompts]


@pytest.mark.slow
@pytest.mark.parametrize("family", list(TINY_MOE_CONFIGS))
def test_all_to_all_backend_at_tp2_ep2_generates_transformers_tokens(tmp_path, family):
    """--moe-a2a-backend all_to_all over gloo: tokens dispatched to their experts' ranks and back."""
    path = make_tiny_model(tmp_path / family, family)
    prompts = [[1, 2, 3, 4, 5], [7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19], [300]]
    engine = Engine(model_path=path, page_size=4, chunked_prefill_size=8, max_total_tokens=2048, tp=2, ep=2,
                    moe_a2a_backend="all_to_all")  # fmt: skip
    try:
        moes = [m for m in engine.scheduler.runner.model.modules() if isinstance(m, SparseMoE)]
        assert moes and all(m.a2a for m in moes)  # rank 0's layers dispatch by all-to-all
        greedy = {"max_new_tokens": 12, "temperature": 0, "ignore_eos": True}
        out = [o["output_ids"] for o in engine.generate(prompts, greedy)]
    finally:
        engine.shutdown()
    assert out == [hf_greedy(path, p, 12) for p in prompts]


def test_expert_load_counts_every_routed_pair_on_any_rank():
    config = Qwen3MoeConfig(hidden_size=16, moe_intermediate_size=8, num_experts=8, num_experts_per_tok=3)
    old = get_parallel()
    set_parallel(ParallelState(tp_rank=1, tp_size=2, ep_rank=1, ep_size=2))  # holds experts 4..7
    try:
        moe = SparseMoE(config)
    finally:
        set_parallel(old)
    torch.nn.init.normal_(moe.gate.weight)
    set_expert_load_stats(moe, True)
    x = torch.randn(50, 16)
    with torch.no_grad():
        moe(x)
        moe(x[:7])
    ids = torch.cat([moe.route(moe.gate(x))[1], moe.route(moe.gate(x[:7]))[1]]).flatten()
    want = torch.bincount(ids, minlength=8)  # every rank routes every token: all experts' counts
    assert want[:4].sum() > 0 and expert_load(moe, reset=True).tolist() == [want.tolist()]
    assert expert_load(moe).sum() == 0  # reset


def test_balanced_placement_replicates_the_hot_experts_on_other_ranks():
    load = [10.0, 10, 10, 10, 10, 10, 400, 900]  # experts 6 and 7 hot
    placement = balanced_placement(load, 12, 4)  # 4 redundant slots, 4 ranks of 3 slots
    ranks = [placement[r * 3 : (r + 1) * 3] for r in range(4)]
    assert sorted(set(placement)) == list(range(8))  # every expert somewhere
    assert placement.count(7) == 4 and placement.count(6) == 2  # load per copy 225 and 200 vs 10
    assert all(len(set(r)) == len(r) for r in ranks)  # no rank holds two copies of one expert
    default = [p % 8 for p in range(12)]  # the start-up layout replicates the cold experts 0..3
    assert balancedness(load, placement, 4) > 0.75 > 0.5 > balancedness(load, default, 4)
    assert balanced_placement([0.0] * 8, 8, 2) == list(range(8))  # no load: one copy each, in order


def test_expert_load_file_and_metrics_round_trip(tmp_path):
    from disagg.common.engine.request import SchedulerStats
    from disagg.common.server.metrics import ServerMetrics

    load = {1: [5, 0, 7, 1], 3: [2, 2, 2, 9]}
    metrics = ServerMetrics(role="decode")
    metrics.set_stats(SchedulerStats(0, 0, 1, 1, 0, 0, 0, 0.0, 0.0, 0, expert_tokens=load))
    text = metrics.render().decode()
    assert 'disagg_moe_expert_tokens_total{expert="3",layer="3",role="decode"} 9.0' in text
    assert load_from_metrics(text) == load
    save_expert_load(tmp_path / "load.json", load)
    assert read_expert_load(tmp_path / "load.json") == {k: [float(n) for n in v] for k, v in load.items()}


def _generate(path, prompts, **engine_kw) -> tuple[list[list[int]], Engine]:
    engine = Engine(model_path=path, page_size=4, chunked_prefill_size=8, max_total_tokens=2048, **engine_kw)
    greedy = {"max_new_tokens": 12, "temperature": 0, "ignore_eos": True}
    return [o["output_ids"] for o in engine.generate(prompts, greedy)], engine


@pytest.mark.parametrize("family", list(TINY_MOE_CONFIGS))
def test_redundant_experts_replaced_by_load_keep_transformers_tokens(moe_model_paths, family, tmp_path):
    """--ep-num-redundant-experts 2 with the start-up placement from a skewed load file, re-placed
    from the counted load every 3 steps: replicas compute, outputs stay transformers' tokens."""
    path = moe_model_paths[family]
    experts = TINY_MOE_CONFIGS[family].get("num_experts") or TINY_MOE_CONFIGS[family]["num_local_experts"]
    skew = [1000 if e == experts - 1 else 1 for e in range(experts)]  # the last expert hot: 3 copies
    save_expert_load(tmp_path / "load.json", {0: skew, 1: skew})
    prompts = [[1, 2, 3, 4, 5], [7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19], [300]]
    out, engine = _generate(path, prompts, ep_num_redundant_experts=2, init_expert_location=str(tmp_path / "load.json"),
                            eplb_rebalance_num_iterations=3, enable_expert_distribution_metrics=True)  # fmt: skip
    try:
        moes = moe_layers(engine.scheduler.runner.model)
        start = balanced_placement([float(n) for n in skew], experts + 2, 1)
        assert start.count(experts - 1) == 3
        placements = [m.physical_to_logical for m in moes.values()]
        assert placements != [start, start]  # re-placed from the counted load since
        counted = engine.stats().expert_tokens
        assert sorted(counted) == [0, 1] and all(sum(row) > 0 for row in counted.values())
        for moe in moes.values():  # every slot holds its logical expert's weights
            for slot, expert in enumerate(moe.physical_to_logical):
                first = moe.physical_to_logical.index(expert)
                assert torch.equal(moe.experts.w13[slot], moe.experts.w13[first])
    finally:
        engine.shutdown()
    assert out == [hf_greedy(path, p, 12) for p in prompts]


@pytest.mark.slow
@pytest.mark.parametrize("family,a2a", [("qwen3_moe", "all_to_all"), ("mixtral", "none")])
def test_redundant_experts_at_tp2_ep2_generate_transformers_tokens(tmp_path, family, a2a):
    """--tp 2 --ep 2 --ep-num-redundant-experts 2 over gloo (both --moe-a2a-backend layouts): the
    start-up placement from a load file, re-placed every 2 steps (weights moved between the ranks),
    tokens equal transformers'."""
    path = make_tiny_model(tmp_path / family, family)
    experts = TINY_MOE_CONFIGS[family].get("num_experts") or TINY_MOE_CONFIGS[family]["num_local_experts"]
    skew = [1000 if e == 0 else 1 for e in range(experts)]  # expert 0 hot: a copy on each rank
    save_expert_load(tmp_path / "load.json", {0: skew, 1: skew})
    prompts = [[1, 2, 3, 4, 5], [7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19], [300]]
    out, engine = _generate(path, prompts, tp=2, ep=2, ep_num_redundant_experts=2, moe_a2a_backend=a2a,
                            init_expert_location=str(tmp_path / "load.json"), eplb_rebalance_num_iterations=2)  # fmt: skip
    try:
        moes = moe_layers(engine.scheduler.runner.model)
        assert all(m.num_local == (experts + 2) // 2 for m in moes.values())
        start = balanced_placement([float(n) for n in skew], experts + 2, 2)
        assert start.count(0) == 2  # the hot expert on both ranks at start
        assert [m.physical_to_logical for m in moes.values()] != [start, start]  # re-placed since
    finally:
        engine.shutdown()
    assert out == [hf_greedy(path, p, 12) for p in prompts]


def test_moe_scratch_buffers_are_shared_per_shape_and_never_on_the_cpu():
    """fused_moe.scratch (the GPU kernels' per-layer buffers, shared by a forward's layers): the same
    tensor while name, shape and dtype repeat (a prefill's next layer), a new one on any change with
    the old released; on the CPU always a fresh tensor. (meta: a device that is not the CPU, no memory)"""
    from disagg.common.models import fused_moe

    meta, cpu = torch.device("meta"), torch.device("cpu")
    fused_moe._SCRATCH.clear()
    a = fused_moe.scratch("t.act", (8, 4), torch.bfloat16, meta)
    assert fused_moe.scratch("t.act", (8, 4), torch.bfloat16, meta) is a
    assert fused_moe.scratch("t.out", (8, 4), torch.bfloat16, meta) is not a  # another buffer of the layer
    b = fused_moe.scratch("t.act", (16, 4), torch.bfloat16, meta)  # a longer prompt's forward
    assert b is not a and b.shape == (16, 4) and fused_moe._SCRATCH["t.act"] is b
    assert fused_moe.scratch("t.act", (16, 4), torch.float32, meta) is not b
    assert fused_moe.scratch("t.cpu", (2,), torch.int32, cpu) is not fused_moe.scratch(
        "t.cpu", (2,), torch.int32, cpu
    )
    assert "t.cpu" not in fused_moe._SCRATCH
    fused_moe._SCRATCH.clear()
