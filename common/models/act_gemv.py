"""SiLU·mul folded into the down projection's GEMV: one Triton launch for small batches.

At decode batch 1 a dense MLP ends in two launches: the activation (FlashInfer's silu_and_mul,
~2.5 µs for a few KB) and down_proj's GEMV (cuBLAS: at one token a split-K GEMV and its reduce).
`silu_mul_gemv` loads each token's gate and up tiles, computes silu(gate) * up and multiplies it
into the down weight's tile: the activation's launch and its [T, I] round trip through memory go.
The dense MLP (decoder.MLP: Llama / Mistral / Qwen2 / Qwen3, DeepSeek's dense first layers and
shared experts) uses it at batches of at most DISAGG_NORM_GEMV_MAX_TOKENS tokens when
DISAGG_NORM_GEMV=1, beside norm_gemv (norm_gemv.py: the same switch, the same one-program-per-N-tile
layout and launch_shape). down_proj is a RowParallelLinear: the kernel gives this rank's partial
product; the all-reduce and the bias stay in RowParallelLinear.combine.

The arithmetic follows kernels.silu_and_mul's torch path: F.silu of a 16-bit gate computes
x / (1 + exp(-x)) in float32 and rounds once to the model dtype, and the product with up rounds
again; then a float32 accumulation rounded once, as F.linear's. The kernel equals
`silu_mul_gemv_reference` up to float32 summation order (and exp's last bits). CUDA-graph
capturable (no host sync, the grid depends on the shapes only); launched with PDL where DISAGG_PDL=1
turns it on (common/models/pdl.py).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from disagg.common.config import norm_gemv_enabled, norm_gemv_max_tokens, triton_interpret
from disagg.common.models.fused_rope_kv import check_randn, close_enough, kernel_may_run, start_up_check
from disagg.common.models.norm_gemv import (
    MAX_TOKENS,
    Launch,
    accumulate_tile,
    block_rows,
    check_sizes,
    launch_shape,
)
from disagg.common.models.pdl import pdl_args, pdl_begin

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU image: the decoder's torch ops run instead
    triton = None


def silu_mul_gemv(
    gate_up: torch.Tensor,  # [T, 2I]: gate | up, the gate_up projection's output (last dim contiguous)
    weight: torch.Tensor,  # [N, I]: the down projection's (this rank's slice of I), 16 or 32 bits
    launch: Launch | None = None,
) -> torch.Tensor:
    """(silu(gate) * up) @ weight.T: a new [T, N] tensor. `launch`: (BLOCK_N, BLOCK_K, warps, dot)
    (default: norm_gemv.launch_shape's, by the shape)."""
    num_tokens, two_k = gate_up.shape
    n, k = weight.shape
    assert num_tokens <= MAX_TOKENS, f"silu_mul_gemv takes at most {MAX_TOKENS} tokens, got {num_tokens}"
    assert two_k == 2 * k and weight.stride(1) == 1 and gate_up.stride(1) == 1
    out = torch.empty(num_tokens, n, dtype=gate_up.dtype, device=gate_up.device)
    if num_tokens == 0:  # an idle DP-attention rank: a grid of 0 programs fails to launch
        return out
    block_n, block_k, warps, dot = launch or launch_shape(num_tokens, n, k)
    _silu_mul_gemv_kernel[(triton.cdiv(n, block_n),)](
        gate_up, weight, out, num_tokens, n, k, gate_up.stride(0), weight.stride(0),
        BLOCK_T=block_rows(num_tokens, dot), BLOCK_N=block_n, BLOCK_K=block_k, DOT=dot,
        INTERPRETED=triton_interpret(), num_warps=warps, **pdl_args(gate_up.device),
    )  # fmt: skip
    return out


def silu_mul_gemv_reference(gate_up: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """silu_mul_gemv in torch ops: kernels.silu_and_mul's torch path, then F.linear."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.linear(F.silu(gate) * up, weight)


def silu_mul_gemv_fits(down_proj: torch.nn.Module) -> bool:
    """Whether a down projection (a RowParallelLinear: `weight` [N, I]) may take its input's SiLU·mul
    in a silu_mul_gemv launch (silu_mul_gemv_ok at its shape). The caller checks, at each forward,
    that the weight is still 16-bit (FP8 checkpoints quantize the linears after the model is built)."""
    w = down_proj.weight
    return silu_mul_gemv_ok(w.device, w.dtype, w.shape[0], w.shape[1])


@functools.cache
def silu_mul_gemv_ok(device: torch.device, dtype: torch.dtype, n: int, k: int) -> bool:
    """Whether down projections of this shape use silu_mul_gemv: with DISAGG_NORM_GEMV=1, on CUDA in
    bf16/fp16 and under Triton's interpreter (fused_rope_kv.kernel_may_run), and only where the
    kernel gives the torch path's output at every token count the MLP sends it (each default
    layout: this also compiles them, so no request waits for Triton's JIT). Checked once per shape
    when a layer is built (never inside a graph capture); a failure or a mismatch keeps the torch
    ops, logged."""
    if not norm_gemv_enabled() or not kernel_may_run(device, dtype):
        return False
    check = functools.partial(_agrees_with_reference, device, dtype, n, k, norm_gemv_max_tokens())
    return start_up_check("silu_mul_gemv", "N, I", (n, k), check)


def _agrees_with_reference(device, dtype, n: int, k: int, max_tokens: int) -> bool:
    """norm_gemv.check_sizes' rows and token counts, each at the layout the real shape launches."""
    n_check, token_counts = check_sizes(n, max_tokens)
    randn = check_randn(torch.Generator(device=device).manual_seed(0), dtype)
    weight = randn(n_check, k) * k**-0.5
    for t in token_counts:
        gate_up = randn(t, 2 * k) * 2
        got = silu_mul_gemv(gate_up, weight, launch=launch_shape(t, n, k))
        if not close_enough(got, silu_mul_gemv_reference(gate_up, weight)):
            return False
    return True


if triton is not None:

    @triton.jit
    def _silu_mul_gemv_kernel(
        gate_up, weight, out, num_tokens, N, K, stride_g, stride_w,
        BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT: tl.constexpr,
        INTERPRETED: tl.constexpr, PDL: tl.constexpr,
    ):  # fmt: skip
        """Program p: out[:, p * BLOCK_N...] for every token (K: the intermediate size I)."""
        pdl_begin(PDL)  # first: before any load or store (pdl.py)
        pid = tl.program_id(0)
        rows = tl.arange(0, BLOCK_T)
        t_mask = rows < num_tokens
        g_rows = gate_up + rows[:, None].to(tl.int64) * stride_g
        offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        w_rows = weight + offs_n[:, None].to(tl.int64) * stride_w
        dtype = out.dtype.element_ty
        acc = tl.zeros([BLOCK_T, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            k_mask = cols < K
            mask = t_mask[:, None] & k_mask[None, :]
            gate = tl.load(g_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            up = tl.load(g_rows + K + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            # torch: F.silu in float32 rounded to the model dtype, then the product rounded again
            silu = (gate / (1.0 + tl.exp(-gate))).to(dtype)
            a = (silu.to(tl.float32) * up).to(dtype)
            w = tl.load(w_rows + cols[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0.0)
            acc = accumulate_tile(acc, a, w, DOT, INTERPRETED)
        dst = out + rows[:, None].to(tl.int64) * N + offs_n[None, :]
        tl.store(dst, acc.to(dtype), mask=t_mask[:, None] & n_mask[None, :])
