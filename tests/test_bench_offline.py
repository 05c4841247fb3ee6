"""The offline benchmark's generate (offline.ours_generate, behind moe_vs_hf's throughput row): its
per-step record accounts for every prompt and output token, and a run that generates nothing fails
instead of printing a throughput."""

from __future__ import annotations

import pytest
import torch
from disagg.common.bench.moe_vs_hf import step_summary
from disagg.common.bench.offline import bench_prefill, ours_generate
from disagg.common.engine.offline import Engine


@pytest.fixture(scope="module", params=[False, True], ids=["plain", "overlap"])
def scheduler(tiny_models, request):
    """Both schedules: the GPU's default overlaps step n+1's launch with step n (one step of lag)."""
    engine = Engine(model_path=tiny_models["llama"], page_size=4, max_total_tokens=2048, chunked_prefill_size=64,
                    disable_radix_cache=True, enable_overlap_schedule=request.param)  # fmt: skip
    assert engine.scheduler.overlap == request.param
    yield engine.scheduler
    engine.shutdown()


def test_step_record_accounts_for_every_token(scheduler):
    """6 prompts of 40 tokens in chunks of 64: prefill steps carry all 240 prompt tokens (the later
    ones beside the first requests' decode rows), and the decode rows make the 5 tokens a request
    after its first."""
    steps: list[tuple[int, int, float]] = []
    assert ours_generate(scheduler, 6, 40, 6, steps) > 0
    assert sum(p for p, _, _ in steps) == 6 * 40
    assert sum(d for _, d, _ in steps) == 6 * 5
    summary = step_summary(steps)
    assert sum(row["steps"] for row in summary.values()) == len(steps)
    assert any(
        kind.startswith("prefill+") and not kind.endswith("+0 decode") for kind in summary
    )  # mixed steps
    assert "decode 6" in summary  # once every request is in: decode-only steps of all six


def test_prefill_is_timed_whole_and_as_its_forward_alone(scheduler):
    """bench_prefill's figures: the steps that serve a 60-token prompt (one chunk), the model forward
    of that chunk alone, re-run on the plan it captured, and that forward split into the host's
    preparation and launches (each within the forward's total); none leaves a page taken."""
    free = scheduler.pool.num_free_pages
    # NOTE: milliseconds on a shared 2-core CI machine: a busy neighbour can stretch one run's figures,
    # so up to three runs; a forward timed as several steps' worth fails every one of them
    for _ in range(3):
        step_s, forward_s, split = bench_prefill(scheduler, 60)
        assert 0 < forward_s and 0 < step_s
        assert 0 < split["prepare_ms"] and 0 < split["launch_ms"]
        assert 0 < split["plan_ms"] < split["prepare_ms"]
        assert split["prepare_ms"] + split["launch_ms"] <= split["total_ms"]
        assert "device_layers_ms" not in split  # CUDA events only on a GPU
        assert scheduler.pool.num_free_pages == free and not scheduler.has_work()
        if forward_s < 2 * step_s:  # the prompt's forward, not several steps' worth
            break
    else:
        pytest.fail(f"the forward alone took {forward_s:.4f} s against {step_s:.4f} s for the whole prefill")


def test_a_generate_that_produces_nothing_fails(scheduler):
    """Prompts past the model's context (512) are refused: the benchmark says so, not a throughput."""
    with pytest.raises(RuntimeError, match="generated 0 of 8 tokens: .*context length is 512"):
        ours_generate(scheduler, 2, 600, 4)


def test_touched_experts_counts_routers_that_skip_the_gate_module(tmp_path, monkeypatch):
    """offline.py's "experts" column (behind each MoE roofline): the mean number of experts a decode
    step routes to per layer, counted where the gate module is never called, as on the GPU where the
    router's Triton GEMV computes the logits (the hooks on the gates it used counted nothing there:
    ZeroDivisionError on the H100). Batch 1 at top-3 of 8 experts touches exactly 3 a layer."""
    import torch.nn.functional as F
    from disagg.common.bench.offline import bench_decode
    from disagg.common.models.moe import SparseMoE

    from tests.conftest import make_tiny_model

    monkeypatch.setattr(SparseMoE, "logits", lambda self, x: F.linear(x, self.gate.weight))  # no gate call
    engine = Engine(
        model_path=make_tiny_model(tmp_path / "m", "qwen3_moe"), page_size=4, max_total_tokens=2048
    )
    try:
        moes = [m for m in engine.scheduler.runner.model.modules() if isinstance(m, SparseMoE)]
        _, _, touched = bench_decode(engine.scheduler, 1, 12, 2)
        assert touched == moes[0].top_k == 3
        _, _, touched = bench_decode(engine.scheduler, 4, 12, 2)
        assert 3 < touched <= 8
        assert all(int(m.expert_tokens.sum()) == 0 and not m.count_tokens for m in moes)  # left as found
    finally:
        engine.shutdown()


def test_prefix_prefill_forwards_the_new_tokens_over_the_cached_prefix(scheduler):
    """offline.py --prefix-len: the timed forward is the request's later tokens attending over its
    prefix's pages: its last row's logits are the whole prompt's, prefilled fresh in one forward; the
    pool's free pages are untouched."""
    from disagg.common.bench.offline import bench_prefix_prefill, prefix_plans
    from disagg.common.engine.model_runner import BatchPlan

    runner, free = scheduler.runner, scheduler.pool.num_free_pages
    first, then = prefix_plans(runner, 37, 20)
    assert then.positions[0] == 37 and then.kv_lens == [57] and then.q_lens == [20]
    runner.forward_plan(first)
    extended = runner.forward_plan(then)[-1].float()
    whole = BatchPlan(first.ids + then.ids, first.positions + then.positions, first.pages + then.pages,
                      first.offsets + then.offsets, [56], [57], [57], then.tables)  # fmt: skip
    fresh = runner.forward_plan(whole)[-1].float()
    torch.testing.assert_close(extended, fresh, atol=1e-3, rtol=1e-3)
    assert bench_prefix_prefill(runner, 37, 20) > 0
    assert scheduler.pool.num_free_pages == free
    with pytest.raises(ValueError, match="more pages than the pool has"):
        prefix_plans(runner, 4000, 100)
