"""The post-attention residual add + RMSNorm and an MoE router's logits of a decode batch in one launch.

At batch 1 an MoE layer's routing starts with two small kernels back to back: the fused add +
RMSNorm (FlashInfer's, ~2.5 us) and the router's GEMV (fused_moe.router_logits, ~2.2 us), each
mostly launch and ramp on a few KB of activations. Here each program of the router's GEMV (BLOCK_E
experts a program) recomputes the norm of the batch's rows itself: a pass summing squares of x +
residual, then a pass normalising a slice at a time, writing its own share of the normed rows and
of the new residual, and accumulating its experts' dot products from the normed values rounded to
the activations' dtype (as the router would read them). No program waits for another, so the one
launch replaces two. Numerics as FlashInfer's fused_add_rmsnorm: the sum in float32, normalised
unrounded, times the weight, then rounded; the logits as router_logits computes them (float32
products of the rounded activations, stored in the gate's dtype).

Out of place (each program reads all of x and residual while others write their shares). Used by
DecoderLayer for decode batches of at most NORM_ROUTER_MAX_TOKENS tokens where `norm_router_ok`
found it equal to the two kernels on this device and shape; `DISAGG_FUSED_KERNELS=0` turns it off
with the other fused kernels, `DISAGG_NORM_ROUTER=0` alone (A/B runs).
"""

from __future__ import annotations

import functools
import logging

import torch
from disagg.common.config import norm_router_requested
from disagg.common.models.pdl import pdl_args, pdl_begin

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU image: DecoderLayer keeps the two kernels (torch's path there)
    triton = None

logger = logging.getLogger(__name__)

# tokens up to which the fused launch runs: every program re-reads the batch's rows (twice), so its
# redundant reads grow with the batch; batch 1 is the case it is for
NORM_ROUTER_MAX_TOKENS = 4
_EXPERTS_PER_PROGRAM = 2  # router_logits' layout: 64 programs for 128 experts


def add_rms_norm_router(
    x: torch.Tensor, residual: torch.Tensor, norm_weight: torch.Tensor, eps: float, gate: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual) * norm_weight, x + residual, logits = that norm @ gate^T): x and residual
    [T, H] in the model's dtype, gate [E, H]; returns new tensors (normed and residual in x's dtype,
    logits [T, E] in the gate's)."""
    num_tokens, hidden = x.shape
    num_experts = gate.shape[0]
    normed, new_residual = torch.empty_like(x), torch.empty_like(x)
    logits = torch.empty(num_tokens, num_experts, dtype=gate.dtype, device=x.device)
    t_pow2 = triton.next_power_of_2(num_tokens)
    block_h = max(64, min(triton.next_power_of_2(hidden), 2048 // t_pow2))
    programs = triton.cdiv(num_experts, _EXPERTS_PER_PROGRAM)
    _add_rmsnorm_router_kernel[(programs,)](
        x, residual, norm_weight, gate, normed, new_residual, logits,
        num_tokens, hidden, num_experts, float(eps), x.stride(0), residual.stride(0), gate.stride(0),
        triton.cdiv(hidden, programs),
        T_POW2=t_pow2, BLOCK_E=_EXPERTS_PER_PROGRAM, BLOCK_H=block_h, num_warps=4, **pdl_args(x.device),
    )  # fmt: skip
    return normed, new_residual, logits


@functools.cache
def norm_router_ok(
    device: torch.device, hidden: int, num_experts: int, dtype: torch.dtype, gate_dtype: torch.dtype
) -> bool:
    """Whether add_rms_norm_router gives what the two kernels give (kernels.add_rms_norm, then
    fused_moe.router_logits, or torch's F.linear where that is not built) on this device and shape,
    at 1 and NORM_ROUTER_MAX_TOKENS tokens: checked once per shape when a layer is built (never inside
    a graph capture); on a mismatch or an error the layer keeps the two kernels."""
    if triton is None or device.type != "cuda" or not norm_router_requested():
        return False
    from disagg.common.models.kernels import add_rms_norm

    try:
        gen = torch.Generator(device=device).manual_seed(0)

        def randn(*shape, scale=1.0):
            return torch.randn(*shape, device=device, generator=gen, dtype=torch.float32) * scale

        gate = (randn(num_experts, hidden) / hidden**0.5).to(gate_dtype)
        weight = (1 + randn(hidden, scale=0.1)).to(dtype)
        ok = True
        for tokens in (1, NORM_ROUTER_MAX_TOKENS):
            x, residual = randn(tokens, hidden).to(dtype), randn(tokens, hidden, scale=4).to(dtype)
            got = add_rms_norm_router(x, residual, weight, 1e-6, gate)
            want_norm, want_res = add_rms_norm(x.clone(), residual.clone(), weight, 1e-6)
            want_logits = torch.nn.functional.linear(want_norm.to(gate_dtype), gate)
            # one rounding of the activations' dtype apart at most (the sum's, the norm's)
            ok = ok and all(
                g.dtype == w.dtype and torch.allclose(g.float(), w.float(), rtol=1e-2, atol=1e-2)
                for g, w in zip(got, (want_norm, want_res, want_logits), strict=True)
            )
    except Exception:  # noqa: BLE001 - any failure: the two kernels, loudly
        logger.exception(
            "add_rms_norm_router failed its start-up check (H=%d, E=%d): two kernels", hidden, num_experts
        )
        return False
    if not ok:
        logger.warning(
            "add_rms_norm_router disagrees with add_rms_norm + the router (H=%d, E=%d)", hidden, num_experts
        )
    return ok


if triton is not None:

    @triton.jit
    def _add_rmsnorm_router_kernel(
        x, residual, norm_w, gate, normed, res_out, logits,
        num_tokens, hidden, num_experts, eps, x_stride, r_stride, gate_stride, share,
        T_POW2: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_H: tl.constexpr, PDL: tl.constexpr,
    ):  # fmt: skip
        """Program p: the norm of every token's x + residual (float32), its `share` columns of the
        normed rows and the new residual (columns [p * share, (p + 1) * share)), and the logits of
        experts [p * BLOCK_E, (p + 1) * BLOCK_E) for every token."""
        pdl_begin(PDL)  # first: before any load or store (pdl.py)
        pid = tl.program_id(0)
        tokens = tl.arange(0, T_POW2)
        cols = tl.arange(0, BLOCK_H)
        t_mask = tokens < num_tokens
        x_rows = x + tokens.to(tl.int64)[:, None] * x_stride
        r_rows = residual + tokens.to(tl.int64)[:, None] * r_stride
        squares = tl.zeros([T_POW2], dtype=tl.float32)
        for h0 in range(0, hidden, BLOCK_H):
            h = h0 + cols
            mask = t_mask[:, None] & (h[None, :] < hidden)
            s = tl.load(x_rows + h[None, :], mask=mask, other=0.0).to(tl.float32)
            s += tl.load(r_rows + h[None, :], mask=mask, other=0.0).to(tl.float32)
            squares += tl.sum(s * s, axis=1)
        rstd = 1.0 / tl.sqrt(squares / hidden + eps)
        experts = pid * BLOCK_E + tl.arange(0, BLOCK_E)
        e_mask = experts < num_experts
        g_rows = gate + experts.to(tl.int64)[:, None] * gate_stride
        lo = pid * share
        acc = tl.zeros([T_POW2, BLOCK_E], dtype=tl.float32)
        for h0 in range(0, hidden, BLOCK_H):
            h = h0 + cols
            h_mask = h < hidden
            mask = t_mask[:, None] & h_mask[None, :]
            s = tl.load(x_rows + h[None, :], mask=mask, other=0.0).to(tl.float32)
            s += tl.load(r_rows + h[None, :], mask=mask, other=0.0).to(tl.float32)
            w = tl.load(norm_w + h, mask=h_mask, other=0.0).to(tl.float32)
            n = (s * rstd[:, None] * w[None, :]).to(normed.dtype.element_ty)
            out = tokens.to(tl.int64)[:, None] * hidden + h[None, :]
            own = mask & (h[None, :] >= lo) & (h[None, :] < lo + share)
            tl.store(normed + out, n, mask=own)
            tl.store(res_out + out, s.to(res_out.dtype.element_ty), mask=own)
            g = tl.load(g_rows + h[None, :], mask=e_mask[:, None] & h_mask[None, :], other=0.0)
            acc += tl.sum(n.to(tl.float32)[:, None, :] * g.to(tl.float32)[None, :, :], axis=2)
        mask = t_mask[:, None] & e_mask[None, :]
        tl.store(
            logits + tokens[:, None] * num_experts + experts[None, :],
            acc.to(logits.dtype.element_ty),
            mask=mask,
        )
