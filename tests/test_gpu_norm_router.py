"""On a CUDA GPU: the post-attention add + RMSNorm with the router's logits in one launch
(common/models/norm_router.py) compiled. At Qwen3-30B-A3B's, DeepSeek-V2-Lite's and DeepSeek-V3's
router shapes its start-up check passes (it equals FlashInfer's fused_add_rmsnorm and the router GEMV),
and its residual equals FlashInfer's exactly."""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize(
    "hidden, experts, gate_dtype",
    [(2048, 128, torch.bfloat16), (2048, 64, torch.float32), (7168, 256, torch.float32)],
)
def test_one_launch_gives_the_norm_and_logits_of_two(hidden, experts, gate_dtype):
    from disagg.common.models.kernels import add_rms_norm
    from disagg.common.models.norm_router import NORM_ROUTER_MAX_TOKENS, add_rms_norm_router, norm_router_ok

    device = torch.device("cuda", torch.cuda.current_device())
    assert norm_router_ok(device, hidden, experts, torch.bfloat16, gate_dtype)
    g = torch.Generator(device=device).manual_seed(hidden + experts)
    for tokens in range(1, NORM_ROUTER_MAX_TOKENS + 1):
        x = torch.randn(tokens, hidden, generator=g, device=device).to(torch.bfloat16)
        residual = (4 * torch.randn(tokens, hidden, generator=g, device=device)).to(torch.bfloat16)
        weight = (1 + 0.1 * torch.randn(hidden, generator=g, device=device)).to(torch.bfloat16)
        gate = (torch.randn(experts, hidden, generator=g, device=device) / hidden**0.5).to(gate_dtype)
        normed, new_residual, logits = add_rms_norm_router(x, residual, weight, 1e-6, gate)
        want_norm, want_res = add_rms_norm(x.clone(), residual.clone(), weight, 1e-6)
        assert torch.equal(new_residual, want_res)
        torch.testing.assert_close(normed, want_norm, rtol=1e-2, atol=1e-2)
        want_logits = torch.nn.functional.linear(normed.to(gate_dtype), gate)
        torch.testing.assert_close(logits, want_logits, rtol=1e-2, atol=1e-2)


def test_a_tiny_moe_keeps_its_tokens_with_the_fused_launch(tmp_path, monkeypatch):
    """A tiny Qwen3-MoE in bf16 under CUDA graphs, three requests at a time (decode batches of at most 3
    tokens: the fused launch's): greedy tokens as with the two kernels (DecoderLayer without it),
    within the logprob-closeness check (a near tie may flip)."""
    pytest.importorskip("triton")
    pytest.importorskip("flashinfer")
    from disagg.common.engine.offline import Engine
    from disagg.common.models import decoder

    from tests.conftest import assert_logprobs_close, make_tiny_model

    path = make_tiny_model(tmp_path / "m", "qwen3_moe", head_dim=64)  # FlashInfer's decode: head_dim 64+
    prompts = [[i + 1, 2 * i + 3, 5, 7 * i + 11, 13] for i in range(3)]
    params = {"max_new_tokens": 24, "temperature": 0, "ignore_eos": True, "top_logprobs_num": 5}
    outs, fused_layers = [], []
    for fused in (True, False):
        if not fused:
            monkeypatch.setattr(decoder, "norm_router_ok", lambda *args: False)
        engine = Engine(model_path=path, attention_backend="flashinfer", dtype="bfloat16", page_size=4,
                        max_total_tokens=4096)  # fmt: skip
        try:
            assert engine.scheduler.runner.graph_runner is not None  # decode replays graphs
            layers = [
                m for m in engine.scheduler.runner.model.modules() if isinstance(m, decoder.DecoderLayer)
            ]
            fused_layers.append(sum(layer.norm_router for layer in layers))
            outs.append(engine.generate(prompts, params))
        finally:
            engine.shutdown()
    assert fused_layers[0] == len(layers) and fused_layers[1] == 0
    assert_logprobs_close(*outs)
