"""MoE experts: the eager (routed) path and the CUDA-graph-safe (all local experts) path give the
tokens the same expert mix as a plain per-expert reference, on every rank of an EP layout."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from disagg.common.models.moe import SparseMoE
from disagg.common.parallel.state import ParallelState, get_parallel, set_parallel
from transformers import Qwen3MoeConfig


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
def test_routed_and_graph_safe_paths_match_reference(tp, ep, rank):
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
    torch.testing.assert_close(moe._routed_experts(x, ids, weights), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(moe._all_local_experts(x, ids, weights), ref, rtol=1e-5, atol=1e-6)
