"""`--deepep-mode low_latency` (common/models/moe_a2a.py): the all-to-all MoE with fixed-size
buffers and no size exchange gives the same expert mix as the normal (sizes exchanged) mode and as
the all-reduce layout, on two gloo ranks, also when one rank has no tokens; a tiny Qwen3-MoE at
--tp 2 --ep 2 generates transformers' float32 greedy tokens in low-latency mode."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from disagg.common.engine.offline import Engine
from disagg.common.models import moe_a2a
from disagg.common.models.moe import SparseMoE
from disagg.common.parallel.state import ParallelState, all_reduce, set_parallel
from transformers import Qwen3MoeConfig

from tests.conftest import hf_greedy, make_tiny_model
from tests.procs import free_port

HIDDEN, EXPERTS = 16, 8


def _moe(rank: int, mode: str, redundant: int) -> SparseMoE:
    """Rank `rank`'s half of one MoE layer (same weights on every rank: seeded)."""
    config = Qwen3MoeConfig(hidden_size=HIDDEN, moe_intermediate_size=8, num_experts=EXPERTS,
                            num_experts_per_tok=3, moe_a2a_backend="all_to_all", deepep_mode=mode,
                            ep_num_redundant_experts=redundant)  # fmt: skip
    moe = SparseMoE(config)
    torch.manual_seed(0)
    w13 = torch.randn(moe.num_physical, *moe.experts.w13.shape[1:])
    w2 = torch.randn(moe.num_physical, *moe.experts.w2.shape[1:])
    gate = torch.randn(EXPERTS, HIDDEN)
    with torch.no_grad():
        for slot in range(moe.num_local):  # a replica (redundant slot) holds its expert's weights
            expert = moe.physical_to_logical[moe.first_expert + slot]
            moe.experts.w13[slot] = w13[expert]
            moe.experts.w2[slot] = w2[expert]
        moe.gate.weight.copy_(gate)
    return moe


def _all_reduce_layout(moe: SparseMoE, x: torch.Tensor) -> torch.Tensor:
    """The `none` backend: every rank routes every token to its own experts, then an all-reduce."""
    weights, ids = moe.route(moe.gate(x))
    local = moe.physical_ids(ids) - moe.first_expert
    return all_reduce(moe.routed_experts(x, local, weights))


def _rank_main(rank: int, port: int, failures) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        torch.manual_seed(1)
        inputs = {n: torch.randn(n, HIDDEN) for n in (1, 2, 7)}  # 1 token: rank 1's slice is empty
        for redundant in (0, 2):
            moe_a2a.set_forward_shape(decode=False)  # TP attention: the batch's own size
            set_parallel(ParallelState(tp_rank=rank, tp_size=2, ep_rank=rank, ep_size=2))
            moes = {mode: _moe(rank, mode, redundant) for mode in ("normal", "low_latency")}
            with torch.no_grad():
                for n, x in inputs.items():  # TP attention: both ranks hold the same tokens
                    want = _all_reduce_layout(moes["normal"], x.clone())
                    for mode, moe in moes.items():
                        torch.testing.assert_close(moe(x), want, rtol=1e-5, atol=1e-5, msg=f"{mode} T={n}")
                # DP attention (2 DP ranks of one attention rank each): rank 0 has 7 tokens, rank 1 none
                set_parallel(ParallelState(tp_rank=rank, tp_size=2, ep_rank=rank, ep_size=2, attn_dp_size=2))
                mine = inputs[7] if rank == 0 else inputs[7][:0]
                moe_a2a.set_forward_shape(decode=False, max_tokens=7)
                outs = {mode: moe(mine) for mode, moe in moes.items()}
                assert outs["low_latency"].shape == (mine.shape[0], HIDDEN)
                torch.testing.assert_close(outs["low_latency"], outs["normal"], rtol=1e-5, atol=1e-5)
    except Exception as e:  # noqa: BLE001 - reported to the test process
        failures.put(f"rank {rank}: {e!r}")
        raise
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_low_latency_exchange_equals_normal_and_all_reduce_layouts():
    ctx = mp.get_context("spawn")
    failures = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, port, failures)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    errors = [failures.get() for _ in range(failures.qsize())] if not failures.empty() else []
    assert not errors and all(p.exitcode == 0 for p in procs), errors or [p.exitcode for p in procs]


def test_auto_mode_picks_low_latency_for_decode_batches_only():
    x = torch.zeros(3, HIDDEN)
    moe_a2a.set_forward_shape(decode=True)
    assert moe_a2a.uses_low_latency("auto", x) and not moe_a2a.uses_low_latency("normal", x)
    moe_a2a.set_forward_shape(decode=False)
    assert not moe_a2a.uses_low_latency("auto", x) and moe_a2a.uses_low_latency("low_latency", x)


@pytest.mark.slow
def test_low_latency_mode_at_tp2_ep2_generates_transformers_tokens(tmp_path):
    """One request alone first (a decode batch of one token: rank 1 dispatches nothing), then three."""
    path = make_tiny_model(tmp_path / "qwen3_moe", "qwen3_moe")
    prompts = [[1, 2, 3, 4, 5], [7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19], [300]]
    greedy = {"max_new_tokens": 8, "temperature": 0, "ignore_eos": True}
    engine = Engine(model_path=path, page_size=4, chunked_prefill_size=8, max_total_tokens=2048, tp=2, ep=2,
                    moe_a2a_backend="all_to_all", deepep_mode="low_latency")  # fmt: skip
    try:
        moes = [m for m in engine.scheduler.runner.model.modules() if isinstance(m, SparseMoE)]
        assert moes and all(m.a2a and m.a2a_mode == "low_latency" for m in moes)
        alone = engine.generate([prompts[2]], greedy)[0]["output_ids"]
        out = [o["output_ids"] for o in engine.generate(prompts, greedy)]
    finally:
        engine.shutdown()
    want = [hf_greedy(path, p, 8) for p in prompts]
    assert alone == want[2] and out == want
