"""RoPE (and Qwen3's per-head q/k RMSNorm) fused with the paged K/V write: one Triton launch per layer.

Unfused, an attention layer runs between its QKV projection and the attention kernel: RoPE on q and k
(FlashInfer), the K and V `index_copy_`s into the pool, the add that finds the V rows, the copy that
makes the strided q contiguous for attention and, for Qwen3, two RMSNorms over strided views (torch's
~8 element-wise kernels each: FlashInfer's norm takes contiguous rows only): 5 launches a layer for
Llama, ~21 for Qwen3 (at one token the views count as contiguous: 4 and 6). `fused_rope_kv` does all
of it in one, CUDA-graph capturable (no host sync; the grid depends on the batch's token count only).

One program per (token, block of heads): q heads write the rotated q into a fresh contiguous
[T, Hq, D] buffer (what attention reads); k heads write the rotated k and the untouched v into the
layer's pool rows (row `k_rows[t]` of the [num_pages * 2 * page_size] rows, V `page_size` rows
further). The cos/sin table is the model's own (layers.RotaryEmbedding: plain, Llama-3, YaRN...: the
scaling is in the table), so any rope type the model builds is covered. Both pair layouts: neox
(first half / second half, HF's rotate_half: every model decoder.py runs) and GPT-J (even / odd).

The arithmetic follows the torch path step by step (norm in float32, rounded to the model dtype,
times the weight, rounded; rotation in float32, rounded): the kernel and the torch path agree to the
last bit but for float32 rounding order. `rope_kv_reference` is that torch path, the tests' and the
start-up check's reference. On the CPU the decoder keeps its torch ops, except under Triton's
interpreter (TRITON_INTERPRET=1, tests), where the kernel runs on CPU tensors.
"""

from __future__ import annotations

import functools
import logging

import torch
from disagg.common.config import fused_kernels_enabled, triton_interpret
from disagg.common.models.pdl import pdl_args, pdl_begin

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU image: the decoder's torch ops run instead
    triton = None

logger = logging.getLogger(__name__)
_HALF = (torch.bfloat16, torch.float16)


def fused_rope_kv(
    positions: torch.Tensor,  # [T] int64
    q: torch.Tensor,  # [T, Hq, D], may be a strided view of the fused qkv projection (last dim contiguous)
    k: torch.Tensor,  # [T, Hkv, D], same
    v: torch.Tensor,  # [T, Hkv, D], same
    kv: torch.Tensor,  # [num_pages, 2, page_size, Hkv, D]: one layer's pool view, contiguous
    k_rows: torch.Tensor,  # [T] int64: row of each token's K in kv's [num_pages * 2 * page_size] rows
    cos_sin: torch.Tensor,  # [max_pos, D] float32: cos | sin (layers.RotaryEmbedding.cos_sin)
    norm: tuple[torch.Tensor, torch.Tensor, float] | None = None,  # Qwen3: (q weight [D], k weight [D], eps)
    is_neox: bool = True,
    launch: tuple[int, int] | None = None,
    rotate_k: bool = False,
) -> torch.Tensor:
    """Normalise (if `norm`) and rotate q and k, write k and v into the pool; returns the rotated q,
    a new contiguous [T, Hq, D] tensor. The rows of distinct tokens must differ (a pool slot has one
    owner); padded CUDA-graph rows that share the pad page's row write throw-away values there.
    `launch`: (heads per program, warps), one of LAUNCHES (default: by the batch's size).
    rotate_k: k itself is overwritten with the normalised, rotated K too (a fresh prompt's attention
    reads this step's K and V where they are, not the pool's pages: AttentionBackend.attends_new_kv)."""
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    assert cos_sin.shape[1] == head_dim, "rotary dim must equal head_dim (no partial rotary)"
    assert kv.is_contiguous() and q.stride(-1) == k.stride(-1) == v.stride(-1) == 1
    q_out = torch.empty(num_tokens, num_q_heads, head_dim, dtype=q.dtype, device=q.device)
    if num_tokens == 0:  # an idle DP-attention rank: a grid of 0 programs fails to launch
        return q_out
    block_h, warps = launch or launch_shape(num_tokens, num_q_heads + num_kv_heads)
    q_blocks = triton.cdiv(num_q_heads, block_h)
    q_w, k_w, eps = norm if norm is not None else (q, q, 0.0)  # unread without QK_NORM
    page_size = kv.shape[2]
    _rope_kv_kernel[(num_tokens, q_blocks + triton.cdiv(num_kv_heads, block_h))](
        q, k, v, q_out, kv, positions, k_rows, cos_sin, q_w, k_w, eps,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        kv.stride(2), kv.stride(3), page_size, cos_sin.stride(0), num_q_heads, num_kv_heads, q_blocks,
        HALF=head_dim // 2, HALF_POW2=triton.next_power_of_2(head_dim // 2), BLOCK_H=block_h,
        IS_NEOX=is_neox, QK_NORM=norm is not None, ROTATE_K=rotate_k, num_warps=warps, **pdl_args(q.device),
    )  # fmt: skip
    return q_out


# (heads per program, warps): decode sizes, prefill sizes. At 2048 Qwen3-30B-A3B tokens on an H100
# (8, 4) moved the 44 MB in 14.4 us against (4, 2)'s 23.1 ((16, 4): 15.1, (32, 8): 18.2;
# prefill_parts.py, docs/benchmarks.md, twenty-second session)
LAUNCHES = ((1, 1), (8, 4))


def launch_shape(num_tokens: int, heads: int) -> tuple[int, int]:
    """One head a program while that fills the chip (decode), eight at prefill sizes (fewer, larger
    programs)."""
    return LAUNCHES[0] if num_tokens * heads <= 16384 else LAUNCHES[1]


def rope_kv_reference(
    positions: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv: torch.Tensor,
    k_rows: torch.Tensor,
    cos_sin: torch.Tensor,
    norm: tuple[torch.Tensor, torch.Tensor, float] | None = None,
    is_neox: bool = True,
    rotate_k: bool = False,
) -> torch.Tensor:
    """fused_rope_kv in torch ops (the decoder's unfused path: kernels.rms_norm's and apply_rope's
    torch arithmetic, one index_copy_ per K and V)."""
    k_in = k
    if norm is not None:
        q, k = rms_norm_reference(q, norm[0], norm[2]), rms_norm_reference(k, norm[1], norm[2])
    half = cos_sin.shape[1] // 2
    cos, sin = cos_sin[positions, :half].unsqueeze(1), cos_sin[positions, half:].unsqueeze(1)  # [T, 1, D/2]
    q, k = rotate_reference(q, cos, sin, is_neox), rotate_reference(k, cos, sin, is_neox)
    rows = kv.view(-1, k.shape[1], k.shape[2])
    rows.index_copy_(0, k_rows, k.to(kv.dtype))
    rows.index_copy_(0, k_rows + kv.shape[2], v.to(kv.dtype))
    if rotate_k:
        k_in.copy_(k)
    return q.contiguous()


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def rotate_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, is_neox: bool) -> torch.Tensor:
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1) if is_neox else (xf[..., 0::2], xf[..., 1::2])
    o1, o2 = x1 * cos - x2 * sin, x2 * cos + x1 * sin
    out = torch.cat((o1, o2), -1) if is_neox else torch.stack((o1, o2), -1).flatten(-2)
    return out.to(x.dtype)


@functools.cache
def fused_rope_kv_ok(
    device: torch.device,
    dtype: torch.dtype,
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    qk_norm: bool,
) -> bool:
    """Whether the decoder's attention layers of this shape use fused_rope_kv: on CUDA in bf16/fp16
    (float32 keeps the torch ops, which match transformers bit for bit) and under Triton's
    interpreter, not with DISAGG_FUSED_KERNELS=0, and only where the kernel gives the torch path's
    q, pool rows and nothing else. Checked once per shape when a layer is built (never inside a
    graph capture); a failure or a mismatch keeps the torch ops, logged: a kernel bug costs speed,
    not tokens."""
    if head_dim % 2 or not kernel_may_run(device, dtype):
        return False
    shape = (num_q_heads, num_kv_heads, head_dim, qk_norm)
    check = functools.partial(_agrees_with_reference, device, dtype, *shape)
    return start_up_check("fused_rope_kv", "heads, kv heads, dim, qk norm", shape, check)


def kernel_may_run(device: torch.device, dtype: torch.dtype) -> bool:
    """Where a fused Triton kernel of these modules may replace torch ops: CUDA in bf16/fp16 (float32
    keeps the torch ops, which match transformers bit for bit) or Triton's interpreter, unless
    DISAGG_FUSED_KERNELS=0."""
    if triton is None or not fused_kernels_enabled():
        return False
    return triton_interpret() or (device.type == "cuda" and dtype in _HALF)


def start_up_check(kernel: str, fields: str, shape: tuple, agrees) -> bool:
    """Run `agrees()` (the kernel against its torch reference on one shape) and log the outcome; a
    kernel that fails to build or launch, or disagrees, is not used (False), loudly."""
    try:
        ok = agrees()
    except Exception:  # noqa: BLE001 - a kernel that fails to compile or launch: the torch ops, loudly
        logger.exception("%s failed its start-up check (%s %s)", kernel, fields, shape)
        return False
    if ok:
        logger.info("%s: Triton kernel in use (%s %s)", kernel, fields, shape)
    else:
        logger.warning("%s disagrees with torch (%s %s): torch ops", kernel, fields, shape)
    return ok


def check_randn(g: torch.Generator, dtype: torch.dtype):
    """A start-up check's random tensors: normal draws from `g` in float32, rounded to `dtype`.
    NOTE: drawn in float32 explicitly (layers are built under the model's default dtype), and every
    draw from `g`: the global generator seeds the dummy weights of the model being built."""

    def randn(*shape) -> torch.Tensor:
        return torch.randn(*shape, generator=g, device=g.device, dtype=torch.float32).to(dtype)

    return randn


def _agrees_with_reference(
    device, dtype, num_q_heads: int, num_kv_heads: int, head_dim: int, qk_norm: bool
) -> bool:
    """One prefill-like batch at scattered positions and slots (page size 4), both paths on copies of
    the same inputs, each launch shape once; the whole pool compared, so a stray write fails the
    check too. NOTE: this also compiles every variant the engine launches for this shape (the page
    size is not specialised on), so no first request waits for Triton's JIT."""
    t, pages, page_size = 7, 8, 4
    g = torch.Generator(device=device).manual_seed(0)
    randn = check_randn(g, dtype)
    width = (num_q_heads + 2 * num_kv_heads) * head_dim
    qkv = randn(t, width)  # q, k, v as strided views of one projection, as in the model
    positions = torch.tensor([0, 5, 1, 63, 17, 2, 40], device=device, dtype=torch.int64)
    # NOTE: distinct slots: two tokens writing one row would make either result right
    slots = torch.randperm(pages * page_size, generator=g, device=device)[:t]
    k_rows = slots // page_size * (2 * page_size) + slots % page_size
    inv_freq = torch.rand(head_dim // 2, generator=g, device=device, dtype=torch.float32)
    freqs = torch.outer(torch.arange(64, device=device, dtype=torch.float32), inv_freq)
    cos_sin = torch.cat([freqs.cos(), freqs.sin()], -1)
    norm = (randn(head_dim), randn(head_dim), 1e-6) if qk_norm else None
    pool = randn(pages, 2, page_size, num_kv_heads, head_dim)

    def run(fn):
        x, kv = qkv.clone(), pool.clone()
        q, k, v = x.split([num_q_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], -1)
        views = (v_.view(t, -1, head_dim) for v_ in (q, k, v))
        return fn(positions, *views, kv, k_rows, cos_sin, norm), kv, x

    for rotate_k in (False, True):  # x: the projection's rows, K rotated in place with rotate_k
        q_want, kv_want, x_want = run(functools.partial(rope_kv_reference, rotate_k=rotate_k))
        for launch in LAUNCHES:
            q_got, kv_got, x_got = run(functools.partial(fused_rope_kv, launch=launch, rotate_k=rotate_k))
            if not all(close_enough(a, b) for a, b in ((q_got, q_want), (kv_got, kv_want), (x_got, x_want))):
                return False
    return True


def close_enough(got: torch.Tensor, want: torch.Tensor) -> bool:
    """Equal up to rounding: float32 to 1e-5 of the largest value; 16-bit to 1/32 of it (a few
    ulps). NOTE: not element-wise relative: in 16 bits the rounded norm of a head flips an ulp when
    its float32 sum order does, and where RoPE's difference cancels that ulp is large next to the
    output. A wrong pair, head or slot is off by the values themselves."""
    tol = 1e-5 if got.dtype == torch.float32 else 1 / 32
    return (got.float() - want.float()).abs().max().item() <= tol * want.float().abs().max().item()


if triton is not None:

    @triton.jit(do_not_specialize=["page_size"])
    def _rope_kv_kernel(
        q, k, v, q_out, kv, positions, k_rows, cos_sin, q_w, k_w, eps,
        stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
        stride_row, stride_head, page_size, stride_cs, num_q_heads, num_kv_heads, q_blocks,
        HALF: tl.constexpr, HALF_POW2: tl.constexpr, BLOCK_H: tl.constexpr,
        IS_NEOX: tl.constexpr, QK_NORM: tl.constexpr, ROTATE_K: tl.constexpr, PDL: tl.constexpr,
    ):  # fmt: skip
        """Program (t, b): heads b * BLOCK_H... of q (b < q_blocks), else of k and v (ROTATE_K: the
        rotated k stored back over k as well)."""
        pdl_begin(PDL)  # first: before any load or store (pdl.py)
        t = tl.program_id(0).to(tl.int64)
        b = tl.program_id(1)
        i = tl.arange(0, HALF_POW2)
        # the two elements each frequency rotates: halves (neox) or neighbours (GPT-J)
        lo = i if IS_NEOX else 2 * i
        hi = i + HALF if IS_NEOX else 2 * i + 1
        cs = cos_sin + tl.load(positions + t) * stride_cs
        cos = tl.load(cs + i, mask=i < HALF, other=0.0)[None, :]
        sin = tl.load(cs + HALF + i, mask=i < HALF, other=0.0)[None, :]
        if b < q_blocks:
            heads = b * BLOCK_H + tl.arange(0, BLOCK_H)
            mask = (heads < num_q_heads)[:, None] & (i < HALF)[None, :]
            src = q + t * stride_qt + heads[:, None] * stride_qh
            dst = q_out + t * (num_q_heads * 2 * HALF) + heads[:, None] * (2 * HALF)
            o1, o2 = _norm_rotate(src, lo, hi, mask, cos, sin, q_w, eps, HALF, QK_NORM)
            tl.store(dst + lo[None, :], o1.to(q_out.dtype.element_ty), mask=mask)
            tl.store(dst + hi[None, :], o2.to(q_out.dtype.element_ty), mask=mask)
        else:
            heads = (b - q_blocks) * BLOCK_H + tl.arange(0, BLOCK_H)
            mask = (heads < num_kv_heads)[:, None] & (i < HALF)[None, :]
            k_src = k + t * stride_kt + heads[:, None] * stride_kh
            v_src = v + t * stride_vt + heads[:, None] * stride_vh
            k_dst = kv + tl.load(k_rows + t) * stride_row + heads[:, None] * stride_head
            v_dst = k_dst + page_size * stride_row  # the V slot: page_size rows after the K slot
            o1, o2 = _norm_rotate(k_src, lo, hi, mask, cos, sin, k_w, eps, HALF, QK_NORM)
            pool_dtype = kv.dtype.element_ty
            tl.store(k_dst + lo[None, :], o1.to(pool_dtype), mask=mask)
            tl.store(k_dst + hi[None, :], o2.to(pool_dtype), mask=mask)
            if ROTATE_K:  # this program alone reads these elements, and has read them
                tl.store(k_src + lo[None, :], o1.to(k.dtype.element_ty), mask=mask)
                tl.store(k_src + hi[None, :], o2.to(k.dtype.element_ty), mask=mask)
            v1 = tl.load(v_src + lo[None, :], mask=mask)
            v2 = tl.load(v_src + hi[None, :], mask=mask)
            tl.store(v_dst + lo[None, :], v1.to(pool_dtype), mask=mask)
            tl.store(v_dst + hi[None, :], v2.to(pool_dtype), mask=mask)

    @triton.jit
    def _norm_rotate(src, lo, hi, mask, cos, sin, w, eps, HALF: tl.constexpr, QK_NORM: tl.constexpr):
        """One block of heads [BLOCK_H, D] at src (rows = heads): (first, second) elements of each
        rotated pair in float32, normalised first if QK_NORM, with the torch path's roundings."""
        x1 = tl.load(src + lo[None, :], mask=mask, other=0.0)
        x2 = tl.load(src + hi[None, :], mask=mask, other=0.0)
        dtype = x1.dtype
        x1, x2 = x1.to(tl.float32), x2.to(tl.float32)
        if QK_NORM:
            var = (tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)) / (2 * HALF)
            rstd = tl.rsqrt(var + eps)[:, None]
            w1 = tl.load(w + lo, mask=lo < 2 * HALF, other=0.0).to(tl.float32)[None, :]
            w2 = tl.load(w + hi, mask=hi < 2 * HALF, other=0.0).to(tl.float32)[None, :]
            # torch: weight * (x * rstd).to(dtype), in the weight's dtype (= the model's)
            x1 = ((x1 * rstd).to(dtype).to(tl.float32) * w1).to(dtype).to(tl.float32)
            x2 = ((x2 * rstd).to(dtype).to(tl.float32) * w2).to(dtype).to(tl.float32)
        return x1 * cos - x2 * sin, x2 * cos + x1 * sin
