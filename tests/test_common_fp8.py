"""FP8 block quantization (DeepSeek-V3's checkpoint format): the block and per-token-group math, the
Triton GEMM under Triton's CPU interpreter, and the FP8 layout `--load-format dummy` builds for an
fp8 `quantization_config` (on the CPU through DISAGG_FP8_GEMM=torch; by default the CPU dequantizes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from disagg.common.models import fp8

# the DeepSeek-V3 preset (FP8, 128x128 blocks) shrunk through --json-model-override-args
SMALL_V3 = dict(num_hidden_layers=2, hidden_size=256, intermediate_size=512, moe_intermediate_size=128,
                num_attention_heads=2, num_key_value_heads=2, q_lora_rank=192, kv_lora_rank=128,
                n_routed_experts=8, n_group=4, topk_group=2, vocab_size=1024, first_k_dense_replace=1,
                max_position_embeddings=512)  # fmt: skip


def test_weight_blocks_round_trip_within_fp8_precision():
    """Each block's largest |w| maps to 448 and every value comes back within e4m3's 3-bit mantissa
    (a relative error of at most 1/16), for shapes that are not multiples of the block."""
    torch.manual_seed(0)
    w = torch.randn(200, 300) * torch.logspace(-3, 1, 300)  # columns of very different magnitudes
    q, scale = fp8.quantize_weight_blocks(w, (128, 128))
    assert q.dtype == torch.float8_e4m3fn and q.shape == w.shape
    assert scale.shape == (2, 3)
    assert q.float().abs().amax() == 448.0
    back = fp8.dequantize_weight_blocks(q, scale, (128, 128))
    # subnormals (below 2^-6 of the scale) have a fixed spacing of 2^-9 scales
    subnormal_step = fp8.expand_block_scales(scale, (128, 128), w.shape) * 2**-9
    assert ((back - w).abs() <= w.abs() / 16 + subnormal_step).all()


def test_block_gemm_is_the_product_of_the_dequantized_operands():
    """Per-token groups of 128 activations and 128x128 weight blocks: the GEMM equals the float32
    product of the dequantized operands and is within FP8 error of the dense product."""
    torch.manual_seed(1)
    x, w = torch.randn(7, 384), torch.randn(160, 384) * 0.05
    xq, xs = fp8.quantize_activation_groups(x, 128)
    wq, ws = fp8.quantize_weight_blocks(w, (128, 128))
    assert xs.shape == (7, 3) and ws.shape == (2, 3)
    out = fp8.block_fp8_matmul_torch(xq, xs, wq, ws, (128, 128), torch.float32)
    x_deq = xq.float() * xs.repeat_interleave(128, 1)
    torch.testing.assert_close(out, x_deq @ fp8.dequantize_weight_blocks(wq, ws, (128, 128)).T)
    dense = x @ w.T
    assert (out - dense).norm() / dense.norm() < 0.05
    assert (out - dense).norm() / dense.norm() > 0  # the quantization is real


def test_interpreted_triton_gemm_matches_torch():
    """The Triton block-scaled matmul (tile masks, per-K-block scales, odd shapes, split K) under Triton's CPU
    interpreter equals the torch math; the group-quant kernel gives torch's scales.
    NOTE: the interpreter rounds float -> float8 wrongly at mantissa carries (124.7 -> 64), so the
    quantized values themselves are checked on the GPU (tests/test_gpu_fp8.py)."""
    pytest.importorskip("triton")
    code = textwrap.dedent(
        """
        import torch
        from disagg.common.models import fp8
        from disagg.common.models.fp8_kernels import block_fp8_matmul, quantize_activation_groups_triton
        torch.manual_seed(0)
        for m, n, k, block in ((5, 48, 40, (16, 16)), (17, 33, 64, (16, 16)), (40, 70, 96, (32, 32))):
            x, w = torch.randn(m, k), torch.randn(n, k)
            xq, xs = fp8.quantize_activation_groups(x, block[1])
            torch.testing.assert_close(quantize_activation_groups_triton(x, block[1])[1], xs)
            wq, ws = fp8.quantize_weight_blocks(w, block)
            out = block_fp8_matmul(xq, xs, wq, ws, block, torch.float32)
            ref = fp8.block_fp8_matmul_torch(xq, xs, wq, ws, block, torch.float32)
            torch.testing.assert_close(out, ref)
            split = block_fp8_matmul(xq, xs, wq, ws, block, torch.float32, dict(SPLIT_K=3))  # K split 3 ways
            torch.testing.assert_close(split, ref)
            # the partials summed and cast in one launch (the interpreter truncates to bf16: bf16's tolerance)
            half = block_fp8_matmul(xq, xs, wq, ws, block, torch.bfloat16, dict(SPLIT_K=3))
            assert half.dtype == torch.bfloat16 and half.shape == (m, n)
            torch.testing.assert_close(half.float(), ref, rtol=2e-2, atol=2e-2)
        """
    )
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def _dummy_v3(monkeypatch, mode: str, **kwargs):
    from disagg.common.engine.offline import Engine

    monkeypatch.setenv("DISAGG_FP8_GEMM", mode)
    return Engine(model_path="DeepSeek-V3", load_format="dummy", json_model_override_args=json.dumps(SMALL_V3),
                  page_size=4, max_total_tokens=256, **kwargs)  # fmt: skip


def test_dummy_weights_take_the_fp8_block_layout(monkeypatch):
    """`--load-format dummy` on the V3 preset (quantization_config fp8, 128x128 blocks): every linear
    but kv_b_proj, and the routed experts, hold float8_e4m3fn weights and one scale per 128x128 block;
    the router and norms keep the model dtype; the model generates. (The shared MLP kept as it loads:
    fused into the expert stack it would be more slots of the experts' layout below.)"""
    engine = _dummy_v3(monkeypatch, "torch", disable_shared_experts_fusion=True)
    params = dict(engine.scheduler.runner.model.named_parameters())
    attn = "layers.1.self_attn"
    for name, shape in ((f"{attn}.q_a_proj", (192, 256)), (f"{attn}.q_b_proj", (384, 192)),
                        (f"{attn}.o_proj", (256, 256)), ("layers.0.mlp.down_proj", (256, 512)),
                        ("layers.1.mlp.shared_experts.gate_up_proj", (256, 256))):  # fmt: skip
        assert params[f"{name}.weight"].dtype == torch.float8_e4m3fn, name
        assert params[f"{name}.weight"].shape == shape
        assert params[f"{name}.weight_scale_inv"].shape == (-(-shape[0] // 128), -(-shape[1] // 128))
        assert params[f"{name}.weight_scale_inv"].dtype == torch.float32
    for name in (f"{attn}.kv_b_proj.weight", "layers.1.mlp.gate.weight"):
        assert params[name].dtype == torch.float32, name
    # the routed experts too (8 experts, I = 128, H = 256): one scale per block of each expert
    experts = "layers.1.mlp.experts"
    for name, shape in (("w13", (8, 256, 256)), ("w2", (8, 256, 128))):
        assert params[f"{experts}.{name}"].dtype == torch.float8_e4m3fn, name
        assert params[f"{experts}.{name}"].shape == shape
        assert params[f"{experts}.{name}_scale_inv"].shape == (8, shape[1] // 128, shape[2] // 128)
    out = engine.generate([[1, 2, 3, 4, 5]], {"max_new_tokens": 4, "temperature": 0, "ignore_eos": True})
    assert len(out[0]["output_ids"]) == 4
    engine.shutdown()


def test_cpu_dequantizes_fp8_by_default(monkeypatch):
    """Without FP8 GEMMs (the CPU) the same preset loads plain float32 layers, with no scales."""
    engine = _dummy_v3(monkeypatch, "auto")
    params = dict(engine.scheduler.runner.model.named_parameters())
    assert not [n for n in params if n.endswith("weight_scale_inv")]
    assert params["layers.1.self_attn.o_proj.weight"].dtype == torch.float32
    engine.shutdown()
