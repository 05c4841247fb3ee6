"""On 2+ CUDA GPUs: --pp-size 2 over NCCL (point-to-point activations, one stage per GPU) gives
transformers' float32 greedy tokens, token for token."""

from __future__ import annotations

import pytest
import torch
from disagg.common.engine.offline import Engine

from tests.conftest import hf_greedy, make_tiny_model

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.slow,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs (one per pipeline stage)"),
]

PROMPTS = [[1, 2, 3, 4, 5], list(range(7, 90)), [300], [42] * 6]


@pytest.mark.parametrize("kw", [dict(pp_size=2), dict(pp_size=2, tp=2)], ids=["pp2", "pp2-tp2"])
def test_gpu_pipeline_matches_transformers(tmp_path, kw):
    if torch.cuda.device_count() < kw.get("tp", 1) * kw["pp_size"]:
        pytest.skip("not enough GPUs")
    path = make_tiny_model(tmp_path / "llama", "llama", num_hidden_layers=3)
    engine = Engine(model_path=path, page_size=4, chunked_prefill_size=32, dtype="float32", device="cuda",
                    attention_backend="torch", disable_cuda_graph=True, **kw)  # fmt: skip
    try:
        out = [o["output_ids"] for o in engine.generate(PROMPTS, {"max_new_tokens": 10, "temperature": 0})]
    finally:
        engine.shutdown()
    assert out == [hf_greedy(path, p, 10) for p in PROMPTS]
