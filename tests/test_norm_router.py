"""The post-attention add + RMSNorm with the MoE router's logits in one launch (common/models/norm_router.py):
in Triton's CPU interpreter it gives the normed rows, the new residual and the logits that the
separate steps give (float32 sum, the norm unrounded then rounded, the router reading the rounded
rows), for bf16 and float32 gates (Qwen3-MoE's, DeepSeek's), odd expert counts and widths that
leave programs partial shares, without touching its inputs; it compiles for sm_90 with PDL."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

CHECK = textwrap.dedent(
    """
    import torch
    from disagg.common.models.norm_router import add_rms_norm_router

    def bf16(t):
        # NOTE: Triton's interpreter rounds float32 -> bf16 toward zero (the GPU to nearest even):
        # the reference rounds as the interpreter does, so the residual can be compared exactly
        return (t.float().view(torch.int32) & ~0xFFFF).view(torch.float32).to(torch.bfloat16)

    def reference(x, residual, weight, eps, gate):
        s = x.float() + residual.float()
        normed = bf16(s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + eps) * weight.float())
        logits = torch.nn.functional.linear(normed.float(), gate.float())
        return normed, bf16(s), logits.to(gate.dtype)

    g = torch.Generator().manual_seed(0)
    # (tokens, hidden, experts, gate dtype): 2048 wide in one block at one token, in four at four;
    # 5 and 7 experts: a last program with one; 100 wide over 3-4 programs: uneven column shares
    for tokens, hidden, experts, gate_dtype in ((1, 2048, 128, torch.bfloat16), (4, 2048, 64, torch.float32),
                                                (3, 100, 5, torch.bfloat16), (2, 100, 7, torch.float32)):
        x = torch.randn(tokens, hidden, generator=g).to(torch.bfloat16)
        residual = (4 * torch.randn(tokens, hidden, generator=g)).to(torch.bfloat16)
        weight = (1 + 0.1 * torch.randn(hidden, generator=g)).to(torch.bfloat16)
        gate = (torch.randn(experts, hidden, generator=g) / hidden**0.5).to(gate_dtype)
        before = (x.clone(), residual.clone())
        got = add_rms_norm_router(x, residual, weight, 1e-6, gate)
        want = reference(x, residual, weight, 1e-6, gate)
        assert torch.equal(x, before[0]) and torch.equal(residual, before[1]), "inputs changed"
        for name, a, b in zip(("normed", "residual", "logits"), got, want):
            assert a.dtype == b.dtype and a.shape == b.shape, (name, a.dtype, b.dtype, a.shape, b.shape)
            # the residual exactly; the norm within a bf16 rounding (float32 sums in another order)
            tol = 0 if name == "residual" else 1e-2
            torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol, msg=(name, tokens, hidden))
    print("ok")
    """
)


def test_interpreted_kernel_equals_the_separate_steps():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-3000:]


@pytest.mark.parametrize("t_pow2, gate", [(1, "*bf16"), (4, "*fp32")])
def test_kernel_compiles_for_hopper(t_pow2, gate):
    pytest.importorskip("triton")
    from disagg.common.models import norm_router

    from tests.conftest import compile_for_hopper

    compile_for_hopper(
        norm_router._add_rmsnorm_router_kernel,
        {"x": "*bf16", "residual": "*bf16", "norm_w": "*bf16", "gate": gate, "normed": "*bf16",
         "res_out": "*bf16", "logits": gate, "eps": "fp32"},
        dict(T_POW2=t_pow2, BLOCK_E=2, BLOCK_H=2048 // t_pow2),
    )  # fmt: skip


def test_not_taken_off_cuda():
    # the CPU path keeps the two steps (torch's): the check says no without a GPU
    from disagg.common.models.norm_router import norm_router_ok

    assert not norm_router_ok(torch.device("cpu"), 64, 8, torch.bfloat16, torch.bfloat16)
