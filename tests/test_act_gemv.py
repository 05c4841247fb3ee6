"""SiLU·mul folded into the down projection's GEMV (common/models/act_gemv.py): under Triton's CPU
interpreter the kernel gives the torch path's output (1, 3 and 8 tokens, K and N off the tiles,
strided gate_up rows, float32 and bf16, FMA and tensor-core layouts); its reference is
kernels.silu_and_mul's torch path then the linear; the start-up check refuses a kernel that
disagrees; the kernel compiles for sm_90 with PDL; a tiny DeepSeek-V3 with DISAGG_NORM_GEMV=1 (its
dense first layer and shared experts fused) gives transformers' float32 tokens. The tiny Llama's
and Qwen2's, with it in every MLP: tests/test_norm_gemv.py."""

from __future__ import annotations

import json
import textwrap

import pytest
import torch
import torch.nn.functional as F
from disagg.common.models.act_gemv import silu_mul_gemv_reference
from disagg.common.models.kernels import fused_kernels, silu_and_mul

from tests.conftest import compile_for_hopper, hf_greedy
from tests.test_common_deepseek import make_tiny_deepseek
from tests.test_fused_rope_kv import PROMPTS, _interpret

pytest.importorskip("triton")
interpreted = pytest.mark.skipif(
    torch.cuda.is_available(), reason="the start-up check and the GPU benchmark run the compiled kernel"
)


@interpreted
def test_interpreted_kernel_matches_the_torch_path():
    """K (the intermediate size) 200 with 64-wide K tiles and N 70 with 32- and 16-row tiles: the
    masked lanes of both; the default layouts at 1 and 8 tokens (FMA, then a tensor-core dot with
    the token rows padded to 16)."""
    out = _interpret(
        textwrap.dedent(
            """
            import torch
            from disagg.common.models import act_gemv as ag

            def case(t, n, k, dtype, launch=None):
                g = torch.Generator().manual_seed(t * 31 + n + k)
                gate_up = (torch.randn(t, 2 * k + 6, generator=g) * 2).to(dtype)[:, : 2 * k]  # strided rows
                w = (torch.randn(n, k, generator=g) * k**-0.5).to(dtype)
                out = ag.silu_mul_gemv(gate_up, w, launch=launch)
                want = ag.silu_mul_gemv_reference(gate_up, w)
                assert out.shape == (t, n) and out.dtype == dtype
                if t == 0:
                    return print("case passed", t)
                # float32: the same arithmetic up to summation order (and exp's last bits). bf16: a few
                # ulps of the largest value (NOTE: the interpreter truncates float32 -> bf16 where the
                # GPU rounds to nearest: the roundings themselves are the GPU test's check)
                tol = (1e-5 if dtype == torch.float32 else 1 / 32) * want.abs().max().item()
                torch.testing.assert_close(out, want, atol=tol, rtol=0)
                print("case passed", t, n, k, dtype, launch)

            f32, bf16 = torch.float32, torch.bfloat16
            for t in (1, 3, 8):
                for dtype in (f32, bf16):
                    case(t, 70, 200, dtype, launch=(32, 64, 4, False))
                    case(t, 70, 200, dtype, launch=(16, 64, 4, True))
                case(t, 48, 96, bf16)  # the default layouts
            case(0, 48, 96, f32)  # an idle DP-attention rank: no launch
            """
        )
    )
    assert out.count("case passed") == 16


def test_reference_is_the_mlps_unfused_arithmetic():
    """silu_mul_gemv_reference (the start-up check's and tests' reference) = kernels.silu_and_mul's
    torch path, then the linear; in bf16 silu rounds once, then the product (two roundings)."""
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        gate_up, w = (torch.randn(*shape, generator=g).to(dtype) for shape in ((3, 64), (20, 32)))
        with fused_kernels(False):
            assert torch.equal(silu_mul_gemv_reference(gate_up, w), F.linear(silu_and_mul(gate_up), w))
    gate, up = gate_up.float().chunk(2, dim=-1)
    silu = (gate / (1 + torch.exp(-gate))).bfloat16()
    assert torch.equal(F.silu(gate_up[:, :32]) * gate_up[:, 32:], (silu.float() * up).bfloat16())


@interpreted
def test_start_up_check_refuses_a_kernel_that_disagrees():
    """A kernel that swaps gate and up is refused (the layers keep the torch ops, logged); without
    DISAGG_NORM_GEMV=1, or with DISAGG_FUSED_KERNELS=0, the kernel is off; the real one passes."""
    out = _interpret(
        textwrap.dedent(
            """
            import os, torch
            from disagg.common.models import act_gemv as ag

            cpu, real = torch.device("cpu"), ag.silu_mul_gemv
            def ok():
                ag.silu_mul_gemv_ok.cache_clear()
                return ag.silu_mul_gemv_ok(cpu, torch.float32, 40, 72)

            def swapped(gate_up, weight, launch):
                return real(torch.cat(gate_up.chunk(2, dim=-1)[::-1], dim=-1), weight, launch=launch)

            os.environ.pop("DISAGG_NORM_GEMV", None)
            assert not ok()  # off by default
            os.environ["DISAGG_NORM_GEMV"] = "1"
            assert ok()
            ag.silu_mul_gemv = swapped
            assert not ok()
            ag.silu_mul_gemv = real
            os.environ["DISAGG_FUSED_KERNELS"] = "0"
            assert not ok()
            print("refused")
            """
        )
    )
    assert "refused" in out
    assert out.count("silu_mul_gemv disagrees with torch") == 1 and "failed its start-up check" not in out


@pytest.mark.parametrize(
    ("block_t", "block_n", "block_k", "dot"),
    [(1, 16, 256, False), (2, 16, 128, False), (8, 4, 256, False), (16, 16, 128, True)],
)
def test_kernel_compiles_for_hopper(block_t, block_n, block_k, dot):
    """The compiler's checks the interpreter skips, at bf16, with PDL (its wait before the first
    memory access): the default layouts of 1, 2 and 3-8 tokens (FMA at 1 and 2, a tensor-core dot
    past) and 8 tokens' narrow FMA tiles (a small N)."""
    from disagg.common.models.act_gemv import _silu_mul_gemv_kernel

    types = dict.fromkeys(("gate_up", "weight", "out"), "*bf16")
    consts = dict(BLOCK_T=block_t, BLOCK_N=block_n, BLOCK_K=block_k, DOT=dot, INTERPRETED=False)
    compile_for_hopper(_silu_mul_gemv_kernel, types, consts)


DEEPSEEK_RUN = textwrap.dedent(
    """
    import json, os, sys
    from disagg.common.engine.offline import Engine
    from disagg.common.models import decoder

    sizes, real = set(), decoder.silu_mul_gemv  # the token counts the MLPs ran the kernel at
    decoder.silu_mul_gemv = lambda gate_up, *args: sizes.add(len(gate_up)) or real(gate_up, *args)
    os.environ["DISAGG_NORM_GEMV"] = "1"
    engine = Engine(model_path=sys.argv[1], page_size=4, max_total_tokens=512, chunked_prefill_size=8)
    model = engine.scheduler.runner.model
    mlps = [m for m in model.modules() if isinstance(m, decoder.MLP)]
    assert len(mlps) == 3 and all(m.act_gemv for m in mlps)  # layer 0's MLP, layers 1-2's shared experts
    assert all(layer.mlp_norm_gemv for layer in model.layers)  # the dense gate_up, the shared experts' gate_up
    outs = engine.generate(json.loads(sys.argv[2]), {"max_new_tokens": 6, "temperature": 0, "ignore_eos": True})
    print("tokens", json.dumps([o["output_ids"] for o in outs]))
    print("sizes", json.dumps(sorted(sizes)))
    """
)


@interpreted
def test_tiny_deepseek_with_the_kernel_gives_transformers_tokens(tmp_path):
    """DeepSeek-V3 (3 layers: a dense first layer, then MoE layers with a shared expert whose down
    projection is reduced with the routed experts' output): silu_mul_gemv in every MLP at prefill
    chunks of 8 and decode batches of 2; transformers' float32 greedy tokens."""
    path = make_tiny_deepseek(tmp_path / "v3", "v3")
    out = _interpret(DEEPSEEK_RUN, path, json.dumps(PROMPTS))
    lines = dict(s.split(" ", 1) for s in out.splitlines() if s.startswith(("tokens ", "sizes ")))
    assert json.loads(lines["tokens"]) == [hf_greedy(path, p, 6) for p in PROMPTS]
    assert {2, 8} <= set(json.loads(lines["sizes"])) and max(json.loads(lines["sizes"])) <= 8
