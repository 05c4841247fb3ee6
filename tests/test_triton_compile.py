"""The Triton kernels every model's decode step runs, compiled for sm_90 (the H200) on this CPU
machine: Triton's interpreter, which the other CPU tests run them under, skips the compiler's checks
(types across branches, casts, layouts), and a kernel that fails to compile on the GPU falls back to
torch ops at start-up (or, unchecked, fails the server). MLA's fused steps and the MoE GEMVs have
their own compile tests beside their interpreter tests (test_fused_mla_rope.py, test_fp8_moe.py)."""

from __future__ import annotations

import pytest

from tests.conftest import compile_for_hopper

pytest.importorskip("triton")


@pytest.mark.parametrize("qk_norm", [False, True])
@pytest.mark.parametrize("block_h", [1, 4])
def test_rope_kv_kernel_compiles(block_h, qk_norm):
    """RoPE (+ Qwen3's q/k norm) and the K/V write, at head_dim 128, both launch shapes."""
    from disagg.common.models.fused_rope_kv import _rope_kv_kernel

    types = dict.fromkeys(("q", "k", "v", "q_out", "kv", "q_w", "k_w"), "*bf16")
    types |= {"positions": "*i64", "k_rows": "*i64", "cos_sin": "*fp32", "eps": "fp32"}
    consts = dict(HALF=64, HALF_POW2=64, BLOCK_H=block_h, IS_NEOX=True, QK_NORM=qk_norm)
    compile_for_hopper(_rope_kv_kernel, types, consts)


def test_routing_kernels_compile():
    """Softmax top-k (Qwen3-MoE, Mixtral, V2) at 128 experts and V3's grouped, biased top-k at 256
    experts in 8 groups."""
    from disagg.common.models.fused_moe import _grouped_topk_kernel, _topk_kernel

    compile_for_hopper(
        _topk_kernel,
        {"logits": "*bf16", "weights": "*fp32", "ids": "*i64"},
        dict(K=8, E_POW2=128, RENORMALIZE=True),
    )
    compile_for_hopper(
        _grouped_topk_kernel,
        {"logits": "*fp32", "bias": "*fp32", "weights": "*fp32", "ids": "*i64", "scaling": "fp32"},
        dict(K=8, K_POW2=8, E=256, GROUPS=8, TOPK_GROUP=4, RENORMALIZE=True),
    )


def test_top_k_sum_kernel_compiles():
    from disagg.common.models.fused_moe import _sum_pairs_kernel

    compile_for_hopper(_sum_pairs_kernel, {"y": "*bf16", "out": "*bf16"}, dict(K=8, BLOCK=1024))
