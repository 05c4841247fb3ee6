"""Triton kernels of the FP8 block-scaled GEMM (fp8.py): per-token-group activation quantization and
the block-scaled matmul. Written after SGLang's / vLLM's `w8a8_block_fp8_matmul` scheme.

Both run on Hopper (FP8 tensor cores) and, on tiny shapes, in Triton's CPU interpreter
(TRITON_INTERPRET=1), where the FP8 tiles are widened to float32 before the dot (`UPCAST`).
"""

from __future__ import annotations

import torch
from disagg.common.config import triton_interpret
from disagg.common.models.pdl import pdl_args, pdl_begin

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU install: weights are dequantized at load, these kernels never run
    triton = None


def triton_available() -> bool:
    return triton is not None


if triton is not None:

    @triton.jit
    def _group_quant_kernel(
        x_ptr, q_ptr, s_ptr, K, groups, stride_xm, eps, fp8_max, GROUP: tl.constexpr, GROUPS_PER_PROG: tl.constexpr,
        PDL: tl.constexpr,
    ):  # fmt: skip
        pdl_begin(PDL)  # first: before any load or store (pdl.py)
        # program (token, j) quantizes groups [j * GROUPS_PER_PROG, ...) of one token: per group
        # scale = amax / 448, q = x / scale (one group per program made prefill's launch 229k programs)
        row = tl.program_id(0)
        g = tl.program_id(1) * GROUPS_PER_PROG + tl.arange(0, GROUPS_PER_PROG)
        offs = g[:, None] * GROUP + tl.arange(0, GROUP)[None, :]  # [GROUPS_PER_PROG, GROUP]
        mask = offs < K
        x = tl.load(x_ptr + row * stride_xm + offs, mask=mask, other=0.0).to(tl.float32)
        scale = tl.maximum(tl.max(tl.abs(x), axis=1), eps) / fp8_max
        q = tl.clamp(x / scale[:, None], -fp8_max, fp8_max)
        tl.store(q_ptr + row * K + offs, q.to(q_ptr.dtype.element_ty), mask=mask)
        tl.store(s_ptr + row * groups + g, scale, mask=g < groups)

    @triton.jit
    def _block_fp8_matmul_kernel(
        a_ptr, b_ptr, c_ptr, as_ptr, bs_ptr,
        M, N, K, group_n, stride_am, stride_bn, stride_cm, stride_asm, stride_bsn, stride_split,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
        UPCAST: tl.constexpr, PDL: tl.constexpr,
    ):  # fmt: skip
        pdl_begin(PDL)  # first: before any load or store (pdl.py)
        # C[M, N] = sum over K-blocks k of (A_k @ B_k^T) * a_scale[m, k] * b_scale[n // group_n, k];
        # A [M, K] and B [N, K] FP8, row-major; BLOCK_K is the quantization group (one scale per tile).
        # Split K (grid axis 1): program s sums its share of the K-blocks into C + s * stride_split.
        pid = tl.program_id(0)
        k_tiles = tl.cdiv(K, BLOCK_K)
        per_split = tl.cdiv(k_tiles, tl.num_programs(1))
        k_first = tl.program_id(1) * per_split
        k_last = min(k_first + per_split, k_tiles)
        num_m, num_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
        # GROUP_M row tiles walk the columns together: their B tiles are shared in L2
        width = GROUP_M * num_n
        first_m = (pid // width) * GROUP_M
        size_m = min(num_m - first_m, GROUP_M)
        pid_m = first_m + (pid % width) % size_m
        pid_n = (pid % width) // size_m
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        mask_m, mask_n = offs_m < M, offs_n < N
        a_ptrs = a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] + k_first * BLOCK_K
        # a [BLOCK_K, BLOCK_N] tile of B^T
        b_ptrs = b_ptr + offs_n[None, :] * stride_bn + offs_k[:, None] + k_first * BLOCK_K
        as_ptrs = as_ptr + offs_m * stride_asm
        bs_ptrs = bs_ptr + (offs_n // group_n) * stride_bsn
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(k_first, k_last):
            k_left = K - k * BLOCK_K
            a = tl.load(a_ptrs, mask=mask_m[:, None] & (offs_k[None, :] < k_left), other=0.0)
            b = tl.load(b_ptrs, mask=mask_n[None, :] & (offs_k[:, None] < k_left), other=0.0)
            a_s = tl.load(as_ptrs + k, mask=mask_m, other=0.0)
            b_s = tl.load(bs_ptrs + k, mask=mask_n, other=0.0)
            if UPCAST:
                a, b = a.to(tl.float32), b.to(tl.float32)
            acc += tl.dot(a, b) * a_s[:, None] * b_s[None, :]
            a_ptrs += BLOCK_K
            b_ptrs += BLOCK_K
        c_ptrs = c_ptr + tl.program_id(1) * stride_split + offs_m[:, None] * stride_cm + offs_n[None, :]
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def quantize_activation_groups_triton(x: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp8.quantize_activation_groups on the device: x [M, K] -> (fp8 [M, K], float32 [M, ceil(K/group)])."""
    x = x.contiguous()
    m, k = x.shape
    groups = triton.cdiv(k, group)
    q = torch.empty((m, k), dtype=torch.float8_e4m3fn, device=x.device)
    s = torch.empty((m, groups), dtype=torch.float32, device=x.device)
    if m:
        per = 8
        _group_quant_kernel[(m, triton.cdiv(groups, per))](
            x, q, s, k, groups, x.stride(0), 1e-10, 448.0,
            GROUP=group, GROUPS_PER_PROG=per, **pdl_args(x.device),
        )  # fmt: skip
    return q, s


def matmul_config(m: int, n: int, k: int) -> dict:
    """Tile sizes by the number of tokens (decode: few rows, so narrow tiles and more of them
    to spread the weight read over the SMs; prefill: square 128 tiles). The benchmark
    (common/bench/fp8_gemm.py --sweep) times the alternatives."""
    if m <= 16:
        cfg = dict(BLOCK_M=16, BLOCK_N=64, GROUP_M=1, num_warps=4, num_stages=4)
    elif m <= 64:
        cfg = dict(BLOCK_M=64, BLOCK_N=64, GROUP_M=8, num_warps=4, num_stages=4)
    else:  # the best of fp8_gemm --sweep on V3's shapes at 4096 tokens (H200), within 3%
        return dict(BLOCK_M=64, BLOCK_N=128, GROUP_M=8, num_warps=4, num_stages=4, SPLIT_K=1)
    # few tiles (a narrow weight): split K so that about four (decode batch <= 16) or two programs
    # run per SM, each over at least 8 K-blocks (fewer make the extra reduction cost more than the
    # split gains); from fp8_gemm --sweep on an H200
    tiles = -(-m // cfg["BLOCK_M"]) * -(-n // cfg["BLOCK_N"])
    programs = 528 if m <= 16 else 264
    cfg["SPLIT_K"] = max(1, min(8, programs // tiles, -(-k // 128) // 8))
    return cfg


def block_fp8_matmul(
    xq: torch.Tensor,
    xs: torch.Tensor,
    wq: torch.Tensor,
    ws: torch.Tensor,
    block: tuple[int, int],
    out_dtype: torch.dtype,
    config: dict | None = None,
) -> torch.Tensor:
    """(xq * xs) @ (wq * ws)^T: xq [M, K] fp8, xs [M, ceil(K/bk)], wq [N, K] fp8, ws [ceil(N/bn), ceil(K/bk)]."""
    m, k = xq.shape
    n = wq.shape[0]
    bn, bk = block
    if (
        wq.shape[1] != k
        or xs.shape != (m, triton.cdiv(k, bk))
        or ws.shape != (triton.cdiv(n, bn), xs.shape[1])
    ):
        raise ValueError(
            f"block FP8 matmul: shapes x {tuple(xq.shape)}/{tuple(xs.shape)}, w {tuple(wq.shape)}/{tuple(ws.shape)}"
        )
    if m == 0:
        return torch.empty((m, n), dtype=out_dtype, device=xq.device)
    cfg = dict(config or matmul_config(m, n, k))
    if triton_interpret():  # the interpreter: small tiles, no pipelining hints
        cfg = dict(BLOCK_M=16, BLOCK_N=min(bn, 32), GROUP_M=2, SPLIT_K=cfg.get("SPLIT_K", 1))
    split = cfg.pop("SPLIT_K", 1)
    # split K: float32 partial sums, added up after (deterministic, unlike atomics)
    out = torch.empty((split, m, n), dtype=out_dtype if split == 1 else torch.float32, device=xq.device)
    grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]), split)
    _block_fp8_matmul_kernel[grid](
        xq, wq, out, xs, ws, m, n, k, bn, xq.stride(0), wq.stride(0), n, xs.stride(0), ws.stride(0), m * n,
        BLOCK_K=bk, UPCAST=triton_interpret(), **cfg, **pdl_args(xq.device),
    )  # fmt: skip
    if split == 1:
        return out[0]
    from disagg.common.models.fused_moe import sum_terms

    return sum_terms(out, m, split, n, n, m * n, out_dtype)  # the partials summed and cast: one launch
