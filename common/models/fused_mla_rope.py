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
    w_uk: torch.Tensor | None = None,  # [H, nope, rank] (rank contiguous): W_UK, kv_b_proj's view
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Write each token's latent (normalised c_kv | rotated k_pe) into its page slot; return the
    rotated q_pe, a new contiguous [T, H, rope] tensor. `block_h`: q heads a program (default: by
    the batch's size). With `w_uk` (decode batches of at most UK_MAX_TOKENS, the absorbed form) more
    programs of the same launch absorb the queries too, q_lat[t, h] = q_nope[t, h] @ w_uk[h] (the
    batched GEMV's launch saved): returns (q_pe, q_lat [T, H, rank])."""
    num_tokens, num_heads, qk_dim = q.shape
    rope = cos_sin.shape[1]
    rank, nope = kv_a.shape[1] - rope, qk_dim - rope
    assert pages.is_contiguous() and pages.shape[-1] == rank + rope and q.stride(-1) == kv_a.stride(-1) == 1
    q_pe = torch.empty(num_tokens, num_heads, rope, dtype=q.dtype, device=q.device)
    q_lat, uk_programs, block_r = None, 0, min(rank, UK_BLOCK_R)
    if w_uk is not None:
        assert w_uk.shape == (num_heads, nope, rank) and w_uk.stride(2) == 1 and w_uk.dtype == q.dtype
        assert nope & (nope - 1) == 0 and rank % block_r == 0, f"nope {nope}, rank {rank}"
        q_lat = torch.empty(num_tokens, num_heads, rank, dtype=q.dtype, device=q.device)
        uk_programs = num_heads * (rank // block_r)
    if num_tokens == 0:  # an idle DP-attention rank: a grid of 0 programs fails to launch
        return q_pe if w_uk is None else (q_pe, q_lat)
    block_h = block_h or (1 if num_tokens * num_heads <= 16384 else 4)
    q_blocks = triton.cdiv(num_heads, block_h)
    uk = (w_uk, q_lat, w_uk.stride(0), w_uk.stride(1)) if w_uk is not None else (q, q_pe, 0, 0)
    _mla_rope_kernel[(num_tokens, q_blocks + 1 + uk_programs)](
        q, kv_a, norm_weight, eps, q_pe, pages, positions, out_page, out_offset, cos_sin, *uk,
        q.stride(0), q.stride(1), kv_a.stride(0), pages.shape[1], cos_sin.stride(0), num_heads, q_blocks,
        NOPE=nope, RANK=rank, RANK_POW2=triton.next_power_of_2(rank), HALF=rope // 2,
        HALF_POW2=triton.next_power_of_2(rope // 2), BLOCK_H=block_h, INTERLEAVED=interleaved,
        FUSE_UK=w_uk is not None, BLOCK_R=block_r, BLOCK_D=min(nope, 32),
        num_warps=4 if block_h > 1 or w_uk is not None else 2, **pdl_args(q.device),
    )  # fmt: skip
    return q_pe if w_uk is None else (q_pe, q_lat)


UK_MAX_TOKENS = 4  # fused_mla_rope's W_UK programs: decode batches up to this (each token reads W_UK)
UK_BLOCK_R = 64  # latent columns a W_UK program (V2-Lite at one token: 16 heads x 8 programs)


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
    fuse_uk: bool = False,
) -> bool:
    """Whether MLA layers of this shape use fused_mla_rope (`fuse_uk`: with its W_UK programs): on CUDA in bf16/fp16 (float32 keeps the
    torch ops, which match transformers bit for bit) and under Triton's interpreter, not with
    DISAGG_FUSED_KERNELS=0, and only where the kernel gives the torch path's q_pe and pool and
    nothing else. Checked once per shape when a layer is built (never inside a graph capture); a
    failure or a mismatch keeps the torch ops, logged: a kernel bug costs speed, not tokens."""
    if rope % 2 or not kernel_may_run(device, dtype):
        return False
    if fuse_uk and (nope & (nope - 1) or rank % min(rank, UK_BLOCK_R)):
        return False
    shape = (num_heads, nope, rope, rank, interleaved, fuse_uk)
    check = functools.partial(_agrees_with_reference, device, dtype, *shape)
    return start_up_check("fused_mla_rope", "heads, nope, rope, rank, interleaved, fuse_uk", shape, check)


def _agrees_with_reference(
    device, dtype, num_heads: int, nope: int, rope: int, rank: int, interleaved: bool, fuse_uk: bool = False
) -> bool:
    """A batch at scattered positions and slots (page size 4), both paths on copies of the same
    inputs, each launch shape once; the whole pool compared, so a stray write fails the check too.
    `fuse_uk`: the W_UK programs too (UK_MAX_TOKENS tokens; q_lat against q_nope @ W_UK rounded once).
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
    if not fuse_uk:
        return True
    kv_b = randn(num_heads, nope + 8, rank) * nope**-0.5
    w_uk = kv_b[:, :nope]  # a view with strided heads, as deepseek.MLAttention._kv_b_weights gives
    n = UK_MAX_TOKENS
    pages = pool.clone()
    (q_pe, q_lat), pages = fused_mla_rope(
        positions[:n], q[:n], kv_a[:n], weight, 1e-6, pages, out_page[:n], out_offset[:n], cos_sin, interleaved,
        w_uk=w_uk,
    ), pages  # fmt: skip
    pages_want = pool.clone()
    q_pe_want = mla_rope_reference(
        positions[:n], q[:n], kv_a[:n], weight, 1e-6, pages_want, out_page[:n], out_offset[:n], cos_sin, interleaved
    )  # fmt: skip
    q_lat_want = torch.einsum("thd,hdr->thr", q[:n, :, :nope].float(), w_uk.float()).to(dtype)
    return all(close_enough(a, b) for a, b in ((q_pe, q_pe_want), (pages, pages_want), (q_lat, q_lat_want)))


if triton is not None:

    @triton.jit(do_not_specialize=["page_size"])
    def _mla_rope_kernel(
        q, kv_a, norm_w, eps, q_pe, pages, positions, out_page, out_offset, cos_sin,
        w_uk, q_lat, stride_wh, stride_wd,
        stride_qt, stride_qh, stride_kv, page_size, stride_cs, num_heads, q_blocks,
        NOPE: tl.constexpr, RANK: tl.constexpr, RANK_POW2: tl.constexpr, HALF: tl.constexpr,
        HALF_POW2: tl.constexpr, BLOCK_H: tl.constexpr, INTERLEAVED: tl.constexpr,
        FUSE_UK: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, PDL: tl.constexpr,
    ):  # fmt: skip
        """Program (t, b): q heads b * BLOCK_H... (b < q_blocks), token t's latent (b == q_blocks),
        else (FUSE_UK) head h's absorbed query columns, BLOCK_R of them: q_nope[t, h] @ w_uk[h]."""
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
        elif b == q_blocks:
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
        elif FUSE_UK:
            R_BLOCKS: tl.constexpr = RANK // BLOCK_R
            j = b - q_blocks - 1
            h = j // R_BLOCKS
            cols = (j % R_BLOCKS) * BLOCK_R + tl.arange(0, BLOCK_R)
            acc = tl.zeros([BLOCK_R], tl.float32)
            for d0 in range(0, NOPE, BLOCK_D):
                dd = d0 + tl.arange(0, BLOCK_D)
                qn = tl.load(q + t * stride_qt + h * stride_qh + dd).to(tl.float32)
                wk = tl.load(w_uk + h * stride_wh + dd[:, None] * stride_wd + cols[None, :])
                acc += tl.sum(qn[:, None] * wk.to(tl.float32), 0)
            tl.store(q_lat + (t * num_heads + h) * RANK + cols, acc.to(q_lat.dtype.element_ty))
