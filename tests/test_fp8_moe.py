"""FP8 block-quantized experts (DeepSeek-V3's checkpoint format) in the MoE: the fused Triton kernels
(GEMV and grouped paths) under Triton's CPU interpreter against the float64 dequantized reference;
the tiny FP8 DeepSeek-V3 checkpoint keeps its experts in FP8 blocks (DISAGG_FP8_GEMM=torch) and
gives the dequantized experts' tokens, also with EPLB moving FP8 experts and at tp2 ep2; a moe-TP
split that cuts the checkpoint's blocks is refused."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from disagg.common.models.moe import check_fp8_expert_split

from tests.conftest import hf_greedy
from tests.test_common_deepseek import fp8_deepseek, tiny_deepseek  # noqa: F401 - fixtures

CHECK = textwrap.dedent(
    """
    import torch
    from disagg.common.models import fp8
    from disagg.common.models.fused_moe import fused_experts, moe_config
    from disagg.common.models.moe_align import ExpertScales, dequantize_experts, grouped_experts

    def quantize(w, block):
        qs = [fp8.quantize_weight_blocks(w[e], block) for e in range(w.shape[0])]
        return torch.stack([q for q, _ in qs]), torch.stack([s for _, s in qs])

    def check(tokens, k, experts, inter, hidden, block, path, gemv=None):
        torch.manual_seed(tokens * 7 + k)
        x = torch.randn(tokens, hidden)
        w13, s13 = quantize(torch.randn(experts, 2 * inter, hidden) / hidden**0.5, block)
        w2, s2 = quantize(torch.randn(experts, hidden, inter) / inter**0.5, block)
        ids = torch.randint(-2, experts + 2, (tokens, k))  # a few other ranks' experts
        ids[0, 0] = experts - 1  # at least one pair is ours
        weights = torch.rand(tokens, k)
        config = dict(moe_config(experts, inter, hidden))
        config["gemv_max_pairs"] = 1 << 30 if path == "gemv" else 0
        config["gemv"] = dict(config["gemv"], **(gemv or {}))
        got = fused_experts(x, w13, w2, weights, ids, config, scales=ExpertScales(s13, s2, block))
        d13 = dequantize_experts(w13, s13, block, torch.float64)
        d2 = dequantize_experts(w2, s2, block, torch.float64)
        ref = grouped_experts(x.double(), d13, d2, weights.double(), ids)
        err = ((got.double() - ref).norm() / ref.norm()).item()
        assert err < 1e-4, (tokens, k, path, gemv, err)
        print(tokens, k, path, gemv, err)
    """
)


@pytest.mark.skipif(torch.cuda.is_available(), reason="tests/test_gpu_fp8_moe.py checks the compiled kernels")
def test_interpreted_fp8_kernels_match_the_dequantized_reference():
    """Both paths on FP8 experts with 16x16 blocks: H = 40 leaves a partial K block (w13) and a
    partial row block (w2); GEMV K tiles narrower than a block, down tiles wider than one (several
    blocks a tile), gate/up tiles wider than one where the config says FP8_WIDE_K, and split K step
    through the scales.
    The interpreter keeps activations exact (fused_moe.py's docstring), so the kernels must equal the
    dequantized float64 reference up to float32 rounding: a wrong scale index is far outside that."""
    pytest.importorskip("triton")
    code = textwrap.dedent(
        """
        for tokens, k, experts in ((1, 2, 4), (5, 3, 6), (24, 2, 4)):
            check(tokens, k, experts, 32, 40, (16, 16), "gemv")
            check(tokens, k, experts, 32, 40, (16, 16), "grouped")
        check(2, 2, 4, 32, 40, (16, 16), "gemv", dict(BLOCK_K=8, SPLIT_K=2))
        check(1, 2, 4, 32, 64, (16, 32), "gemv", dict(BLOCK_K=16, SPLIT_K=1))  # rows of 16, groups of 32
        # down K tiles spanning several scale blocks (2 groups a tile; gate/up tiles clamped to one)
        check(3, 2, 4, 32, 64, (16, 16), "gemv", dict(BLOCK_K=64, SPLIT_K=1))
        check(2, 3, 5, 48, 96, (16, 32), "gemv", dict(BLOCK_K=64, SPLIT_K=2))
        # FP8_WIDE_K: gate/up tiles spanning blocks too (each element its block's scale; H = 40: a partial block)
        check(2, 2, 4, 32, 40, (16, 16), "gemv", dict(BLOCK_K=32, SPLIT_K=1, FP8_WIDE_K=True))
        check(3, 3, 5, 48, 96, (16, 32), "gemv", dict(BLOCK_K=64, SPLIT_K=2, FP8_WIDE_K=True))
        # DOWN_SPLIT: a token's slots over several down programs (float32 rows, summed after), k = 3
        # over 2 programs (one slot short), over 3, and 8 asked for (k caps it)
        for split in (2, 3, 8):
            check(4, 3, 5, 48, 96, (16, 32), "gemv", dict(BLOCK_K=32, SPLIT_K=2, DOWN_SPLIT=split))
        # DOWN_SPLIT_K: the intermediate (48) over programs too, in K tiles of 8 within 32-wide scale blocks:
        # parts of 16 (3), of 24 (2: a part ends mid-block), and with the slots split as well
        for down in (dict(DOWN_SPLIT_K=3), dict(DOWN_SPLIT_K=2), dict(DOWN_SPLIT_K=2, DOWN_SPLIT=2)):
            check(2, 3, 5, 48, 96, (16, 32), "gemv", dict(BLOCK_K=32, SPLIT_K=2, DOWN_BLOCK_K=8, **down))
        check(9, 2, 4, 32, 64, (16, 32), "grouped")
        """
    )
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run(
        [sys.executable, "-c", CHECK + code], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]


def test_a_split_that_cuts_the_blocks_is_refused():
    """I = 32 over tp/ep = 4 leaves 8 rows a rank: half a 16-row block. The error names the sizes."""
    check_fp8_expert_split(32, 2, (16, 16))  # 16 a rank: whole blocks
    with pytest.raises(ValueError, match=r"moe intermediate size 32 split 4 ways .* 8 per rank.*\[16, 16\]"):
        check_fp8_expert_split(32, 4, (16, 16))


PROMPTS = [[7, 100, 3, 256, 41, 9], list(range(20, 41))]
PARAMS = {"max_new_tokens": 8, "temperature": 0, "ignore_eos": True, "return_logprob": True}


def _run(path: str, **kw) -> tuple[list[dict], dict]:
    from disagg.common.engine.offline import Engine

    # the shared MLP kept as its own FP8 linears in every run here: fused into the FP8 expert stack
    # it would skip the activations' FP8 quantization that the dequantized-experts run still does
    # (test_common_deepseek.py tests the fusion against transformers)
    kw.setdefault("disable_shared_experts_fusion", True)
    engine = Engine(model_path=path, page_size=4, max_total_tokens=512, **kw)
    try:
        model = engine.scheduler.runner.model
        dtypes = {n: p.dtype for n, p in model.named_parameters() if ".experts." in n}
        return engine.generate(PROMPTS, PARAMS), dtypes
    finally:
        engine.shutdown()


@pytest.fixture(scope="module")
def dequantized_experts(fp8_deepseek):  # noqa: F811 - the imported fixture
    """The FP8 checkpoint with FP8 linears (DISAGG_FP8_GEMM=torch) but experts dequantized at load."""
    from disagg.common.models import moe

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DISAGG_FP8_GEMM", "torch")
        mp.setattr(moe.Experts, "quantize", lambda self, block, backend: None)
        outs, dtypes = _run(fp8_deepseek[0])
    assert dtypes["layers.1.mlp.experts.w13"] == torch.float32
    return outs


def _assert_same(outs: list[dict], want: list[dict]) -> None:
    for got, ref in zip(outs, want, strict=True):
        assert got["output_ids"] == ref["output_ids"]
        # the experts' values are the checkpoint's either way: only summation order differs
        lp, ref_lp = got["meta_info"]["output_logprobs"], ref["meta_info"]["output_logprobs"]
        assert max(abs(a - b) for a, b in zip(lp, ref_lp, strict=True)) < 1e-4


def test_fp8_experts_give_the_dequantized_experts_tokens(fp8_deepseek, dequantized_experts, monkeypatch):  # noqa: F811
    """DISAGG_FP8_GEMM=torch: the routed experts load as float8_e4m3fn + one scale per 16x16 block
    (the checkpoint's own grid, so the values are the checkpoint's) and the torch path dequantizes
    each routed expert per block: the dequantized experts' tokens and logprobs, and the first greedy
    tokens of transformers on the dequantized checkpoint (float32)."""
    monkeypatch.setenv("DISAGG_FP8_GEMM", "torch")
    outs, dtypes = _run(fp8_deepseek[0])
    assert dtypes["layers.1.mlp.experts.w13"] == torch.float8_e4m3fn
    assert dtypes["layers.1.mlp.experts.w2"] == torch.float8_e4m3fn
    assert dtypes["layers.1.mlp.experts.w13_scale_inv"] == torch.float32
    _assert_same(outs, dequantized_experts)
    # NOTE: the FP8 linears quantize activations, so only the first tokens are held to transformers
    # (as test_common_deepseek's FP8 GEMM test does)
    assert outs[0]["output_ids"][:4] == hf_greedy(fp8_deepseek[1], PROMPTS[0], 4)


def test_eplb_moves_fp8_experts_with_their_scales(fp8_deepseek, dequantized_experts, tmp_path, monkeypatch):  # noqa: F811
    """Two redundant slots placed from a skewed load and re-placed every 3 steps: each slot gets an
    expert's FP8 weights and its scales (a slot with another expert's scales changes the tokens)."""
    from disagg.common.models.eplb import save_expert_load

    monkeypatch.setenv("DISAGG_FP8_GEMM", "torch")
    skew = [900, 1, 1, 1, 1, 1, 1, 1]
    save_expert_load(tmp_path / "load.json", {1: skew, 2: skew[::-1]})
    outs, dtypes = _run(fp8_deepseek[0], ep_num_redundant_experts=2, init_expert_location=str(tmp_path / "load.json"),
                        eplb_rebalance_num_iterations=3)  # fmt: skip
    assert dtypes["layers.1.mlp.experts.w13"] == torch.float8_e4m3fn
    _assert_same(outs, dequantized_experts)


@pytest.mark.slow
def test_fp8_experts_at_tp2_ep2(fp8_deepseek, dequantized_experts, monkeypatch):  # noqa: F811
    """--tp 2 --ep 2: each rank keeps its four experts in FP8 blocks; the tp1 dequantized tokens."""
    monkeypatch.setenv("DISAGG_FP8_GEMM", "torch")
    outs, _ = _run(fp8_deepseek[0], tp=2, ep=2)
    assert [o["output_ids"] for o in outs] == [o["output_ids"] for o in dequantized_experts]


@pytest.mark.parametrize(
    "fp8, wide_k, split", [(True, False, 1), (True, True, 4), (False, False, 1), (False, False, 2)]
)
def test_gemv_kernels_compile_for_hopper(fp8, wide_k, split):
    """The batch-1 GEMVs compiled for sm_90 on this CPU machine (the interpreter skips the compiler's
    checks), the down GEMV with K tiles wider than a scale block as V3's shape runs it (its slots in
    one program, or split over several writing float32, with its intermediate too), the gate/up GEMV both ways (one scale a tile
    row; FP8_WIDE_K: 512-wide tiles, a scale an element)."""
    pytest.importorskip("triton")
    from disagg.common.models.fused_moe import _down_gemv, _gate_up_gemv

    from tests.conftest import compile_for_hopper

    w = "*fp8e4nv" if fp8 else "*bf16"
    common = {"ids": "*i32", "scale": "*fp32"}
    compile_for_hopper(
        _gate_up_gemv,
        {"x": "*bf16", "w13": w, "gate_up": "*fp32", **common},
        dict(
            BLOCK_N=16,
            BLOCK_K=512 if wide_k else 128 if fp8 else 256,
            K_PER_SPLIT=1024,
            SPLIT_K=8,
            FP8=fp8,
            WIDE_K=wide_k,
            ACT=False,
        ),  # fmt: skip
    )
    # one split: the activation silu(gate) * up stored, not gate | up (ACT), and read so by the down GEMV
    compile_for_hopper(
        _gate_up_gemv,
        {"x": "*bf16", "w13": w, "gate_up": "*fp32", **common},
        dict(
            BLOCK_N=16,
            BLOCK_K=128 if fp8 else 256,
            K_PER_SPLIT=2048,
            SPLIT_K=1,
            FP8=fp8,
            WIDE_K=False,
            ACT=True,
        ),
    )
    compile_for_hopper(
        _down_gemv,
        {
            "gate_up": "*fp32",
            "w2": w,
            "out": "*bf16" if split == 1 else "*fp32",
            "weights": "*fp32",
            **common,
        },
        # split 2: the intermediate over two programs as well (DOWN_SPLIT_K)
        dict(BLOCK_N=8, BLOCK_K=512, SLOTS=8 // split, ROWS=split * (2 if split == 2 else 1),
             K_SPLIT=2 if split == 2 else 1, K_PER_SPLIT=1024 if split == 2 else 2048, FP8=fp8, ACT=split == 1),
    )  # fmt: skip
