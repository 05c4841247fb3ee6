"""MLA's steps between its projections and the attention kernel in one Triton launch.

Unfused, an MLA layer (deepseek.MLAttention) runs after its q and kv_a projections: the latent's
RMSNorm (FlashInfer's at one token; torch's ~6 element-wise kernels over the strided view of a batch),
for DeepSeek's interleaved RoPE pairs two concatenations that de-interleave q_pe and k_pe, the copies
that make them contiguous, RoPE, the concatenation of the normalised latent with the rotated shared
key, the row arithmetic of the new tokens' slots and the `index_copy_` into the pool: 8-12 launches a
layer, ~2 µs each at decode sizes, 61 layers in V3. `fused_mla_rope` does all of it in one,
CUDA-graph capturable (no host sync; the grid depends on the token count only).

One program per (token, block of heads): q heads write their rotated rope part into a fresh
contiguous [T, H, rope] tensor (what the MLA kernels read beside the absorbed nope part); the last
program of each token normalises its kv_lora_rank latent values and rotates its shared key, and
writes both into the token's row of the layer's latent pages. Interleaved checkpoints (V2, V3's
`rope_interleave`) are read pair by pair (2i, 2i + 1) and written de-interleaved (i, i + rope/2), the
layout `deinterleave` gives the torch path, so both paths fill the pool alike and PD peers
agree whichever path each runs.

`mla_rope_reference` is the torch path (fused_rope_kv's reference arithmetic), the tests' and the
start-up check's reference. On the CPU the model keeps its torch ops, except under Triton's
interpreter (TRITON_INTERPRET=1, tests).
"""

from __future__ import annotations

import functools

import torch
from disagg.common.models.fused_rope_kv import (
    check_randn,
    close_enough,
    kernel_may_run,
    rms_norm_reference,
    rotate_reference,
    start_up_check,
)
from disagg.common.models.pdl import pdl_args, pdl_begin

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU image: the model's torch ops run instead
    triton = None


def fused_mla_rope(
    positions: torch.Tensor,  # [T] int64
    q: torch.Tensor,  # [T, H, nope + rope], may be a strided view (last dim contiguous)
    kv_a: torch.Tensor,  # [T, rank + rope]: the kv_a projection (c_kv | k_pe), rows may be strided
    norm_weight: torch.Tensor,  # [rank]: kv_a_layernorm's weight
    eps: float,
    pages: torch.Tensor,  # [num_pages, page_size, rank + rope]: deepseek.latent_pages, contiguous
    out_page: torch.Tensor,  # [T] int64: page of each new token's latent
    out_offset: torch.Tensor,  # [T] int64: its slot in the page
    cos_sin: torch.Tensor,  # [max_pos, rope] float32: cos | sin (layers.RotaryEmbedding.table())
    interleaved: bool,
    block_h: int | None = None,
) -> torch.Tensor:
    """Write each token's latent (normalised c_kv | rotated k_pe) into its page slot; return the
    rotated q_pe, a new contiguous [T, H, rope] tensor. `block_h`: q heads a program (default: by
    the batch's size)."""
    num_tokens, num_heads, qk_dim = q.shape
    rope = cos_sin.shape[1]
    rank = kv_a.shape[1] - rope
    assert pages.is_contiguous() and pages.shape[-1] == rank + rope and q.stride(-1) == kv_a.stride(-1) == 1
    q_pe = torch.empty(num_tokens, num_heads, rope, dtype=q.dtype, device=q.device)
    if num_tokens == 0:  # an idle DP-attention rank: a grid of 0 programs fails to launch
        return q_pe
    block_h = block_h or (1 if num_tokens * num_heads <= 16384 else 4)
    q_blocks = triton.cdiv(num_heads, block_h)
    _mla_rope_kernel[(num_tokens, q_blocks + 1)](
        q, kv_a, norm_weight, eps, q_pe, pages, positions, out_page, out_offset, cos_sin,
        q.stride(0), q.stride(1), kv_a.stride(0), pages.shape[1], cos_sin.stride(0), num_heads, q_blocks,
        NOPE=qk_dim - rope, RANK=rank, RANK_POW2=triton.next_power_of_2(rank), HALF=rope // 2,
        HALF_POW2=triton.next_power_of_2(rope // 2), BLOCK_H=block_h, INTERLEAVED=interleaved,
        num_warps=4 if block_h > 1 else 2, **pdl_args(q.device),
    )  # fmt: skip
    return q_pe


def mla_rope_reference(
    positions: torch.Tensor,
    q: torch.Tensor,
    kv_a: torch.Tensor,
    norm_weight: torch.Tensor,
    eps: float,
    pages: torch.Tensor,
    out_page: torch.Tensor,
    out_offset: torch.Tensor,
    cos_sin: torch.Tensor,
    interleaved: bool,
) -> torch.Tensor:
    """fused_mla_rope in torch ops: the model's unfused steps with torch's arithmetic."""
    rope = cos_sin.shape[1]
    rank = kv_a.shape[1] - rope
    q_pe, k_pe = q[..., q.shape[-1] - rope :], kv_a[:, rank:]
    if interleaved:
        q_pe, k_pe = deinterleave(q_pe), deinterleave(k_pe)
    half = rope // 2
    cos, sin = cos_sin[positions, :half].unsqueeze(1), cos_sin[positions, half:].unsqueeze(1)
    q_pe = rotate_reference(q_pe, cos, sin, True)
    k_pe = rotate_reference(k_pe.unsqueeze(1), cos, sin, True).squeeze(1)
    c_kv = rms_norm_reference(kv_a[:, :rank], norm_weight, eps)
    rows = out_page * pages.shape[1] + out_offset
    pages.view(-1, rank + rope).index_copy_(0, rows, torch.cat((c_kv, k_pe), -1).to(pages.dtype))
    return q_pe.contiguous()


def deinterleave(x: torch.Tensor) -> torch.Tensor:
    """(x0, x1, x2, x3, ...) -> (x0, x2, ..., x1, x3, ...): DeepSeek rotates interleaved pairs; after
    this permutation the rotate-half RoPE gives the same rotation (q and k share the layout, so
    their dot products are unchanged)."""
    return torch.cat((x[..., 0::2], x[..., 1::2]), dim=-1)


@functools.cache
def fused_mla_rope_ok(
    device: torch.device,
    dtype: torch.dtype,
    num_heads: int,
    nope: int,
    rope: int,
    rank: int,
    interleaved: bool,
) -> bool:
    """Whether MLA layers of this shape use fused_mla_rope: on CUDA in bf16/fp16 (float32 keeps the
    torch ops, which match transformers bit for bit) and under Triton's interpreter, not with
    DISAGG_FUSED_KERNELS=0, and only where the kernel gives the torch path's q_pe and pool and
    nothing else. Checked once per shape when a layer is built (never inside a graph capture); a
    failure or a mismatch keeps the torch ops, logged: a kernel bug costs speed, not tokens."""
    if rope % 2 or not kernel_may_run(device, dtype):
        return False
    shape = (num_heads, nope, rope, rank, interleaved)
    check = functools.partial(_agrees_with_reference, device, dtype, *shape)
    return start_up_check("fused_mla_rope", "heads, nope, rope, rank, interleaved", shape, check)


def _agrees_with_reference(
    device, dtype, num_heads: int, nope: int, rope: int, rank: int, interleaved: bool
) -> bool:
    """A batch at scattered positions and slots (page size 4), both paths on copies of the same
    inputs, each launch shape once; the whole pool compared, so a stray write fails the check too.
    NOTE: this also compiles every variant the engine launches for this shape."""
    t, num_pages, page_size = 7, 8, 4
    g = torch.Generator(device=device).manual_seed(0)
    randn = check_randn(g, dtype)
    q = randn(t, num_heads, nope + rope + 8)[..., : nope + rope]  # strided, as a view of a projection
    kv_a = randn(t, rank + rope)
    positions = torch.tensor([0, 5, 1, 63, 17, 2, 40], device=device, dtype=torch.int64)
    slots = torch.randperm(num_pages * page_size, generator=g, device=device)[:t]  # NOTE: distinct slots
    out_page, out_offset = slots // page_size, slots % page_size
    inv_freq = torch.rand(rope // 2, generator=g, device=device, dtype=torch.float32)
    freqs = torch.outer(torch.arange(64, device=device, dtype=torch.float32), inv_freq)
    cos_sin = torch.cat([freqs.cos(), freqs.sin()], -1)
    weight, pool = randn(rank), randn(num_pages, page_size, rank + rope)

    def run(fn, **kw):
        pages = pool.clone()
        return fn(
            positions, q, kv_a, weight, 1e-6, pages, out_page, out_offset, cos_sin, interleaved, **kw
        ), pages

    want = run(mla_rope_reference)
    for block_h in (1, 4):
        got = run(fused_mla_rope, block_h=block_h)
        if not all(close_enough(a, b) for a, b in zip(got, want, strict=True)):
            return False
    return True


if triton is not None:

    @triton.jit(do_not_specialize=["page_size"])
    def _mla_rope_kernel(
        q, kv_a, norm_w, eps, q_pe, pages, positions, out_page, out_offset, cos_sin,
        stride_qt, stride_qh, stride_kv, page_size, stride_cs, num_heads, q_blocks,
        NOPE: tl.constexpr, RANK: tl.constexpr, RANK_POW2: tl.constexpr, HALF: tl.constexpr,
        HALF_POW2: tl.constexpr, BLOCK_H: tl.constexpr, INTERLEAVED: tl.constexpr, PDL: tl.constexpr,
    ):  # fmt: skip
        """Program (t, b): q heads b * BLOCK_H... (b < q_blocks), else token t's latent."""
        pdl_begin(PDL)  # first: before any load or store (pdl.py)
        t = tl.program_id(0).to(tl.int64)
        b = tl.program_id(1)
        i = tl.arange(0, HALF_POW2)
        lanes = i < HALF
        # read: the checkpoint's pairs (neighbours if interleaved, else halves); write: halves
        lo = 2 * i if INTERLEAVED else i
        hi = 2 * i + 1 if INTERLEAVED else i + HALF
        cs = cos_sin + tl.load(positions + t) * stride_cs
        cos = tl.load(cs + i, mask=lanes, other=0.0)
        sin = tl.load(cs + HALF + i, mask=lanes, other=0.0)
        if b < q_blocks:
            heads = b * BLOCK_H + tl.arange(0, BLOCK_H)
            mask = (heads < num_heads)[:, None] & lanes[None, :]
            q_src = q + t * stride_qt + heads[:, None] * stride_qh + NOPE
            x1 = tl.load(q_src + lo[None, :], mask=mask, other=0.0).to(tl.float32)
            x2 = tl.load(q_src + hi[None, :], mask=mask, other=0.0).to(tl.float32)
            dst = q_pe + t * (num_heads * 2 * HALF) + heads[:, None] * (2 * HALF) + i[None, :]
            out_dtype = q_pe.dtype.element_ty
            tl.store(dst, (x1 * cos[None, :] - x2 * sin[None, :]).to(out_dtype), mask=mask)
            tl.store(dst + HALF, (x2 * cos[None, :] + x1 * sin[None, :]).to(out_dtype), mask=mask)
        else:
            row = pages + (tl.load(out_page + t) * page_size + tl.load(out_offset + t)) * (RANK + 2 * HALF)
            pool_dtype = pages.dtype.element_ty
            # the latent: torch's RMSNorm arithmetic (float32 norm, rounded, times the weight, rounded)
            r = tl.arange(0, RANK_POW2)
            c = tl.load(kv_a + t * stride_kv + r, mask=r < RANK, other=0.0)
            dtype = c.dtype
            cf = c.to(tl.float32)
            rstd = tl.rsqrt(tl.sum(cf * cf, axis=0) / RANK + eps)
            w = tl.load(norm_w + r, mask=r < RANK, other=0.0).to(tl.float32)
            c = ((cf * rstd).to(dtype).to(tl.float32) * w).to(dtype)
            tl.store(row + r, c.to(pool_dtype), mask=r < RANK)
            # the shared key
            # NOTE: names apart from the q branch's: Triton types a name once across both branches
            k_src = kv_a + t * stride_kv + RANK
            k1 = tl.load(k_src + lo, mask=lanes, other=0.0).to(tl.float32)
            k2 = tl.load(k_src + hi, mask=lanes, other=0.0).to(tl.float32)
            tl.store(row + RANK + i, (k1 * cos - k2 * sin).to(dtype).to(pool_dtype), mask=lanes)
            tl.store(row + RANK + HALF + i, (k2 * cos + k1 * sin).to(dtype).to(pool_dtype), mask=lanes)
