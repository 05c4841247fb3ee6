"""The offline benchmark's generate (offline.ours_generate, behind moe_vs_hf's throughput row): its
per-step record accounts for every prompt and output token, and a run that generates nothing fails
instead of printing a throughput."""

from __future__ import annotations

import pytest
from disagg.common.bench.moe_vs_hf import step_summary
from disagg.common.bench.offline import ours_generate
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


def test_a_generate_that_produces_nothing_fails(scheduler):
    """Prompts past the model's context (512) are refused: the benchmark says so, not a throughput."""
    with pytest.raises(RuntimeError, match="generated 0 of 8 tokens: .*context length is 512"):
        ours_generate(scheduler, 2, 600, 4)
