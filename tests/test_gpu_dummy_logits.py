"""On a CUDA GPU: the 8B preset's dummy weights (`--load-format dummy`, the benchmarks' model) give
finite logits on every attention backend, with and without the fused kernels, greedy and sampled, so
no benchmark request meets the engine's non-finite-logits error (common/engine/scheduler.py)."""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("backend, fused", [("auto", True), ("torch", True), ("torch", False)])
def test_the_dummy_8b_gives_finite_logits(backend, fused):
    from disagg.common.engine.offline import Engine
    from disagg.common.models.kernels import fused_kernels

    prompts = [[1, 2, 3], list(range(100, 400))]  # token ids: a preset has no tokenizer in the engine
    params = [{"max_new_tokens": 8, "temperature": 0, "ignore_eos": True, "return_logprob": True},
              {"max_new_tokens": 8, "temperature": 1.0, "seed": 1, "ignore_eos": True, "return_logprob": True}]  # fmt: skip
    with fused_kernels(fused):
        engine = Engine(model_path="Llama-3.1-8B", load_format="dummy", attention_backend=backend,
                        max_total_tokens=4096)  # fmt: skip
        try:
            outs = [engine.generate([p], q)[0] for p in prompts for q in params]
        finally:
            engine.shutdown()
    for out in outs:
        assert out["finish_reason"] == "length", out["meta_info"].get("error")
        lps = out["meta_info"]["output_logprobs"]
        assert len(lps) == 8 and all(lp == lp and lp > float("-inf") for lp in lps), lps
