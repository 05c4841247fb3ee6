"""The communication benchmark: its per-step collective count is the one a real TP forward issues,
and a gloo run at tp 2 reports positive bandwidths and step times."""

from __future__ import annotations

import argparse

import pytest
import torch
import torch.distributed as dist
from disagg.common.bench import comm
from disagg.common.engine.attention import ForwardBatch, TorchBackend
from disagg.common.models.decoder import CausalLM, head_dim_of, kv_heads_per_rank
from disagg.common.parallel.state import ParallelState, get_parallel, set_parallel
from transformers import LlamaConfig, Qwen3MoeConfig

TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=101, max_position_embeddings=64)  # fmt: skip


def _count_forward_collectives(config, monkeypatch, tokens: int, ep: int = 1) -> dict:
    """Run one forward of `config` as rank 0 of a pretend tp-2 group; count the collectives issued."""
    counts = {"all_reduce": 0, "all_gather": 0}

    def fake_all_reduce(x, group=None):
        counts["all_reduce"] += 1

    def fake_all_gather(parts, x, group=None):
        counts["all_gather"] += 1
        for p in parts:
            p.copy_(x)

    monkeypatch.setattr(dist, "all_reduce", fake_all_reduce)
    monkeypatch.setattr(dist, "all_gather", fake_all_gather)
    old = get_parallel()
    set_parallel(ParallelState(tp_rank=0, tp_size=2, ep_rank=0, ep_size=ep))
    try:
        torch.manual_seed(0)
        model = CausalLM(config, max_positions=64)
        for p in model.parameters():
            torch.nn.init.normal_(p, std=0.02)
        heads, dim = kv_heads_per_rank(config, 2), head_dim_of(config)
        kv = torch.zeros(config.num_hidden_layers, 4, 2, 16, heads, dim)  # 4 pages of 16
        batch = ForwardBatch(
            input_ids=torch.arange(tokens),
            positions=torch.arange(tokens),
            out_page=torch.zeros(tokens, dtype=torch.long),
            out_offset=torch.arange(tokens),
            q_lens=[tokens],
            kv_lens=[tokens],
            page_tables=[[0]],
            logits_index=torch.tensor([tokens - 1]),
        )
        backend = TorchBackend()
        backend.prepare(batch)
        logits = model(batch, kv, backend)
        assert logits.shape == (1, config.vocab_size)
    finally:
        set_parallel(old)
    return counts


@pytest.mark.parametrize("family", ["dense", "moe"])
def test_step_collectives_match_a_real_tp_forward(family, monkeypatch):
    if family == "dense":
        config, ep = LlamaConfig(**TINY), 1
    else:
        config, ep = Qwen3MoeConfig(**TINY, head_dim=8, num_experts=4, num_experts_per_tok=2,
                                    moe_intermediate_size=16), 2  # fmt: skip
    counts = _count_forward_collectives(config, monkeypatch, tokens=5, ep=ep)
    shape = dict(layers=config.num_hidden_layers, hidden=config.hidden_size, vocab=config.vocab_size)
    assert (counts["all_reduce"], counts["all_gather"]) == comm.step_collectives(shape)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_gloo_tp2_reports_bandwidth_and_step_comm():
    args = argparse.Namespace(
        tp=2,
        model_path=None,
        device="cpu",
        dtype="auto",
        batch_sizes=[1, 4],
        context_len=32,
        prefill_len=16,
        min_size_mib=0.25,
        max_size_mib=0.5,
        iters=2,
        warmup=1,
        no_graph=True,
        timeout=60.0,
    )
    result = comm.run(args)
    shape = comm.model_shape(None)
    assert result["backend"] == "gloo" and result["tp"] == 2
    assert [b["size_bytes"] for b in result["bandwidth"]] == [2**18, 2**19]
    assert all(b["busbw_gb_s"] > 0 and b["us"] > 0 for b in result["bandwidth"])
    assert [(s["kind"], s["tokens"]) for s in result["steps"]] == [
        ("decode", 1),
        ("decode", 4),
        ("prefill", 16),
    ]
    for s in result["steps"]:
        assert s["collectives"] == 2 * shape["layers"] + 2 == s["all_reduces"] + s["all_gathers"]
        assert s["bytes"] > 0 and s["eager_ms"] > 0 and s["plan_broadcast_ms"] > 0
        assert s["graph_ms"] is None  # CUDA graphs only on the GPU
    decode1, decode4 = result["steps"][:2]
    assert decode4["bytes"] > decode1["bytes"]
