"""Fused element-wise kernels of the decoder: FlashInfer's on CUDA, plain torch everywhere else.

Each function has one torch reference implementation (the CPU path, bitwise equal to transformers
in float32) and, on CUDA, FlashInfer's fused kernel: one launch instead of 5–12 for RMSNorm with
its residual add, SiLU·mul and RoPE. `DISAGG_FUSED_KERNELS=0` turns the fused path off (A/B runs).

PDL (Programmatic Dependent Launch, common/models/pdl.py): FlashInfer 0.7.2's rmsnorm,
fused_add_rmsnorm and silu_and_mul launch with it already on compute capability >= 9 (their
`enable_pdl=None` default means `device_support_pdl(device)`), so they are called as they are;
apply_rope_with_cos_sin_cache_inplace takes no `enable_pdl` and its kernel always launches without.
DISAGG_PDL switches the project's Triton kernels only.
"""

from __future__ import annotations

import contextlib
import functools
import logging

import torch
import torch.nn.functional as F
from disagg.common.config import fused_kernels_enabled
from disagg.common.models.fused_rope_kv import check_randn

logger = logging.getLogger(__name__)


_enabled = fused_kernels_enabled()
_HALF = (torch.bfloat16, torch.float16)


@functools.cache
def _flashinfer():
    try:
        import flashinfer
    except ImportError:
        return None
    return flashinfer


def use_fused(x: torch.Tensor) -> bool:
    # NOTE: FlashInfer's kernels take bf16/fp16 only; float32 on CUDA keeps the torch ops
    # NOTE: and no empty batches: a kernel launched on a grid of 0 blocks fails (a prefill chunk
    # that ends no request has no logits rows)
    return _enabled and x.is_cuda and x.dtype in _HALF and x.shape[0] > 0 and _flashinfer() is not None


@contextlib.contextmanager
def fused_kernels(enabled: bool):
    """Turn the fused path on or off inside the block (reference runs, A/B benchmarks)."""
    global _enabled
    old, _enabled = _enabled, enabled
    try:
        yield
    finally:
        _enabled = old


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x: [T, H] (or [T, heads, D]); normalised over the last dim in float32, then times weight."""
    if use_fused(x) and x.is_contiguous():
        return _flashinfer().norm.rmsnorm(x, weight, eps)
    dtype = x.dtype
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(dtype)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """residual += x; returns (rms_norm(residual), residual). In place on CUDA (x and residual)."""
    if use_fused(x) and x.is_contiguous() and residual.is_contiguous():
        _flashinfer().norm.fused_add_rmsnorm(x, residual, weight, eps)
        return x, residual
    residual = residual + x
    return rms_norm(residual, weight, eps), residual


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up: [T, 2I] (gate first) -> silu(gate) * up: [T, I]."""
    if use_fused(gate_up) and gate_up.is_contiguous():
        return _flashinfer().activation.silu_and_mul(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def apply_rope(
    positions: torch.Tensor,  # [T] int64
    q: torch.Tensor,  # [T, Hq, D]
    k: torch.Tensor,  # [T, Hkv, D]
    cos: torch.Tensor,  # [max_pos, D/2] float32
    sin: torch.Tensor,
    cos_sin: torch.Tensor | None,  # [max_pos, D] float32 (cos | sin), the fused kernel's table
) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE, HF "rotate_half" convention (first half / second half), computed in float32."""
    if cos_sin is not None and use_fused(q) and q.stride(-1) == 1 and k.stride(-1) == 1:
        head_dim = q.shape[-1]
        # NOTE: in place on q and k, which may be strided views of the fused qkv projection
        _flashinfer().rope.apply_rope_with_cos_sin_cache_inplace(
            positions, q.flatten(1), k.flatten(1), head_dim, cos_sin, is_neox=True
        )
        return q, k
    c, s = cos[positions].unsqueeze(1), sin[positions].unsqueeze(1)  # [T, 1, D/2]
    return _rotate(q, c, s), _rotate(k, c, s)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    dtype = x.dtype
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(dtype)


def check_fused_kernels(device: torch.device, dtype: torch.dtype) -> bool:
    """Run each fused kernel once against the torch reference; turn the fused path off (with a
    warning) if any of them fails to build or disagrees. Called once at start-up on CUDA."""
    global _enabled
    if not _enabled or device.type != "cuda" or dtype not in _HALF or _flashinfer() is None:
        return False
    try:
        ok = _compare_fused(device, dtype)
    except Exception as e:  # a kernel that fails to JIT-compile or launch
        logger.warning("fused kernels unavailable (%s: %s): using torch ops", type(e).__name__, e)
        ok = False
    _enabled = ok
    return ok


def _compare_fused(device: torch.device, dtype: torch.dtype) -> bool:
    g = torch.Generator(device=device).manual_seed(0)
    t, h, heads, d = 5, 256, 4, 64
    randn = check_randn(g, dtype)
    x, res, w, gu = randn(t, h), randn(t, h), randn(h), randn(t, 2 * h)
    qkv = randn(t, (heads + 2 * 2) * d)
    pos = torch.tensor([0, 3, 7, 1, 30], device=device)
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2, device=device).float() / d))
    freqs = torch.outer(torch.arange(64, device=device).float(), inv)
    cos, sin = freqs.cos(), freqs.sin()

    def run(cos_sin):
        fresh = qkv.clone()  # q and k as strided views of a fused projection, as in the model
        q, k = fresh[:, : heads * d].view(t, heads, d), fresh[:, heads * d : (heads + 2) * d].view(t, 2, d)
        return [
            rms_norm(x, w, 1e-6),
            *add_rms_norm(x.clone(), res.clone(), w, 1e-6),
            silu_and_mul(gu),
            *apply_rope(pos, q, k, cos, sin, cos_sin),
        ]

    with fused_kernels(False):
        refs = run(None)
    got = run(torch.cat([cos, sin], -1))
    tol = dict(atol=0.05, rtol=0.02)
    bad = [
        i
        for i, (a, b) in enumerate(zip(got, refs, strict=True))
        if not torch.allclose(a.float(), b.float(), **tol)
    ]
    if bad:
        logger.warning("fused kernels disagree with torch (outputs %s): using torch ops", bad)
    return not bad
