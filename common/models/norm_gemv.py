"""The residual add and RMSNorm folded into the GEMV that reads them: one Triton launch for small batches.

At decode batch 1 a layer's step is launch-bound: on an H200, Qwen3-30B-A3B's attention input ran a
fused add-RMSNorm (FlashInfer, ~2.5 µs) then the qkv projection as cuBLAS's split-K GEMV and its
reduce kernel (~12 µs for ~5 µs of weight bytes). `norm_gemv` computes h = x + residual, the
RMSNorm of h and normed @ weight.T (+ bias) in one launch with no split-K: the norm's launch and
the reduce go. The decoder uses it for plain attention's qkv projection, MLA's fused q | kv_a
projection, the dense MLP's gate_up, a Qwen3-MoE / Mixtral layer's router and a DeepSeekMoE layer's
shared experts' gate_up at batches of at most DISAGG_NORM_GEMV_MAX_TOKENS tokens, when
DISAGG_NORM_GEMV=1 (decoder.py). A MoE's experts (and DeepSeek's float32 router) read the
normalised activations too: `return_normed=True` writes them (the first N tile's programs, the very
values its GEMV multiplied), so the add, the norm and the router (or the shared gate_up) are one
launch where they were FlashInfer's norm and cuBLAS's.

One program per N tile holds all T <= 16 tokens, so each weight tile is read once: it first sums
each token's squares of h over K (x and residual rows: a few KB, from L2), then walks the K tiles
again, normalising each h tile and multiplying it into the weight tile (FMA reductions, or
tensor-core dots with the token rows padded to 16: `launch`). The programs of the first N tile write
h into a new buffer (the new residual): the others still read the old one, so never in place.
CUDA-graph capturable: no host sync, the grid depends on the shapes only; launched with PDL where
DISAGG_PDL=1 turns it on (common/models/pdl.py), as the other decode-path kernels.

The arithmetic follows kernels.rms_norm's torch path step by step (h rounded to the model dtype as
torch's add rounds it; the norm in float32, rounded, times the weight, rounded), then a float32
accumulation rounded once: the kernel equals `norm_gemv_reference` up to float32 summation order.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from disagg.common.config import norm_gemv_enabled, norm_gemv_max_tokens, triton_interpret
from disagg.common.models.fused_rope_kv import (
    check_randn,
    close_enough,
    kernel_may_run,
    rms_norm_reference,
    start_up_check,
)
from disagg.common.models.pdl import pdl_args, pdl_begin

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU image: the decoder's torch ops run instead
    triton = None

MAX_TOKENS = 16  # all of a batch's tokens in one program: its registers bound the batch
Launch = tuple[int, int, int, bool]  # (BLOCK_N, BLOCK_K, warps, tensor-core dot)


def norm_gemv(
    x: torch.Tensor,  # [T, K]: the layer's input delta (rows may be strided, last dim contiguous)
    residual: torch.Tensor | None,  # [T, K]: the running sum, None before the first layer
    norm_weight: torch.Tensor,  # [K]: the RMSNorm's weight
    eps: float,
    weight: torch.Tensor,  # [N, K]: the projection's (nn.Linear's layout), 16 or 32 bits
    bias: torch.Tensor | None = None,  # [N]
    launch: Launch | None = None,
    return_normed: bool = False,
) -> tuple[torch.Tensor, ...]:
    """(rms_norm(x + residual) @ weight.T + bias, x + residual), new [T, N] / [T, K] tensors
    (residual None: h = x, returned as the new residual); `return_normed`: also rms_norm(x +
    residual), a new [T, K] tensor of the values the GEMV multiplied (a MoE's experts read them).
    `launch`: (BLOCK_N, BLOCK_K, warps, dot) (default: launch_shape's, by the shape)."""
    num_tokens, k = x.shape
    n = weight.shape[0]
    assert num_tokens <= MAX_TOKENS, f"norm_gemv takes at most {MAX_TOKENS} tokens, got {num_tokens}"
    assert weight.shape[1] == k and weight.stride(1) == 1 and x.stride(1) == 1
    out = torch.empty(num_tokens, n, dtype=x.dtype, device=x.device)
    new_residual = x if residual is None else torch.empty(num_tokens, k, dtype=x.dtype, device=x.device)
    normed = torch.empty(num_tokens, k, dtype=x.dtype, device=x.device) if return_normed else None
    outputs = (out, new_residual) if normed is None else (out, new_residual, normed)
    if num_tokens == 0:  # an idle DP-attention rank: a grid of 0 programs fails to launch
        return outputs
    assert residual is None or residual.stride(1) == 1
    block_n, block_k, warps, dot = launch or launch_shape(num_tokens, n, k)
    r = x if residual is None else residual  # unread without a residual
    _norm_gemv_kernel[(triton.cdiv(n, block_n),)](
        x, r, norm_weight, weight, weight if bias is None else bias, out, new_residual,
        out if normed is None else normed, eps, num_tokens, n, k, x.stride(0), r.stride(0), weight.stride(0),
        BLOCK_T=block_rows(num_tokens, dot), BLOCK_N=block_n, BLOCK_K=block_k,
        HAS_RESIDUAL=residual is not None, HAS_BIAS=bias is not None, WRITE_NORMED=normed is not None,
        DOT=dot, INTERPRETED=triton_interpret(), num_warps=warps, **pdl_args(x.device),
    )  # fmt: skip
    return outputs


def block_rows(num_tokens: int, dot: bool) -> int:
    """Token rows a program holds: the next power of two; a tensor-core dot takes at least 16."""
    rows = triton.next_power_of_2(num_tokens)
    return max(rows, 16) if dot else rows


def launch_shape(num_tokens: int, n: int, k: int) -> Launch:
    """The default layout (a guess until common/bench/norm_gemv.py has measured it on an H200):
    N tiles as wide as leave >= 256 programs (two per H200 multiprocessor; wider tiles re-read the
    activations from L2 fewer times), 16 rows at least, but where 16-row tiles leave fewer than 64
    programs (a MoE router's 128 experts: 8 programs), 8 or 4 rows so more programs stream the
    weight. One or two tokens, or tiles under 16 rows (a tensor-core dot takes 16): FMA reductions
    over [T, BLOCK_N, BLOCK_K] products of at most 8192 elements (64 float32 registers a thread at
    4 warps); else a tensor-core dot, 128-wide K tiles."""
    block_n = next((b for b in (64, 32) if triton.cdiv(n, b) >= 256), 16)
    if triton.cdiv(n, 16) < 64:
        block_n = 8 if triton.cdiv(n, 8) >= 64 else 4
    if num_tokens <= 2 or block_n < 16:
        block_k = max(32, min(256, 8192 // (block_n * block_rows(num_tokens, False))))
        return block_n, block_k, 4, False
    return block_n, 128, 4, True


def norm_gemv_reference(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    norm_weight: torch.Tensor,
    eps: float,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    return_normed: bool = False,
) -> tuple[torch.Tensor, ...]:
    """norm_gemv in torch ops: the decoder's unfused steps (kernels.add_rms_norm's torch arithmetic,
    not in place, then F.linear)."""
    h = x if residual is None else x + residual
    normed = rms_norm_reference(h, norm_weight, eps)
    out = F.linear(normed, weight, bias)
    return (out, h, normed) if return_normed else (out, h)


def norm_gemv_fits(linear: torch.nn.Module, normed: bool = False) -> bool:
    """Whether a projection (a ColumnParallelLinear or nn.Linear: `weight` [N, K], `bias`) may take
    its input's RMSNorm in a norm_gemv launch (norm_gemv_ok at its shape; `normed`: returning the
    normalised input too). The caller checks, at each forward, that the weight is still 16-bit (FP8
    checkpoints quantize the linears after the model is built)."""
    w = linear.weight
    return norm_gemv_ok(w.device, w.dtype, w.shape[0], w.shape[1], linear.bias is not None, normed)


@functools.cache
def norm_gemv_ok(
    device: torch.device, dtype: torch.dtype, n: int, k: int, bias: bool, normed: bool = False
) -> bool:
    """Whether projections of this shape use norm_gemv: with DISAGG_NORM_GEMV=1, on CUDA in bf16/fp16
    and under Triton's interpreter (fused_rope_kv.kernel_may_run), and only where the kernel gives
    the torch path's output, new residual (and with `normed` the normalised input) at every token
    count the decoder sends it (with and without a residual, each default layout: this also
    compiles them, so no request waits for Triton's JIT). Checked once per shape when a layer is
    built (never inside a graph capture); a failure or a mismatch keeps the torch ops, logged."""
    if not norm_gemv_enabled() or not kernel_may_run(device, dtype):
        return False
    shape = (n, k, bias, normed)
    check = functools.partial(_agrees_with_reference, device, dtype, *shape, norm_gemv_max_tokens())
    return start_up_check("norm_gemv", "N, K, bias, normed", shape, check)


def check_sizes(n: int, max_tokens: int) -> tuple[int, list[int]]:
    """A start-up check's weight rows and token counts (norm_gemv's and act_gemv's): at most ~1024 of
    the N rows, in the real N's residue mod 1024 (its divisibility, so the same compiled variant: the
    check's weight stays small on a 28672-row projection), and token counts 1, 2, 3, 5, 8, 13 up to
    max_tokens (every row block, masked rows in most)."""
    return (n if n <= 2048 else 1024 + n % 1024), [t for t in (1, 2, 3, 5, 8, 13) if t <= max_tokens]


def _agrees_with_reference(device, dtype, n: int, k: int, bias: bool, normed: bool, max_tokens: int) -> bool:
    """check_sizes' token counts, with and without a residual, each at the layout the real shape launches."""
    n_check, token_counts = check_sizes(n, max_tokens)
    randn = check_randn(torch.Generator(device=device).manual_seed(0), dtype)
    weight, norm_weight = randn(n_check, k) * k**-0.5, randn(k)
    b = randn(n_check) if bias else None
    for t in token_counts:
        x, residual = randn(t, k), randn(t, k)
        for r in (residual, None):
            want = norm_gemv_reference(x, r, norm_weight, 1e-6, weight, b, return_normed=normed)
            got = norm_gemv(
                x, r, norm_weight, 1e-6, weight, b, launch=launch_shape(t, n, k), return_normed=normed
            )
            if not all(close_enough(a, w) for a, w in zip(got, want, strict=True)):
                return False
    return True


if triton is not None:

    @triton.jit
    def _norm_gemv_kernel(
        x, residual, norm_w, weight, bias, out, new_residual, normed, eps,
        num_tokens, N, K, stride_x, stride_r, stride_w,
        BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        HAS_RESIDUAL: tl.constexpr, HAS_BIAS: tl.constexpr, WRITE_NORMED: tl.constexpr,
        DOT: tl.constexpr, INTERPRETED: tl.constexpr, PDL: tl.constexpr,
    ):  # fmt: skip
        """Program p: out[:, p * BLOCK_N...] for every token; program 0 also writes new_residual (and
        with WRITE_NORMED the normalised input)."""
        pdl_begin(PDL)  # first: before any load or store (pdl.py)
        pid = tl.program_id(0)
        rows = tl.arange(0, BLOCK_T)
        t_mask = rows < num_tokens
        x_rows = x + rows[:, None].to(tl.int64) * stride_x
        r_rows = residual + rows[:, None].to(tl.int64) * stride_r
        dtype = out.dtype.element_ty
        # 1. each token's mean square of h over K; the first N tile writes h (the new residual)
        squares = tl.zeros([BLOCK_T], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            mask = t_mask[:, None] & (cols < K)[None, :]
            h = _load_h(x_rows, r_rows, cols, mask, HAS_RESIDUAL)
            squares += tl.sum(h * h, axis=1)
            if HAS_RESIDUAL:
                if pid == 0:
                    h_dst = new_residual + rows[:, None].to(tl.int64) * K + cols[None, :]
                    tl.store(h_dst, h.to(dtype), mask=mask)
        rstd = tl.rsqrt(squares / K + eps)[:, None]
        # 2. the weight tile's rows against each normalised h tile
        offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        w_rows = weight + offs_n[:, None].to(tl.int64) * stride_w
        acc = tl.zeros([BLOCK_T, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            k_mask = cols < K
            h = _load_h(x_rows, r_rows, cols, t_mask[:, None] & k_mask[None, :], HAS_RESIDUAL)
            g = tl.load(norm_w + cols, mask=k_mask, other=0.0).to(tl.float32)[None, :]
            # torch: weight * (h * rstd).to(dtype), in the weight's dtype (= the model's)
            a = ((h * rstd).to(dtype).to(tl.float32) * g).to(dtype)
            if WRITE_NORMED:
                if pid == 0:
                    a_dst = normed + rows[:, None].to(tl.int64) * K + cols[None, :]
                    tl.store(a_dst, a, mask=t_mask[:, None] & k_mask[None, :])
            w = tl.load(w_rows + cols[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0.0)
            acc = accumulate_tile(acc, a, w, DOT, INTERPRETED)
        if HAS_BIAS:
            acc += tl.load(bias + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        dst = out + rows[:, None].to(tl.int64) * N + offs_n[None, :]
        tl.store(dst, acc.to(dtype), mask=t_mask[:, None] & n_mask[None, :])

    @triton.jit
    def accumulate_tile(acc, a, w, DOT: tl.constexpr, INTERPRETED: tl.constexpr):
        """acc [BLOCK_T, BLOCK_N] += a [BLOCK_T, BLOCK_K] . w [BLOCK_N, BLOCK_K]^T in float32: a
        tensor-core dot or FMA reductions (`launch`'s choice); act_gemv's kernel shares it."""
        if DOT and INTERPRETED:  # NOTE: the interpreter's dot multiplies bf16 bit patterns as integers
            return tl.dot(a.to(tl.float32), tl.trans(w.to(tl.float32)), acc, input_precision="ieee")
        elif DOT:
            return tl.dot(a, tl.trans(w), acc, input_precision="ieee")
        else:
            return acc + tl.sum(a.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :], axis=2)

    @triton.jit
    def _load_h(x_rows, r_rows, cols, mask, HAS_RESIDUAL: tl.constexpr):
        """A [BLOCK_T, BLOCK_K] tile of h = x + residual in float32, rounded to the model dtype first
        as torch's add rounds it (the new residual and the norm both read that value)."""
        h = tl.load(x_rows + cols[None, :], mask=mask, other=0.0)
        if HAS_RESIDUAL:
            r = tl.load(r_rows + cols[None, :], mask=mask, other=0.0)
            h = (h.to(tl.float32) + r.to(tl.float32)).to(h.dtype)
        return h.to(tl.float32)

else:
    accumulate_tile = None  # the CPU image: no Triton kernel is defined to call it
