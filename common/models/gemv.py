"""A decode batch's dense linears as one Triton GEMV: y [T, N] = x [T, K] @ W [N, K]^T (+ bias) for at
most GEMV_MAX_TOKENS tokens, bf16/fp16 weights, on a CUDA GPU, where this device's tune found it
faster than cuBLAS.

Why: at batch 1 cuBLAS ran the attention projections well below their bytes' time (H100, fifteenth
session, PDL off: Qwen3-30B-A3B's o_proj 8.3 µs plus a 1.8 µs split-K reduction for 5.7 µs of bytes,
its qkv_proj 9.5 µs for 7.1; DeepSeek-V2-Lite's o_proj 6.8 µs for 2.8), and its kernels stand outside
the Programmatic Dependent Launch chain of the Triton kernels around them (pdl.py): each one ends the
overlap of the next launch with the previous kernel's tail.

The kernel: one program a tile of BLOCK_N weight rows, all the batch's tokens (T_POW2), K in BLOCK_K
steps; float32 products and sums, one rounding to the output dtype (as cuBLAS's bf16 GEMM). Which
shapes take it: `common/models/gemv_configs.json`, written by `python -m disagg.common.bench.gemv
--tune` on the device (keyed by N, K and the device's name, one block-size choice per token bucket
1 and 2-4); a shape without an entry for this device keeps F.linear. Each entry is checked against
F.linear once per shape when the model is prepared (`gemv_plan`, never inside a graph capture); on a
mismatch or an error the layer keeps F.linear, loudly.
"""

from __future__ import annotations

import functools
import json
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from disagg.common.models.fused_moe import device_name, fused_moe_available
from disagg.common.models.pdl import pdl_args, pdl_begin

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU image: F.linear only
    triton = None

logger = logging.getLogger(__name__)

GEMV_MAX_TOKENS = 4
CONFIGS = Path(__file__).with_name("gemv_configs.json")
_BUCKETS = {1: "1", 2: "4", 4: "4"}  # a batch's next power of two -> its tuned entry


def bucket(num_tokens: int) -> str | None:
    """The tuned entry a batch of `num_tokens` takes ("1" or "4"), None above GEMV_MAX_TOKENS."""
    return _BUCKETS.get(1 << max(0, num_tokens - 1).bit_length())


def config_key(n: int, k: int, device: str) -> str:
    return f"N={n},K={k},device={device}"


@functools.cache
def tuned_configs() -> dict:
    return json.loads(CONFIGS.read_text()) if CONFIGS.exists() else {}


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, config: dict) -> torch.Tensor:
    """x [T, K] @ weight [N, K]^T (+ bias) in one launch with `config`'s block sizes."""
    num_tokens, k = x.shape
    n = weight.shape[0]
    out = torch.empty(num_tokens, n, dtype=x.dtype, device=x.device)
    block_n = config["BLOCK_N"]
    _gemv_kernel[(triton.cdiv(n, block_n),)](
        x, weight, bias if bias is not None else weight, out, num_tokens, n, k, x.stride(0), weight.stride(0),
        T_POW2=triton.next_power_of_2(num_tokens), BLOCK_N=block_n, BLOCK_K=config["BLOCK_K"],
        HAS_BIAS=bias is not None, num_warps=config["num_warps"], **pdl_args(x.device),
    )  # fmt: skip
    return out


def linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, plan: dict | None
) -> torch.Tensor:
    """F.linear, or the GEMV where `plan` (gemv_plan's) has an entry for this batch's bucket."""
    if plan is not None and x.dim() == 2 and x.stride(1) == 1 and (b := bucket(x.shape[0])) in plan:
        return gemv(x, weight, bias, plan[b])
    return F.linear(x, weight, bias)


def gemv_plan(weight: torch.Tensor, bias: torch.Tensor | None = None) -> dict | None:
    """This device's tuned GEMV configs for a linear's weight ({bucket: config}), those that pass
    their check against F.linear; None where there are none (F.linear throughout)."""
    if not (
        fused_moe_available()
        and weight.is_cuda
        and weight.dim() == 2
        and weight.dtype in (torch.bfloat16, torch.float16)
        and weight.stride(1) == 1
    ):
        return None
    n, k = weight.shape
    entry = tuned_configs().get(config_key(n, k, device_name()), {})
    plan = {
        b: c for b, c in entry.items() if _config_ok(weight.device, n, k, weight.dtype, bias is not None, **c)
    }
    return plan or None


def prepare_gemv(model: torch.nn.Module) -> int:
    """Give every linear of `model` that has a `gemv_plan` slot (layers.py) its plan; returns how
    many got one. Run once after loading, outside any CUDA graph capture."""
    count = 0
    for module in model.modules():
        if hasattr(module, "gemv_plan") and getattr(module, "weight_scale_inv", None) is None:
            bias = getattr(module, "bias", None) if not hasattr(module, "reduce") else None
            module.gemv_plan = gemv_plan(module.weight, bias)
            count += module.gemv_plan is not None
    return count


@functools.cache
def _config_ok(device, n: int, k: int, dtype, has_bias: bool, **config) -> bool:
    """The GEMV against F.linear at 1, 3 and 4 tokens on random values of this shape."""
    try:
        gen = torch.Generator(device=device).manual_seed(0)
        weight = (torch.randn(n, k, device=device, generator=gen) / k**0.5).to(dtype)
        bias = torch.randn(n, device=device, generator=gen).to(dtype) if has_bias else None
        ok = True
        for tokens in (1, 3, GEMV_MAX_TOKENS):
            x = torch.randn(tokens, k, device=device, generator=gen).to(dtype)
            want, got = F.linear(x, weight, bias).float(), gemv(x, weight, bias, config).float()
            ok = ok and torch.allclose(got, want, rtol=2e-2, atol=2e-2)
    except Exception:  # noqa: BLE001 - any failure: F.linear, loudly
        logger.exception("the dense GEMV failed its check (N=%d, K=%d, %s): F.linear", n, k, config)
        return False
    if not ok:
        logger.warning("the dense GEMV disagrees with F.linear (N=%d, K=%d, %s): F.linear", n, k, config)
    return ok


if triton is not None:

    @triton.jit
    def _gemv_kernel(
        x, w, bias, out, num_tokens, N, K, stride_x, stride_w,
        T_POW2: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, HAS_BIAS: tl.constexpr,
        PDL: tl.constexpr,
    ):  # fmt: skip
        """out[t, rows] = x[t] . w[rows] (+ bias[rows]) for every token t and BLOCK_N rows."""
        pdl_begin(PDL)  # first: before any load or store (pdl.py)
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        tokens = tl.arange(0, T_POW2)
        cols = tl.arange(0, BLOCK_K)
        n_mask, t_mask = rows < N, tokens < num_tokens
        w_rows = w + rows.to(tl.int64)[:, None] * stride_w
        x_rows = x + tokens.to(tl.int64)[:, None] * stride_x
        acc = tl.zeros([T_POW2, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + cols
            k_mask = k < K
            wt = tl.load(w_rows + k[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0.0)
            xt = tl.load(x_rows + k[None, :], mask=t_mask[:, None] & k_mask[None, :], other=0.0)
            acc += tl.sum(xt.to(tl.float32)[:, None, :] * wt.to(tl.float32)[None, :, :], axis=2)
        if HAS_BIAS:
            acc += tl.load(bias + rows, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        mask = t_mask[:, None] & n_mask[None, :]
        tl.store(out + tokens[:, None] * N + rows[None, :], acc.to(out.dtype.element_ty), mask=mask)
