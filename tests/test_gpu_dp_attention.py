"""On 2+ CUDA GPUs: DP attention over NCCL (--tp 2 --dp-size 2 --enable-dp-attention --ep 2, the
all-to-all MoE) gives transformers' float32 greedy tokens with an idle DP rank, and runs in bf16
with the default attention backend."""

from __future__ import annotations

import pytest
import torch
from disagg.common.engine.offline import Engine

from tests.conftest import assert_pool_clean, hf_greedy, make_tiny_model
from tests.test_parallel_dp_attention import FIRST, THEN

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.slow,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs (one per DP rank)"),
]
DP_MOE = dict(tp=2, dp_size=2, ep=2, moe_a2a_backend="all_to_all", enable_dp_attention=True)
GREEDY = {"max_new_tokens": 10, "temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def moe_path(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("gpu-dp-attention") / "moe", "qwen3_moe")


@pytest.mark.parametrize("lm_head", [False, True], ids=["tp-lm-head", "dp-lm-head"])
def test_gpu_dp_attention_matches_transformers(moe_path, lm_head):
    engine = Engine(model_path=moe_path, page_size=4, chunked_prefill_size=32, dtype="float32", device="cuda",
                    attention_backend="torch", enable_dp_lm_head=lm_head, **DP_MOE)  # fmt: skip
    try:
        first = [o["output_ids"] for o in engine.generate(FIRST, GREEDY)]
        then = [o["output_ids"] for o in engine.generate(THEN, GREEDY)]
    finally:
        engine.shutdown()
    assert first == [hf_greedy(moe_path, p, 10) for p in FIRST]
    assert then == [hf_greedy(moe_path, p, 10) for p in THEN]


def test_gpu_dp_attention_runs_in_bf16_with_the_default_backend(moe_path):
    """The default dtype and attention backend (FlashInfer when installed), uneven DP ranks: every
    request finishes and every page comes back (no collective left waiting on an idle rank)."""
    engine = Engine(model_path=moe_path, page_size=16, device="cuda", max_total_tokens=4096, **DP_MOE)
    try:
        outs = engine.generate(FIRST, GREEDY) + engine.generate(THEN * 5, GREEDY)
        assert [len(o["output_ids"]) for o in outs] == [10] * (len(FIRST) + 5 * len(THEN))
        for s in engine.scheduler.schedulers:
            assert_pool_clean(s)
    finally:
        engine.shutdown()
