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
mismatch or an error the layer keeps F.linear, loudly. MLA's absorbed per-head products (W_UK read
transposed, W_UV; `bmm`) take the same kernel with the heads on its second program axis, keyed
`H=…,N=…,K=…` (CPU-tested; no device has tuned entries for them yet, so they run torch.bmm).

Measured (H100, fifteenth session, docs/benchmarks.md): one token beats cuBLAS on every tuned shape
(75–104% of the bytes' time against 45–91%), 4 tokens loses on most; Llama-3.1-8B's batch-1 step
6.21 -> 5.76 ms (82.4 -> 88.7% of its roofline), Qwen3-30B-A3B's 3.46 -> 3.31 ms, V2-Lite's 2.71 ->
2.64 ms.
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


def config_key(n: int, k: int, device: str, heads: int = 1) -> str:
    """A dense linear's entry (N, K), or with heads > 1 a batched GEMV's (MLA's absorbed W_UK, W_UV)."""
    return f"N={n},K={k},device={device}" if heads == 1 else f"H={heads},N={n},K={k},device={device}"


@functools.cache
def tuned_configs() -> dict:
    return json.loads(CONFIGS.read_text()) if CONFIGS.exists() else {}


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, config: dict) -> torch.Tensor:
    """x [T, K] @ weight [N, K]^T (+ bias) in one launch with `config`'s block sizes."""
    out = torch.empty(x.shape[0], weight.shape[0], dtype=x.dtype, device=x.device)
    _launch(x.unsqueeze(1), weight.unsqueeze(0), bias, out.unsqueeze(1), config)
    return out


def batched_gemv(x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor, config: dict) -> torch.Tensor:
    """out[t, h] = weight[h] @ x[t, h] for every head h in one launch: x [T, H, K] and out [T, H, N]
    (each row's last dimension contiguous), weight [H, N, K] with any strides (MLA's absorbed
    W_UK is read as a transposed view). Returns `out`."""
    _launch(x, weight, None, out, config)
    return out


def _launch(x, weight, bias, out, config: dict) -> None:
    num_tokens, heads, k = x.shape
    n = weight.shape[1]
    block_n = config["BLOCK_N"]
    _gemv_kernel[(triton.cdiv(n, block_n), heads)](
        x, weight, bias if bias is not None else weight, out, num_tokens, n, k, x.stride(0), x.stride(1),
        weight.stride(0), weight.stride(1), weight.stride(2), out.stride(0), out.stride(1),
        T_POW2=triton.next_power_of_2(num_tokens), BLOCK_N=block_n, BLOCK_K=config["BLOCK_K"],
        HAS_BIAS=bias is not None, num_warps=config["num_warps"], **pdl_args(x.device),
    )  # fmt: skip


def linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, plan: dict | None
) -> torch.Tensor:
    """F.linear, or the GEMV where `plan` (gemv_plan's) has an entry for this batch's bucket."""
    if plan is not None and x.dim() == 2 and x.stride(1) == 1 and (b := bucket(x.shape[0])) in plan:
        return gemv(x, weight, bias, plan[b])
    return F.linear(x, weight, bias)


def bmm(x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor, plan: dict | None) -> torch.Tensor:
    """out[t, h] = weight[h] @ x[t, h] (x [T, H, K], weight [H, N, K], out [T, H, N]): the batched
    GEMV where `plan` (batched_plan's) has an entry for this batch's bucket, else torch.bmm over the
    heads, written into `out` either way."""
    if plan is not None and x.stride(2) == 1 and out.stride(2) == 1 and (b := bucket(x.shape[0])) in plan:
        return batched_gemv(x, weight, out, plan[b])
    torch.bmm(x.transpose(0, 1), weight.transpose(1, 2), out=out.transpose(0, 1))
    return out


def _usable(weight: torch.Tensor, dims: int) -> bool:
    half = weight.dtype in (torch.bfloat16, torch.float16)
    return fused_moe_available() and weight.is_cuda and weight.dim() == dims and half


def gemv_plan(weight: torch.Tensor, bias: torch.Tensor | None = None) -> dict | None:
    """This device's tuned GEMV configs for a linear's weight [N, K] ({bucket: config}), those that
    pass their check against F.linear; None where there are none (F.linear throughout)."""
    if not (_usable(weight, 2) and weight.stride(1) == 1):
        return None
    n, k = weight.shape
    return _checked(
        config_key(n, k, device_name()), weight.device, 1, n, k, False, weight.dtype, bias is not None
    )


def batched_plan(weight: torch.Tensor) -> dict | None:
    """The same for a batched GEMV's weight [H, N, K] (rows along N or, transposed, along K)."""
    if not _usable(weight, 3):
        return None
    heads, n, k = weight.shape
    key = config_key(n, k, device_name(), heads)
    return _checked(key, weight.device, heads, n, k, weight.stride(2) != 1, weight.dtype, False)


def _checked(key: str, *shape) -> dict | None:
    entry = tuned_configs().get(key, {})
    return {b: c for b, c in entry.items() if _config_ok(*shape, **c)} or None


def prepare_gemv(model: torch.nn.Module) -> int:
    """Give every linear of `model` that has a `gemv_plan` slot (layers.py) its plan, and every MLA
    layer (an `absorb_plans` slot) its W_UK / W_UV plans; returns how many got one. Run once after
    loading, outside any CUDA graph capture."""
    count = 0
    for module in model.modules():
        if hasattr(module, "gemv_plan") and getattr(module, "weight_scale_inv", None) is None:
            # RowParallelLinear (the one with `reduce`) adds its bias after the all-reduce, not here
            bias = getattr(module, "bias", None) if not hasattr(module, "reduce") else None
            module.gemv_plan = gemv_plan(module.weight, bias)
            count += module.gemv_plan is not None
        if hasattr(module, "absorb_plans"):
            w_uk, w_uv = module._kv_b_weights()
            module.absorb_plans = (batched_plan(w_uk.transpose(1, 2)), batched_plan(w_uv))
            count += sum(p is not None for p in module.absorb_plans)
    return count


@functools.cache
def _config_ok(device, heads: int, n: int, k: int, transposed: bool, dtype, has_bias: bool, **config) -> bool:
    """The GEMV against torch's product at 1, 3 and 4 tokens on random values of this shape and
    weight layout."""
    try:
        gen = torch.Generator(device=device).manual_seed(0)
        shape = (heads, k, n) if transposed else (heads, n, k)
        weight = (torch.randn(shape, device=device, generator=gen) / k**0.5).to(dtype)
        weight = weight.transpose(1, 2) if transposed else weight
        bias = torch.randn(n, device=device, generator=gen).to(dtype) if has_bias else None
        ok = True
        for tokens in (1, 3, GEMV_MAX_TOKENS):
            x = torch.randn(tokens, heads, k, device=device, generator=gen).to(dtype)
            want = torch.einsum("thk,hnk->thn", x.float(), weight.float())
            want = (want if bias is None else want + bias.float()).to(dtype).float()
            got = torch.empty(tokens, heads, n, device=device, dtype=dtype)
            _launch(x, weight, bias, got, config)
            ok = ok and torch.allclose(got.float(), want, rtol=2e-2, atol=2e-2)
    except Exception:  # noqa: BLE001 - any failure: torch's product, loudly
        logger.exception("the GEMV failed its check (H=%d, N=%d, K=%d, %s): torch's", heads, n, k, config)
        return False
    if not ok:
        logger.warning("the GEMV disagrees with torch (H=%d, N=%d, K=%d, %s): torch's", heads, n, k, config)
    return ok


if triton is not None:

    @triton.jit
    def _gemv_kernel(
        x, w, bias, out, num_tokens, N, K, stride_xt, stride_xh, stride_wh, stride_wn, stride_wk,
        stride_ot, stride_oh,
        T_POW2: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, HAS_BIAS: tl.constexpr,
        PDL: tl.constexpr,
    ):  # fmt: skip
        """out[t, h, rows] = x[t, h] . w[h, rows] (+ bias[rows]) for every token t and BLOCK_N rows of
        head h (program axis 1; a dense linear has one head)."""
        pdl_begin(PDL)  # first: before any load or store (pdl.py)
        head = tl.program_id(1).to(tl.int64)
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        tokens = tl.arange(0, T_POW2)
        cols = tl.arange(0, BLOCK_K)
        n_mask, t_mask = rows < N, tokens < num_tokens
        w_rows = w + head * stride_wh + rows.to(tl.int64)[:, None] * stride_wn
        x_rows = x + head * stride_xh + tokens.to(tl.int64)[:, None] * stride_xt
        acc = tl.zeros([T_POW2, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + cols
            k_mask = k < K
            wt = tl.load(w_rows + k[None, :] * stride_wk, mask=n_mask[:, None] & k_mask[None, :], other=0.0)
            xt = tl.load(x_rows + k[None, :], mask=t_mask[:, None] & k_mask[None, :], other=0.0)
            acc += tl.sum(xt.to(tl.float32)[:, None, :] * wt.to(tl.float32)[None, :, :], axis=2)
        if HAS_BIAS:
            acc += tl.load(bias + rows, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        mask = t_mask[:, None] & n_mask[None, :]
        o = out + head * stride_oh + tokens.to(tl.int64)[:, None] * stride_ot + rows[None, :]
        tl.store(o, acc.to(out.dtype.element_ty), mask=mask)
