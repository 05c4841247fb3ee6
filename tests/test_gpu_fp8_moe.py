"""FP8 experts on the GPU (Hopper: FP8 tensor cores): the fused MoE kernels on DeepSeek-V3's per-rank
expert shape (H 7168, I 256 = 2048 / tp 8, 128x128 blocks) against the float64 dequantized reference,
eagerly and replayed inside a CUDA graph; and a small dummy DeepSeek-V3 keeps its experts in FP8
and decodes the tokens of its dequantized experts (the same FP8 values) within the logprob check."""

from __future__ import annotations

import json

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0),
        reason="needs a Hopper GPU (FP8 tensor cores)",
    ),
]


def _experts(num: int, hidden: int, inter: int, block=(128, 128)):
    from disagg.common.models import fp8
    from disagg.common.models.moe_align import ExpertScales

    gen = torch.Generator(device="cuda").manual_seed(0)
    out = []
    for n, k in ((2 * inter, hidden), (hidden, inter)):
        w = torch.randn(num, n, k, device="cuda", generator=gen) / k**0.5
        qs = [fp8.quantize_weight_blocks(w[e], block) for e in range(num)]
        out += [torch.stack([q for q, _ in qs]), torch.stack([s for _, s in qs])]
    w13, s13, w2, s2 = out
    return w13, w2, ExpertScales(s13, s2, block)


def _reference(x, w13, w2, scales, weights, ids):
    from disagg.common.models.moe_align import dequantize_experts, grouped_experts

    d13 = dequantize_experts(w13, scales.w13, scales.block, torch.float64)
    d2 = dequantize_experts(w2, scales.w2, scales.block, torch.float64)
    return grouped_experts(x.double(), d13, d2, weights.double(), ids, 256 if x.shape[0] >= 256 else 16)


@pytest.mark.parametrize("tokens,path,tol", [(1, "gemv", 2e-2), (4, "gemv", 2e-2), (1, "gemv-wide", 2e-2),
                                             (64, "grouped", 6e-2), (2048, "grouped", 6e-2), (3, "grouped", 6e-2)])  # fmt: skip
def test_fp8_kernels_match_the_dequantized_reference(tokens, path, tol):
    """GEMV: bf16 activations against FP8 weight tiles dequantized in registers (bf16 rounding only;
    gemv-wide: gate/up tiles of 512 across four scale blocks, FP8_WIDE_K); grouped: activations
    quantized per token per 128 group as well (FP8 rounding of both operands: a few percent, as
    SGLang's w8a8 block kernels)."""
    from disagg.common.models.fused_moe import fused_experts, moe_config

    w13, w2, scales = _experts(32, 7168, 256)
    torch.manual_seed(tokens)
    x = torch.randn(tokens, 7168, device="cuda", dtype=torch.bfloat16)
    ids = torch.randint(-2, 34, (tokens, 8), device="cuda")  # a few other ranks' experts
    ids[0, 0] = 5
    weights = torch.rand(tokens, 8, device="cuda")
    config = dict(moe_config(32, 256, 7168), gemv_max_pairs=1 << 30 if path.startswith("gemv") else 0)
    if path == "gemv-wide":
        config["gemv"] = dict(config["gemv"], BLOCK_K=512, FP8_WIDE_K=True)
    got = fused_experts(x, w13, w2, weights, ids, config, scales=scales).double()
    ref = _reference(x, w13, w2, scales, weights, ids)
    err = ((got - ref).norm() / ref.norm()).item()
    assert err < tol, err


def test_fp8_kernels_replay_in_a_cuda_graph():
    from disagg.common.models.fused_moe import fused_experts, moe_config

    w13, w2, scales = _experts(16, 1024, 256)
    for tokens, pairs in ((2, 1 << 30), (64, 0)):  # the GEMV, then the grouped path
        config = dict(moe_config(16, 256, 1024), gemv_max_pairs=pairs)
        x = torch.randn(tokens, 1024, device="cuda", dtype=torch.bfloat16)
        ids = torch.randint(0, 16, (tokens, 4), device="cuda")
        weights = torch.rand(tokens, 4, device="cuda")
        fused_experts(x, w13, w2, weights, ids, config, scales=scales)  # compile outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = fused_experts(x, w13, w2, weights, ids, config, scales=scales)
        ids.copy_(torch.randint(0, 16, (tokens, 4), device="cuda"))  # new routing, same buffers
        graph.replay()
        ref = _reference(x, w13, w2, scales, weights, ids)
        assert ((out.double() - ref).norm() / ref.norm()).item() < 6e-2, tokens


def test_dummy_v3_decodes_with_fp8_experts(monkeypatch):
    """DISAGG_FP8_GEMM auto on Hopper: the small V3 preset's experts are FP8 on the Triton path and
    its greedy tokens are those of the same FP8 values dequantized (DISAGG_FP8_GEMM=torch, the torch
    reference), within vLLM's check_logprobs_close (FP8 activation rounding in the kernels)."""
    from disagg.common.engine.offline import Engine

    from tests.test_common_fp8 import SMALL_V3

    outs = []
    for mode in ("auto", "torch"):
        monkeypatch.setenv("DISAGG_FP8_GEMM", mode)
        engine = Engine(model_path="DeepSeek-V3", load_format="dummy", dtype="bfloat16", page_size=16,
                        json_model_override_args=json.dumps(SMALL_V3), max_total_tokens=4096)  # fmt: skip
        try:
            experts = engine.scheduler.runner.model.layers[1].mlp.experts
            assert experts.w13.dtype == torch.float8_e4m3fn
            assert experts.fp8_backend == ("triton" if mode == "auto" else "torch")
            prompts = [[1, 2, 3, 4, 5], list(range(10, 40))]
            outs.append(engine.generate(prompts, {"max_new_tokens": 16, "temperature": 0, "ignore_eos": True,
                                                  "top_logprobs_num": 5}))  # fmt: skip
        finally:
            engine.shutdown()
    for a, b in zip(*outs, strict=True):  # vLLM's check_logprobs_close (as tests/test_gpu_engine.py)
        ids_a, ids_b = a["output_ids"], b["output_ids"]
        k = next((j for j, (x, y) in enumerate(zip(ids_a, ids_b, strict=True)) if x != y), None)
        if k is not None:
            assert ids_b[k] in {t for t, _ in a["meta_info"]["output_top_logprobs"][k]}
            assert ids_a[k] in {t for t, _ in b["meta_info"]["output_top_logprobs"][k]}
