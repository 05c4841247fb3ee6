"""The Triton kernels every model's decode step runs, compiled for sm_90 (the H200) on this CPU
machine: Triton's interpreter, which the other CPU tests run them under, skips the compiler's checks
(types across branches, casts, layouts), and a kernel that fails to compile on the GPU falls back to
torch ops at start-up (or, unchecked, fails the server). MLA's fused steps and the MoE GEMVs have
their own compile tests beside their interpreter tests (test_fused_mla_rope.py, test_fp8_moe.py).
Each kernel is compiled as DISAGG_PDL=1 launches it (compile_for_hopper: PDL=True, the plain code
and the wait), and its PTX waits for its predecessor before touching memory (common/models/pdl.py)."""

from __future__ import annotations

import re

import pytest

from tests.conftest import compile_for_hopper

pytest.importorskip("triton")


@pytest.mark.parametrize("qk_norm", [False, True])
@pytest.mark.parametrize("block_h", [1, 8])
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
        {"logits": "*bf16", "weights": "*fp32", "ids": "*i64", "scaling": "fp32"},
        dict(K=8, E_POW2=128, RENORMALIZE=True, SHARED=0),
    )
    compile_for_hopper(  # V2-Lite's with its 2 shared experts fused after the routed ones
        _topk_kernel,
        {"logits": "*fp32", "weights": "*fp32", "ids": "*i64", "scaling": "fp32"},
        dict(K=6, E_POW2=64, RENORMALIZE=False, SHARED=2),
    )
    compile_for_hopper(
        _grouped_topk_kernel,
        {"logits": "*fp32", "bias": "*fp32", "weights": "*fp32", "ids": "*i64", "scaling": "fp32"},
        dict(K=8, K_POW2=8, E=256, GROUPS=8, TOPK_GROUP=4, RENORMALIZE=True, SHARED=1),
    )


@pytest.mark.parametrize("w_type", ["*bf16", "*fp32"])
def test_router_gemv_compiles(w_type):
    """The gate's logits of a decode batch: Qwen3-30B-A3B's bf16 gate at batch 1, DeepSeek's float32 one at 16."""
    from disagg.common.models.fused_moe import _router_gemv_kernel

    for t_pow2, block_h in ((1, 2048), (16, 128)):
        compile_for_hopper(
            _router_gemv_kernel,
            {"x": "*bf16", "w": w_type, "out": w_type},
            dict(T_POW2=t_pow2, BLOCK_E=2, BLOCK_H=block_h),
        )


def test_sum_kernel_compiles():
    """The MoE's top-k sum (bf16 pairs) and the FP8 GEMM's split-K sum (float32 partials, bf16 out)."""
    from disagg.common.models.fused_moe import _sum_terms_kernel

    compile_for_hopper(_sum_terms_kernel, {"y": "*bf16", "out": "*bf16"}, dict(K=8, BLOCK=1024))
    compile_for_hopper(_sum_terms_kernel, {"y": "*fp32", "out": "*bf16"}, dict(K=4, BLOCK=1024))


def test_plain_launch_has_no_grid_dependency_control():
    """DISAGG_PDL=0 (the default): the kernels the H200 runs carry no griddepcontrol instruction."""
    from disagg.common.models.fused_moe import _sum_terms_kernel

    plain = compile_for_hopper(
        _sum_terms_kernel, {"y": "*bf16", "out": "*bf16"}, dict(K=8, BLOCK=1024, PDL=False)
    )
    assert "griddepcontrol" not in plain.asm["ptx"]


def test_expert_alignment_kernels_compile():
    """The grouped path's alignment at 128 experts: one program (decode batches), and the three
    launches of prefill-sized batches."""
    from disagg.common.models import fused_moe as fm

    i32 = "*i32"
    compile_for_hopper(
        fm._align_kernel,
        {"ids": "*i64", "sorted_ids": i32, "expert_ids": i32, "num_padded": i32, "cursor": i32},
        dict(BLOCK=16, E_POW2=128, CHUNK=128),
    )
    compile_for_hopper(
        fm._align_count, {"ids": "*i64", "chunk_counts": i32, "sorted_ids": i32}, dict(E_POW2=128, CHUNK=128)
    )
    compile_for_hopper(
        fm._align_scan,
        {"chunk_counts": i32, "expert_ids": i32, "num_padded": i32, "expert_start": i32},
        dict(BLOCK=64, E_POW2=128, ROWS=128, CHUNK=128),
    )
    compile_for_hopper(
        fm._align_place,
        {"ids": "*i64", "sorted_ids": i32, "chunk_base": i32, "expert_start": i32},
        dict(E_POW2=128, CHUNK=128),
    )


@pytest.mark.parametrize(
    "fp8, combine", [(False, None), (True, None), (False, "*fp32"), (True, "*fp32"), (False, "*bf16")]
)
def test_grouped_expert_gemms_compile(fp8, combine):
    """The grouped GEMMs at a decode-batch tile (bf16: gate/up fused with SiLU; FP8: the raw [2I]
    GEMM and the down GEMM forming SiLU in its loads, w8a8 at 128-wide scale blocks); the down GEMM
    adding each pair's row into its token's by reductions into `combine`'s dtype (COMBINE)."""
    from disagg.common.models import fused_moe as fm

    rows = {"sorted_ids": "*i32", "expert_ids": "*i32", "num_padded": "*i32"}
    tile = dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128)
    w = "*fp8e4nv" if fp8 else "*bf16"
    if not fp8:
        compile_for_hopper(fm._gate_up_grouped, {"x": "*bf16", "w13": w, "act": "*bf16", **rows}, tile)
    else:
        compile_for_hopper(
            fm._w13_grouped,
            {"x": "*bf16", "w13": w, "out": "*bf16", "scale": "*fp32", **rows},
            dict(tile, FP8=True, UPCAST=False),
        )
    down = compile_for_hopper(
        fm._down_grouped,
        {"act": "*bf16", "w2": w, "out": combine or "*bf16", "weights": "*fp32", "scale": "*fp32", **rows},
        dict(tile, SILU_IN_LOAD=fp8, FP8=fp8, UPCAST=False, COMBINE=combine is not None),
    )
    reductions = re.findall(r"\bred\.global\.[\w.]+", down.asm["ptx"])
    if combine is None:
        assert not reductions
    else:  # relaxed reductions (no returned value, no fence), in the output's dtype
        assert reductions and all(
            ".relaxed.add" in r and r.endswith({"*fp32": ".f32", "*bf16": ".bf16"}[combine])
            for r in reductions
        ), reductions


def test_fp8_gemm_kernels_compile():
    """The FP8 block GEMM of the dense layers (decode tile, 128-wide K blocks) and its per-token
    activation quantization."""
    from disagg.common.models.fp8_kernels import _block_fp8_matmul_kernel, _group_quant_kernel

    compile_for_hopper(
        _group_quant_kernel,
        {"x_ptr": "*bf16", "q_ptr": "*fp8e4nv", "s_ptr": "*fp32", "eps": "fp32", "fp8_max": "fp32"},
        dict(GROUP=128, GROUPS_PER_PROG=8),
    )
    compile_for_hopper(
        _block_fp8_matmul_kernel,
        {"a_ptr": "*fp8e4nv", "b_ptr": "*fp8e4nv", "c_ptr": "*bf16", "as_ptr": "*fp32", "bs_ptr": "*fp32"},
        dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, GROUP_M=1, UPCAST=False),
    )
