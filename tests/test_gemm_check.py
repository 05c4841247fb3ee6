"""The start-up check of the model's GEMMs under an MPS SM cap (common/engine/gemm_check.py): it takes
every dense weight shape of the model once (not the embedding, not FP8 or expert stacks), passes right
products and stops the start-up, naming the shape and the cap, at a wrong one (NaN, or garbage: what
cuBLAS gave under an 85% cap on an H100); only a cap below 100% turns it on."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F


def test_the_model_shapes_and_a_wrong_product(tiny_models):
    from disagg.common.engine.gemm_check import check_gemms, dense_weight_shapes
    from disagg.common.engine.offline import Engine

    engine = Engine(model_path=tiny_models["llama"], dtype="bfloat16", page_size=4, max_total_tokens=256)
    try:
        shapes = dense_weight_shapes(engine.scheduler.runner.model)
        config = engine.scheduler.runner.hf_config
    finally:
        engine.shutdown()
    h, v = config.hidden_size, config.vocab_size
    inter = config.intermediate_size
    assert (2 * inter, h) in shapes and (h, inter) in shapes  # gate_up, down
    assert (v, h) in shapes and len(shapes) == len(set(shapes))  # the LM head (untied), each shape once
    cpu = torch.device("cpu")
    check_gemms(shapes, torch.bfloat16, cpu, 85, tokens=(3, 17))  # right products pass

    def broken(x, w):  # as cuBLAS under the cap: one shape's product is NaN at one size
        out = F.linear(x, w)
        return out * float("nan") if (w.shape == (v, h) and x.shape[0] == 17) else out

    with pytest.raises(
        RuntimeError, match=rf"CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=85\): \[17 x {h}\] @ \[{h} x {v}\]"
    ):
        check_gemms(shapes, torch.bfloat16, cpu, 85, tokens=(3, 17), linear=broken)
    with pytest.raises(RuntimeError, match="off by"):  # garbage, not NaN
        check_gemms(
            shapes[:1], torch.bfloat16, cpu, 85, tokens=(5,), linear=lambda x, w: F.linear(x, w).flip(0)
        )


def test_only_a_cap_below_100_turns_it_on(monkeypatch):
    from disagg.common.config import mps_sm_percent

    for value, want in (("85", 85), ("100", None), ("", None), ("abc", None), ("50.0", 50)):
        monkeypatch.setenv("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE", value)
        assert mps_sm_percent() == want
    monkeypatch.delenv("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE")
    assert mps_sm_percent() is None
