"""A MoE layer's unsummed partial rows (fused_moe.PartialRows) summed by the next RMSNorm's launch
(fused_moe.sum_add_rms_norm, DISAGG_MOE_SUM_IN_NORM=1): under Triton's interpreter on this CPU the
kernel gives the two-launch arithmetic (the rows summed in float32 and stored in the model dtype,
then FlashInfer's fused add + RMSNorm: the residual updated in place, the norm of the float32 sum),
through RMSNorm's entry point too; it compiles for sm_90 with its PDL wait first; on a GPU it equals
FlashInfer's fused_add_rmsnorm after the summing launch, and the switch is read as documented."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from tests.conftest import compile_for_hopper

CHECK = textwrap.dedent(
    """
    import torch
    from disagg.common.models.fused_moe import PartialRows, sum_add_rms_norm
    from disagg.common.models.layers import RMSNorm

    def reference(rows, terms, residual, weight, eps):
        delta = rows.view(-1, terms, rows.shape[1]).sum(1).to(residual.dtype)  # the summing launch's output
        x = delta.float() + residual.float()
        return (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight.float()).to(residual.dtype), x

    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        for tokens, terms, hidden in ((1, 4, 256), (3, 1, 200), (2, 3, 1000)):
            rows = torch.randn(tokens * terms, hidden)
            residual = torch.randn(tokens, hidden).to(dtype)
            weight = (1 + torch.randn(hidden) / 4).to(dtype)
            want, x = reference(rows, terms, residual, weight, 1e-6)
            res = residual.clone()
            out, res2 = sum_add_rms_norm(PartialRows(rows, terms, dtype), res, weight, 1e-6)
            assert res2 is res and out.dtype == dtype and out.shape == (tokens, hidden)
            tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)  # one bf16 step: sums in another order
            torch.testing.assert_close(res.float(), x.to(dtype).float(), **tol)  # residual += the sum
            torch.testing.assert_close(out.float(), want.float(), **tol)
            # RMSNorm's entry point: partial rows take the fused launch, a tensor the unfused path
            norm = RMSNorm(hidden, 1e-6).to(dtype)
            norm.weight.data.copy_(weight)
            got, _ = norm(PartialRows(rows, terms, dtype), residual.clone())
            plain, _ = norm(rows.view(tokens, terms, hidden).sum(1).to(dtype), residual.clone())
            torch.testing.assert_close(got.float(), plain.float(), **tol)
            summed = rows.view(tokens, terms, hidden).sum(1).to(dtype)
            torch.testing.assert_close(PartialRows(rows, terms, dtype).sum(), summed, **tol)
    print("ok")
    """
)


def test_kernel_equals_the_two_launches_under_the_interpreter():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-3000:]


def test_kernel_compiles_for_hopper():
    pytest.importorskip("triton")
    from disagg.common.models import fused_moe

    types = {"y": "*fp32", "residual": "*bf16", "weight": "*bf16", "out": "*bf16", "eps": "fp32"}
    compile_for_hopper(fused_moe._sum_add_norm_kernel, types, dict(K=4, BLOCK=2048))


def test_switch(monkeypatch):
    from disagg.common.config import moe_sum_in_norm

    monkeypatch.delenv("DISAGG_MOE_SUM_IN_NORM", raising=False)
    assert moe_sum_in_norm() is False
    monkeypatch.setenv("DISAGG_MOE_SUM_IN_NORM", "1")
    assert moe_sum_in_norm() is True
    monkeypatch.setenv("DISAGG_MOE_SUM_IN_NORM", "yes")
    with pytest.raises(ValueError, match="expected 0 or 1"):
        moe_sum_in_norm()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_equals_flashinfer_after_the_summing_launch():
    pytest.importorskip("flashinfer")
    from disagg.common.models.fused_moe import PartialRows, sum_add_rms_norm
    from disagg.common.models.kernels import add_rms_norm

    gen = torch.Generator(device="cuda").manual_seed(0)
    for tokens, terms, hidden in ((1, 4, 2048), (4, 2, 7168)):
        parts = PartialRows(
            torch.randn(tokens * terms, hidden, device="cuda", generator=gen), terms, torch.bfloat16
        )
        residual = torch.randn(tokens, hidden, device="cuda", generator=gen).bfloat16()
        weight = torch.rand(hidden, device="cuda", generator=gen).bfloat16() + 0.5
        want, want_res = add_rms_norm(parts.sum(), residual.clone(), weight, 1e-6)
        got, got_res = sum_add_rms_norm(parts, residual.clone(), weight, 1e-6)
        torch.testing.assert_close(got_res, want_res, rtol=0, atol=0)
        torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2)
