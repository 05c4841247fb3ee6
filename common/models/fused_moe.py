"""Fused MoE in Triton: only the routed experts' weights are read, CUDA-graph capturable.

Two paths, chosen by the number of routed (token, slot) pairs, a static shape:
- grouped GEMM (prefill, large decode batches): pairs aligned per expert to BLOCK_SIZE_M
  (common/models/moe_align.py, on the device); one program per (block, N tile) multiplies the
  block's rows by its one expert. gate_up computes the gate and up tiles together and writes
  silu(gate) * up; down multiplies by the routing weight. One expert weight tile is read once per
  block of its tokens. A token's k rows are added up after the down GEMM by one summing launch,
  or by the down GEMM itself through atomic adds in the model dtype where the tuned entry says
  COMBINE: atomic (combine_mode: no [T * k, H] written and read back).
- GEMV (decode at a few tokens, the issue's batch-1 case): no alignment at all; one program per
  (pair, N tile, K split) streams its expert's rows with plain FMA reductions. Split-K fills the
  chip when 8 pairs x a few N tiles would leave most multiprocessors idle; the partial sums meet
  in an fp32 buffer (atomics) and the down kernel applies silu(gate) * up as it loads them; the
  down kernel's programs may split a token's slots and the intermediate too (DOWN_SPLIT,
  DOWN_SPLIT_K), writing float32 rows that one more launch sums (no atomics: the order is fixed).
- torch's grouped GEMM (`torch._grouped_mm`, CUTLASS on Hopper) from `grouped_mm_min_tokens` on,
  bf16 experts only, outside graph captures: prefill-sized batches, where the Triton path ran at
  ~20% of the matmul rate, mostly its one-program alignment (docs/benchmarks.md; the alignment now
  runs in parallel there); moe_kernels.py times all three and sets the threshold.
Block sizes per shape live in fused_moe_configs.json (tuned on an H200, as vLLM/SGLang keep theirs; a
device's own entries where tuned on it, e.g. an H100's).

FP8 experts (DeepSeek-V3's block-quantized checkpoints: float8_e4m3fn weights, one float32 scale per
[block_n, block_k] block, `scales`): the grouped GEMMs quantize their activations per token per
block_k group as each K tile is loaded (BLOCK_K = block_k, so a tile is one group: the scale is the
tile row's amax / 448, no extra kernel or buffer) and run FP8 tensor-core dots scaled by the
activation and weight block scales (vLLM's / SGLang's `use_fp8_w8a8` scheme). The GEMV path
dequantizes each FP8 weight tile in registers (w8a16: its cost is the weight read, which FP8 halves;
quantizing a handful of activation rows would add work and error and save no bytes). Under Triton's
CPU interpreter (tests) the activations stay float32 and the FP8 tiles are widened before the dot:
the interpreter rounds float -> float8 wrongly (fp8_kernels.py), so the GPU test checks the rounding.
"""

from __future__ import annotations

import functools
import json
import logging
from pathlib import Path

import torch
from disagg.common.config import moe_combine, triton_interpret
from disagg.common.models.moe_align import (
    ExpertScales,
    grouped_experts,
    grouped_mm_experts,
    max_padded_pairs,
    moe_align_block_size,
)
from disagg.common.models.pdl import pdl_args, pdl_begin

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU image: the torch path in moe_align.py runs instead
    triton = None

logger = logging.getLogger(__name__)
_INTERPRET = triton_interpret()  # Triton's CPU interpreter (tests)
_TRITON_ALIGN_MAX_PAIRS = 1 << 30  # pairs above which the torch alignment runs instead
# pairs above which the alignment runs as three parallel launches, not one program (~0.8 ms at 16384
# pairs on an H200, more than the grouped GEMMs of a 2048-token Qwen3-30B-A3B layer)
_ALIGN_ONE_PROGRAM_MAX_PAIRS = 1024
# the parallel alignment's prefix rows a step; 0: auto (prefill_parts.py times 16 against it)
_ALIGN_SCAN_ROWS = 0
_CONFIGS = Path(__file__).with_name("fused_moe_configs.json")
# an expert shape without a tuned entry: the GEMV layout and GEMV/grouped crossover tuned for
# Qwen3-30B-A3B on an H200 (the down GEMV's 8-wide tiles give a batch-1 grid of H / 8 programs: at
# the old 32 a 2048-wide hidden ran 64 programs on 132 SMs, ~31 us a DeepSeek-V2-Lite layer for
# ~8 us of bytes); `moe-kernels` tunes a shape's own entry
_DEFAULT = {
    "gemv_max_pairs": 16,
    # NOTE: torch's grouped GEMM won at >= 1024 tokens only while the alignment was one Triton program
    # (0.43-1.7 ms a layer, H200); the same profile puts the Triton GEMMs at 367 us a 2048-token layer
    # against its 400 us plus ~170 us of sorting and gathers: so Triton by default, moe_kernels decides
    "grouped_mm_min_tokens": 1 << 30,
    "gemv": {"BLOCK_N": 16, "BLOCK_K": 256, "SPLIT_K": 8, "num_warps": 4, "DOWN_BLOCK_N": 8, "DOWN_WARPS": 8},
    "grouped": {
        "1": {"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 64, "BLOCK_SIZE_K": 128, "num_warps": 4, "num_stages": 3},
        "256": {"BLOCK_SIZE_M": 32, "BLOCK_SIZE_N": 64, "BLOCK_SIZE_K": 64, "num_warps": 4, "num_stages": 3},
        "1024": {
            "BLOCK_SIZE_M": 64,
            "BLOCK_SIZE_N": 128,
            "BLOCK_SIZE_K": 64,
            "num_warps": 8,
            "num_stages": 3,
        },
    },
}


_SCRATCH: dict[str, torch.Tensor] = {}


def scratch(name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised tensor for the buffer `name` internal to one MoE layer's kernels (the
    alignment's, the grouped GEMMs' intermediates): the same tensor for every layer of a forward, so a
    48-layer prefill allocates each once, not 48 times (an H100 host launched Qwen3-30B-A3B's
    2048-token prefill barely faster than the device ran it: 29.4 against 32.6 ms, ~12 torch.empty a
    layer among the costs). Safe on one stream: the next layer's kernels write it after this one's
    have read it; nothing returned to a caller is one. On the CPU, inside a CUDA-graph capture and for
    a new shape: a fresh tensor (outside a capture kept for the next layer, replacing the last)."""
    if device.type == "cpu" or (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
        return torch.empty(shape, dtype=dtype, device=device)
    t = _SCRATCH.get(name)
    if t is None or t.shape != shape or t.dtype != dtype or t.device != device:
        _SCRATCH.pop(name, None)  # the old one released first: its memory may serve the new one
        del t
        t = _SCRATCH[name] = torch.empty(shape, dtype=dtype, device=device)
    return t


@functools.cache
def fused_moe_available() -> bool:
    return triton is not None and torch.cuda.is_available()


def config_key(num_experts: int, inter: int, hidden: int, fp8: bool = False, device: str = "") -> str:
    """fused_moe_configs.json's key of an expert shape (FP8 experts: vLLM's `dtype=fp8_w8a8` suffix), and
    of one device's own entry for it (`device=` the CUDA device name, as vLLM names its config files)."""
    key = f"E={num_experts},I={inter},H={hidden}" + (",dtype=fp8_w8a8" if fp8 else "")
    return key + (f",device={device}" if device else "")


def device_name() -> str:
    """The CUDA device's name (its tuned entries' key), "" without one."""
    return torch.cuda.get_device_name() if torch.cuda.is_available() else ""


@functools.cache
def moe_config(
    num_experts: int, inter: int, hidden: int, fp8: bool = False, device: str | None = None
) -> dict:
    """The checked-in block sizes for this expert shape (E experts, I = inter, H = hidden), else defaults:
    this device's own entry where one was tuned on it (e.g. `...,device=NVIDIA H100 80GB HBM3`), else
    the shape's plain entry (tuned on an H200). FP8 experts take their own entry where one was tuned,
    else the bf16 one (fp8_config adapts it)."""
    device = device_name() if device is None else device
    table = json.loads(_CONFIGS.read_text()) if _CONFIGS.exists() else {}
    keys = [config_key(num_experts, inter, hidden, q, d) for q in ((True, False) if fp8 else (False,))
            for d in ((device, "") if device else ("",))]  # fmt: skip
    return next((table[k] for k in keys if k in table), _DEFAULT)


def grouped_config(config: dict, num_tokens: int) -> dict:
    """The grouped-GEMM entry tuned for the token count nearest this one (as vLLM picks)."""
    sizes = sorted(int(m) for m in config["grouped"])
    return config["grouped"][str(min(sizes, key=lambda m: abs(m - num_tokens)))]


def fp8_config(config: dict, block: tuple[int, int]) -> dict:
    """The block sizes FP8 experts need from a config: a K tile never crosses a scale block (gate/up
    GEMV: BLOCK_K divides block_k, one scale a tile row; grouped: BLOCK_K = block_k, one activation
    group a tile) and the grouped gate/up GEMM writes its raw [2I] rows (SPLIT_ACT: silu in the down
    kernel's loads). The down GEMV scales each weight element by its own block's scale instead, so
    its tiles keep their width (clamped to one block, V3's down GEMV ran ~5x its bytes at batch 1);
    so does the gate/up GEMV where a tuned entry says `FP8_WIDE_K` (twice the scale loads a tile,
    against 16 small tiles an expert row: which wins is the H200's to say, moe_kernels --fp8 tries both)."""
    group_k = block[1]
    gemv = dict(config["gemv"])
    if not gemv.get("FP8_WIDE_K"):
        gemv["BLOCK_K"] = min(gemv["BLOCK_K"], group_k)
    grouped = {m: dict(c, BLOCK_SIZE_K=group_k, SPLIT_ACT=True) for m, c in config["grouped"].items()}
    return dict(config, gemv=gemv, grouped=grouped)


def _scale_args(w: torch.Tensor, scale: torch.Tensor | None, block) -> tuple:
    """A weight's scale pointer, its two strides and the block's (n, k) sizes; without FP8 the weight
    itself stands in for the pointer (never read: FP8=False)."""
    if scale is None:
        return w, 0, 0, 1, 1
    return scale, scale.stride(0), scale.stride(1), block[0], block[1]


def fused_experts(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    config: dict | None = None,
    scales: ExpertScales | None = None,
    foreign: bool = True,
) -> torch.Tensor:
    """Same contract as moe_align.grouped_experts: x [T, H], w13 [E, 2I, H], w2 [E, H, I],
    topk_weights / topk_ids [T, k] (ids outside [0, E): another rank's expert). Returns [T, H].
    scales: w13 / w2 are float8_e4m3fn with these block scales. foreign=False: no id is outside
    [0, E) (all experts are local), which spares the prefill path a masking pass."""
    num_tokens, k = topk_ids.shape
    num_experts, hidden, inter = w2.shape
    config = config or moe_config(num_experts, inter, hidden, scales is not None)
    if scales is not None:
        config = fp8_config(config, scales.block)
    # NOTE: no-ops on the model's tensors (topk's outputs are contiguous): each extra kernel here
    # costs a few microseconds per layer at batch 1, where the whole layer's weights take ~18 us
    x, w13, w2 = x.contiguous(), w13.contiguous(), w2.contiguous()
    ids, weights = topk_ids.contiguous(), topk_weights.float().contiguous()
    if num_tokens * k <= config["gemv_max_pairs"]:
        return _gemv_experts(x, w13, w2, weights, ids, config["gemv"], scales)
    if (
        scales is None
        and num_tokens >= config.get("grouped_mm_min_tokens", _DEFAULT["grouped_mm_min_tokens"])
        and not torch.cuda.is_current_stream_capturing()
        and grouped_mm_ok(x.device, x.dtype)
    ):
        return grouped_mm_experts(x, w13, w2, weights, ids, foreign)
    return _grouped_experts(x, w13, w2, weights, ids, grouped_config(config, num_tokens), scales, foreign)


def _sum_pairs(y: torch.Tensor, num_tokens: int, k: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """[T * k, H] (token-major pairs) -> [T, H] in `dtype` (y's by default), summed in float32: one
    launch, where torch's reduction over the middle dim of a [T, k, H] view ran at ~55% of the copy
    rate (30 us a 2048-token Qwen3-30B-A3B layer, H200) and cost more host time than the kernel."""
    hidden = y.shape[1]
    return sum_terms(y, num_tokens, k, hidden, k * hidden, hidden, dtype or y.dtype)


def sum_terms(
    y: torch.Tensor, rows: int, terms: int, hidden: int, row_stride: int, term_stride: int, dtype: torch.dtype
) -> torch.Tensor:
    """out[t, :hidden] = sum over j < terms of y's elements from t * row_stride + j * term_stride, summed
    in float32 and written in `dtype`: one launch (the MoE's pairs [T, k, H]; the FP8 GEMM's split-K
    partials [split, M, N], where torch's sum and cast were two launches, ~4.6 us at one token)."""
    out = torch.empty(rows, hidden, dtype=dtype, device=y.device)
    block = min(1024, triton.next_power_of_2(hidden))
    _sum_terms_kernel[(rows, triton.cdiv(hidden, block))](
        y, out, hidden, row_stride, term_stride, K=terms, BLOCK=block, num_warps=4, **pdl_args(y.device)
    )
    return out


def _gemv_experts(x, w13, w2, weights, ids, cfg: dict, scales: ExpertScales | None) -> torch.Tensor:
    (num_tokens, k), (num_experts, hidden, inter) = ids.shape, w2.shape
    split, bn, bk = cfg["SPLIT_K"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    # NOTE: split-K partial sums meet by atomics in a zeroed buffer [pairs, gate | up]; one split
    # stores each pair's activation silu(gate) * up directly [pairs, inter] (ACT: the down GEMV's
    # programs then read one float32 row a slot, not two, and apply no SiLU)
    act = split == 1
    alloc = torch.empty if act else torch.zeros
    gate_up = alloc(ids.numel(), (1 if act else 2) * inter, dtype=torch.float32, device=x.device)
    k_per_split = triton.cdiv(triton.cdiv(hidden, split), bk) * bk
    fp8, block = scales is not None, scales.block if scales is not None else None
    pdl = pdl_args(x.device)
    _gate_up_gemv[(ids.numel(), triton.cdiv(inter, bn), split)](
        x, w13, gate_up, ids, num_experts, k, hidden, inter,
        x.stride(0), w13.stride(0), w13.stride(1), *_scale_args(w13, scales.w13 if fp8 else None, block),
        BLOCK_N=bn, BLOCK_K=bk, K_PER_SPLIT=k_per_split, SPLIT_K=split, FP8=fp8, WIDE_K=fp8 and bk > block[1],
        ACT=act, num_warps=cfg["num_warps"], **pdl,
    )  # fmt: skip
    # DOWN_SPLIT > 1: the slots split over that many programs a tile; DOWN_SPLIT_K > 1: the intermediate
    # too (wider N tiles then re-read the activations less and still fill the GPU); float32 rows summed after
    down_split = min(cfg.get("DOWN_SPLIT", 1), k)
    slots = triton.cdiv(k, down_split)
    down_split = triton.cdiv(k, slots)  # no program without a slot
    down_bn = cfg.get("DOWN_BLOCK_N", bn)
    down_bk = cfg.get("DOWN_BLOCK_K") or default_down_block_k(inter)
    k_per_split = triton.cdiv(triton.cdiv(inter, cfg.get("DOWN_SPLIT_K", 1)), down_bk) * down_bk
    k_split = triton.cdiv(inter, k_per_split)  # no program without a K tile
    rows = down_split * k_split
    out = torch.empty(
        num_tokens * rows, hidden, dtype=x.dtype if rows == 1 else torch.float32, device=x.device
    )
    _down_gemv[(num_tokens, triton.cdiv(hidden, down_bn), rows)](
        gate_up, w2, out, ids, weights, num_experts, k, hidden, inter,
        w2.stride(0), w2.stride(1), *_scale_args(w2, scales.w2 if fp8 else None, block),
        BLOCK_N=down_bn, BLOCK_K=down_bk, SLOTS=slots, ROWS=rows, K_SPLIT=k_split, K_PER_SPLIT=k_per_split,
        FP8=fp8, ACT=act, num_warps=cfg.get("DOWN_WARPS", cfg["num_warps"]), **pdl,
    )  # fmt: skip
    return out if rows == 1 else _sum_pairs(out, num_tokens, rows, x.dtype)


def default_down_block_k(inter: int) -> int:
    """The down GEMV's K tile (a power of 2) where no entry gives one: the whole intermediate in one
    tile up to 1024 wide, else 512."""
    return triton.next_power_of_2(inter) if inter <= 1024 else 512


@functools.cache
def grouped_mm_ok(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether torch's grouped GEMM runs here (its CUTLASS kernels: Hopper or newer, bf16) and gives
    grouped_experts' result on a small random layer: checked once, on a failure or a mismatch the
    Triton grouped GEMM stays (a speed loss, never other tokens)."""
    if not (device.type == "cuda" and dtype == torch.bfloat16 and hasattr(torch, "_grouped_mm")):
        return False
    if torch.cuda.get_device_capability(device) < (9, 0):
        return False
    try:
        gen = torch.Generator(device=device).manual_seed(0)

        def rand(*shape):
            return torch.randn(*shape, device=device, generator=gen, dtype=torch.float32).to(dtype) / 8

        x, w13, w2 = rand(64, 256), rand(8, 2 * 128, 256), rand(8, 256, 128)
        ids = torch.randint(0, 10, (64, 4), device=device, generator=gen)  # 8, 9: another rank's
        weights = torch.rand(64, 4, device=device, generator=gen)
        got = grouped_mm_experts(x, w13, w2, weights, ids).float()
        want = grouped_experts(x, w13, w2, weights.to(dtype), ids).float()
        ok = bool(((got - want).norm() / want.norm()) < 1e-2)
    except Exception:  # noqa: BLE001 - any failure: the Triton grouped GEMM, loudly
        logger.exception("torch._grouped_mm failed its start-up check: the Triton grouped GEMM runs")
        return False
    if not ok:
        logger.warning("torch._grouped_mm disagrees with the torch experts: the Triton grouped GEMM runs")
    return ok


def fused_topk(
    logits: torch.Tensor, k: int, renormalize: bool, scaling: float = 1.0, shared: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(logits) -> top-k (weights float32 [T, k], ids int64 [T, k]), renormalised over the k
    if asked, times `scaling` (DeepSeek-V2's routed_scaling_factor), in one launch (torch's softmax +
    sort-based top-k + renormalisation: ~5 kernels, ~12 us per layer at batch 1). SparseMoE.route
    uses it where `fused_topk_ok` says it agrees. shared: that many more slots a token, experts E,
    E + 1, ... with weight 1 (shared experts fused into the routed ones: [T, k + shared])."""
    num_tokens, num_experts = logits.shape
    weights = torch.empty(num_tokens, k + shared, dtype=torch.float32, device=logits.device)
    ids = torch.empty(num_tokens, k + shared, dtype=torch.int64, device=logits.device)
    _topk_kernel[(num_tokens,)](
        logits, weights, ids, num_experts, logits.stride(0), float(scaling),
        K=k, E_POW2=triton.next_power_of_2(num_experts), RENORMALIZE=renormalize, SHARED=shared, num_warps=1,
        **pdl_args(logits.device),
    )  # fmt: skip
    return weights, ids


# tokens up to which router_logits runs the Triton GEMV (decode batches; above, cuBLAS's GEMM)
ROUTER_GEMV_MAX_TOKENS = 16


def router_logits(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The router's logits x [T, H] @ weight [E, H]^T in one launch for a decode batch: accumulated in
    float32 from the activations' own dtype, stored in the weight's dtype (bf16 gates: as nn.Linear
    rounds them; float32 gates, DeepSeek's: as F.linear(x.float(), w) computes them). Replaces
    cuBLAS's GEMV of a 64-256-row gate (~5 us, ~10% of its bytes' time, at batch 1 on an H200) and,
    for a float32 gate, the activation cast and the split-K reduction (4 launches, ~8 us a layer)."""
    num_tokens, hidden = x.shape
    num_experts = weight.shape[0]
    out = torch.empty(num_tokens, num_experts, dtype=weight.dtype, device=x.device)
    t_pow2 = triton.next_power_of_2(num_tokens)
    block_e = 2
    block_h = max(64, min(triton.next_power_of_2(hidden), 2048 // t_pow2))  # ~4k float32 products a step
    _router_gemv_kernel[(triton.cdiv(num_experts, block_e),)](
        x, weight, out, num_tokens, num_experts, hidden, x.stride(0), weight.stride(0),
        T_POW2=t_pow2, BLOCK_E=block_e, BLOCK_H=block_h, num_warps=4, **pdl_args(x.device),
    )  # fmt: skip
    return out


@functools.cache
def router_gemv_ok(device: torch.device, num_experts: int, hidden: int, dtype: torch.dtype) -> bool:
    """Whether router_logits matches torch's logits (F.linear in the weight's dtype, activations
    cast to it) on this device and shape, at 1, 3 and ROUTER_GEMV_MAX_TOKENS tokens: checked once per
    shape when a layer is built (never inside a capture); on a mismatch or an error the layer keeps
    torch's GEMM."""
    if not (fused_moe_available() and device.type == "cuda"):
        return False
    try:
        gen = torch.Generator(device=device).manual_seed(0)
        weight = torch.randn(num_experts, hidden, device=device, generator=gen, dtype=torch.float32)
        weight = (weight / hidden**0.5).to(dtype)
        ok = True
        for tokens in (1, 3, ROUTER_GEMV_MAX_TOKENS):
            x = torch.randn(tokens, hidden, device=device, generator=gen, dtype=torch.float32).to(
                torch.bfloat16
            )
            want = torch.nn.functional.linear(x.to(dtype), weight)
            got = router_logits(x, weight)
            # float32 gates: the same products in another order; bf16 gates: one bf16 rounding apart
            tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
            ok = ok and got.dtype == want.dtype and torch.allclose(got.float(), want.float(), **tol)
    except Exception:  # noqa: BLE001 - any failure: torch's GEMM, loudly
        logger.exception(
            "router_logits failed its start-up check (E=%d, H=%d): torch's GEMM", num_experts, hidden
        )
        return False
    if not ok:
        logger.warning("router_logits disagrees with torch (E=%d, H=%d): torch's GEMM", num_experts, hidden)
    return ok


def fused_grouped_topk(
    logits: torch.Tensor,
    bias: torch.Tensor,
    k: int,
    n_group: int,
    topk_group: int,
    renormalize: bool,
    scaling: float,
    shared: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3's routing after the gate GEMM, in one launch (the torch form, deepseek.py's
    `route`, is ~12 small kernels a layer): sigmoid scores; the choice = scores + bias; the groups
    ranked by the sum of their two best choices, the best `topk_group` kept; the top-k choices of
    those; weights = their scores (over their sum if `renormalize`) x `scaling`. Experts a power of
    two, split in `n_group` power-of-two groups (V3: 256 = 8 x 32). Returns float32 [T, k], int64 [T, k]
    ([T, k + shared] with `shared` more slots: fused_topk's)."""
    num_tokens, num_experts = logits.shape
    weights = torch.empty(num_tokens, k + shared, dtype=torch.float32, device=logits.device)
    ids = torch.empty(num_tokens, k + shared, dtype=torch.int64, device=logits.device)
    _grouped_topk_kernel[(num_tokens,)](
        logits, bias, weights, ids, logits.stride(0), float(scaling),
        K=k, K_POW2=triton.next_power_of_2(k), E=num_experts, GROUPS=n_group, TOPK_GROUP=topk_group,
        RENORMALIZE=renormalize, SHARED=shared, num_warps=4, **pdl_args(logits.device),
    )  # fmt: skip
    return weights, ids


def grouped_topk_shape_ok(num_experts: int, n_group: int, topk_group: int, k: int) -> bool:
    """Whether fused_grouped_topk takes this router shape (powers of two; enough kept experts)."""

    def pow2(n: int) -> bool:
        return n > 0 and n & (n - 1) == 0

    return (
        pow2(num_experts) and pow2(n_group) and num_experts // n_group >= 2 and 0 < topk_group <= n_group
        and k <= topk_group * (num_experts // n_group)
    )  # fmt: skip


@functools.cache
def fused_topk_ok(device: torch.device, num_experts: int, k: int, renormalize: bool) -> bool:
    """Whether fused_topk picks torch's experts with torch's weights on this device and shape:
    checked once per shape when a layer is built (never inside a graph capture); on a mismatch or
    an error the layer keeps the torch routing, so a kernel bug costs speed, not tokens."""
    if not (fused_moe_available() and device.type == "cuda"):
        return False
    try:
        gen = torch.Generator(device=device).manual_seed(0)
        # NOTE: float32 explicitly: layers are built under a bf16 default dtype, and bf16 logits tie
        # often (the kernel and torch may order tied experts differently: a false alarm)
        logits = torch.randn(256, num_experts, device=device, generator=gen, dtype=torch.float32)
        weights, ids = fused_topk(logits, k, renormalize)
        want_w, want_ids = torch.softmax(logits, dim=-1).topk(k, dim=-1)
        if renormalize:
            want_w = want_w / want_w.sum(dim=-1, keepdim=True)
        ok = torch.equal(ids, want_ids) and torch.allclose(weights, want_w, rtol=1e-5, atol=1e-6)
    except Exception:  # noqa: BLE001 - any failure: the torch routing, loudly
        logger.exception("fused_topk failed its start-up check (E=%d, k=%d): torch routing", num_experts, k)
        return False
    if not ok:
        logger.warning("fused_topk disagrees with torch (E=%d, k=%d): torch routing", num_experts, k)
    return ok


def align_blocks(
    ids: torch.Tensor, num_experts: int, block: int, max_triton_pairs: int = _TRITON_ALIGN_MAX_PAIRS
):
    """moe_align_block_size's layout (the same tensors, element for element) in one Triton launch
    (three past _ALIGN_ONE_PROGRAM_MAX_PAIRS: _align_parallel): the torch version is ~35 small
    kernels, ~70 us per layer of launch gaps even inside a graph."""
    n = ids.numel()
    if (not ids.is_cuda and not _INTERPRET) or n > max_triton_pairs:
        return moe_align_block_size(ids, num_experts, block)
    size = max_padded_pairs(n, num_experts, block)
    i32, dev = torch.int32, ids.device
    expert_ids = scratch("align.expert_ids", (size // block,), i32, dev)
    num_padded = scratch("align.num_padded", (1,), i32, dev)
    e_pow2 = triton.next_power_of_2(num_experts)
    if n > _ALIGN_ONE_PROGRAM_MAX_PAIRS:
        return _align_parallel(ids, num_experts, block, size, expert_ids, num_padded, e_pow2)
    sorted_ids = scratch("align.sorted_ids", (size,), i32, dev)
    cursor = scratch("align.cursor", (e_pow2,), i32, dev)  # next free slot per expert
    _align_kernel[(1,)](
        ids, sorted_ids, expert_ids, num_padded, cursor, n, num_experts, size, size // block,
        BLOCK=block, E_POW2=e_pow2, CHUNK=128 if e_pow2 <= 128 else 64, num_warps=4, **pdl_args(ids.device),
    )  # fmt: skip
    return sorted_ids, expert_ids, num_padded


def _align_parallel(ids, num_experts: int, block: int, size: int, expert_ids, num_padded, e_pow2: int):
    """align_blocks for prefill-sized batches in three launches: per-chunk expert counts (one program
    a chunk), their prefix over the chunks and the padded expert starts (one program), then each
    chunk places its pairs (rank = the expert's start + earlier chunks' pairs + earlier pairs in the
    chunk: the same stable order as the one-program kernel, which walks 16384 pairs in ~0.8 ms)."""
    n = ids.numel()
    chunk = 128 if e_pow2 <= 128 else 64
    num_chunks = triton.cdiv(n, chunk)
    i32, dev = torch.int32, ids.device
    chunk_base = scratch("align.chunk_base", (num_chunks, e_pow2), i32, dev)
    expert_start = scratch("align.expert_start", (e_pow2,), i32, dev)
    sorted_ids = scratch("align.sorted_ids", (size,), i32, dev)  # _align_count fills it with n
    pdl = pdl_args(ids.device)
    _align_count[(num_chunks,)](
        ids, chunk_base, sorted_ids, n, num_experts, size, triton.cdiv(size, num_chunks),
        E_POW2=e_pow2, CHUNK=chunk, num_warps=4, **pdl,
    )  # fmt: skip
    # the prefix over all chunks in one tile where they fit (16384 pairs: 128 chunks x 128 experts, 64
    # KB over 8 warps), not 16 rows a step: each step waits on its own loads in this lone program
    rows = _ALIGN_SCAN_ROWS or min(128 if e_pow2 <= 128 else 64, triton.next_power_of_2(num_chunks))
    _align_scan[(1,)](
        chunk_base, expert_ids, num_padded, expert_start, num_chunks, size // block,
        BLOCK=block, E_POW2=e_pow2, ROWS=rows, CHUNK=chunk, num_warps=8 if rows * e_pow2 >= 8192 else 4, **pdl,
    )  # fmt: skip
    _align_place[(num_chunks,)](
        ids, sorted_ids, chunk_base, expert_start, n, num_experts,
        E_POW2=e_pow2, CHUNK=chunk, num_warps=4, **pdl,
    )  # fmt: skip
    return sorted_ids, expert_ids, num_padded


def _grouped_experts(
    x, w13, w2, weights, ids, cfg: dict, scales: ExpertScales | None, foreign: bool = True
) -> torch.Tensor:
    pairs, (num_experts, hidden, inter) = ids.numel(), w2.shape
    bm, bn, bk = cfg["BLOCK_SIZE_M"], cfg["BLOCK_SIZE_N"], cfg["BLOCK_SIZE_K"]
    sorted_ids, expert_ids, num_padded = align_blocks(ids, num_experts, bm)
    blocks = expert_ids.numel()  # static: the grid does not depend on the routing
    launch = dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **pdl_args(x.device))
    # SPLIT_ACT: one accumulator per tile (gate and up as one [2I] GEMM, written raw), silu(gate) * up
    # applied as the down GEMM loads it -- half the registers of the fused gate/up tile, which
    # large tiles need (vLLM's layout); else the gate and up tiles meet in registers
    split = bool(cfg.get("SPLIT_ACT", False))
    act = scratch(
        "grouped.act", (pairs, 2 * inter if split else inter), x.dtype, x.device
    )  # other ranks' rows unused
    # the two first GEMMs take the same arguments; `cols`: the raw [2I] tile, or the activated [I]
    first, cols = (_w13_grouped, 2 * inter) if split else (_gate_up_grouped, inter)
    # FP8 (fp8_config: SPLIT_ACT, BLOCK_K = block_k): the w13 GEMM and the down GEMM take the scales
    fp8, block = scales is not None, scales.block if scales is not None else None
    fp8_args = dict(FP8=fp8, UPCAST=_INTERPRET) if split else {}
    w13_scale = _scale_args(w13, scales.w13 if fp8 else None, block) if split else ()
    first[(blocks * triton.cdiv(cols, bn),)](
        x, w13, act, sorted_ids, expert_ids, num_padded, pairs, ids.shape[1], hidden, cols,
        x.stride(0), w13.stride(0), w13.stride(1), *w13_scale,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, **fp8_args, **launch,
    )  # fmt: skip
    combine = combine_mode(cfg)
    tokens, top_k = ids.shape
    if combine == "sum":
        # other ranks' pairs must read 0; with every expert local each row is written (a 67 MB memset a
        # layer spared at 2048 Qwen3-30B-A3B tokens)
        out = scratch("grouped.out", (pairs, hidden), x.dtype, x.device)
        if foreign:
            out.zero_()
    else:  # each pair's row added into its token's (other ranks' pairs add nothing)
        out = torch.zeros(
            tokens, hidden, dtype=torch.float32 if combine == "atomic_fp32" else x.dtype, device=x.device
        )
    _down_grouped[(blocks * triton.cdiv(hidden, bn),)](
        act, w2, out, sorted_ids, expert_ids, num_padded, weights, pairs, hidden, inter, top_k,
        w2.stride(0), w2.stride(1), *_scale_args(w2, scales.w2 if fp8 else None, block),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, SILU_IN_LOAD=split, FP8=fp8, UPCAST=_INTERPRET,
        COMBINE=combine != "sum", **launch,
    )  # fmt: skip
    if combine == "sum":
        return _sum_pairs(out, tokens, top_k)
    return out.to(x.dtype)


def combine_mode(cfg: dict) -> str:
    """How the grouped path adds a token's k expert rows: "sum" (each pair's row stored, then one
    summing launch in float32: deterministic), "atomic" (the down GEMM adds each row into a zeroed
    [T, H] in the model dtype by atomic adds: no [T * k, H] written and read back; k roundings, in a
    run-to-run order, as the GEMV path's split-K already sums) or "atomic_fp32" (into float32, one
    cast after). On an H100 at 2048 Qwen3-30B-A3B tokens (docs/benchmarks.md, twenty-second session):
    sum 617.7, atomic 579.7, atomic_fp32 712.3 us a layer (Triton's reductions are one element an
    instruction: float32 moves twice the bytes through L2's atomic units). The tuned entry's
    `COMBINE`, unless DISAGG_MOE_COMBINE says."""
    mode = moe_combine() or cfg.get("COMBINE", "sum")
    if mode not in ("sum", "atomic", "atomic_fp32"):
        raise ValueError(f"MoE combine {mode!r}: expected sum, atomic or atomic_fp32")
    return mode


if triton is not None:

    @triton.jit
    def _sum_terms_kernel(
        y, out, hidden, row_stride, term_stride, K: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr
    ):
        """out[t, tile] = sum over j < K of y[t * row_stride + j * term_stride + tile]."""
        pdl_begin(PDL)  # first: before any load or store (pdl.py)
        t = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < hidden
        row = y + t * row_stride + cols
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for j in tl.static_range(K):
            acc += tl.load(row + j * term_stride.to(tl.int64), mask=mask, other=0.0).to(tl.float32)
        tl.store(out + t * hidden + cols, acc.to(out.dtype.element_ty), mask=mask)

    @triton.jit
    def _silu(g):
        return g / (1.0 + tl.exp(-g))

    @triton.jit
    def _gate_up_gemv(
        x, w13, gate_up, ids, num_experts, top_k, K, inter, stride_x, stride_we, stride_wn,
        scale, stride_se, stride_sn, group_n, group_k,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, K_PER_SPLIT: tl.constexpr, SPLIT_K: tl.constexpr,
        FP8: tl.constexpr, WIDE_K: tl.constexpr, ACT: tl.constexpr, PDL: tl.constexpr,
    ):  # fmt: skip
        """gate_up[p] += rows [n-tile] of w13[e_p] (gate and up) . x[p // k], over one K split;
        ACT (one split): gate_up[p] = silu(gate) * up instead, a row of `inter`.
        FP8: each row's dot over a K tile is scaled by its block's scale (BLOCK_K divides group_k);
        WIDE_K: K tiles span several blocks, each weight element scaled by its own block's scale."""
        pdl_begin(PDL)  # first: before any load or store (pdl.py)
        pair, pid_n, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        expert = tl.load(ids + pair).to(tl.int64)
        ours = (expert >= 0) & (expert < num_experts)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < inter
        gate_rows = w13 + tl.where(ours, expert, 0) * stride_we + offs_n[:, None] * stride_wn
        up_rows = gate_rows + inter * stride_wn
        x_row = x + (pair // top_k).to(tl.int64) * stride_x
        # another rank's expert: no K steps, so its row is written as zeros (the down kernel reads it)
        k_end = tl.where(ours, tl.minimum((split + 1) * K_PER_SPLIT, K), 0)
        # FP8: the scale rows of the gate and up tiles (the rows' blocks), stepped along K below
        gate_scales = scale + tl.where(ours, expert, 0) * stride_se + (offs_n // group_n) * stride_sn
        up_scales = scale + tl.where(ours, expert, 0) * stride_se + ((offs_n + inter) // group_n) * stride_sn
        acc_g = tl.zeros([BLOCK_N], dtype=tl.float32)
        acc_u = tl.zeros([BLOCK_N], dtype=tl.float32)
        for k0 in range(split * K_PER_SPLIT, k_end, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < K
            xv = tl.load(x_row + offs_k, mask=k_mask, other=0.0).to(tl.float32)
            mask = n_mask[:, None] & k_mask[None, :]
            wg = tl.load(gate_rows + offs_k[None, :], mask=mask, other=0.0).to(tl.float32)
            wu = tl.load(up_rows + offs_k[None, :], mask=mask, other=0.0).to(tl.float32)
            if WIDE_K:  # each element its block's scale
                blocks = (offs_k // group_k)[None, :]
                wg *= tl.load(gate_scales[:, None] + blocks, mask=mask, other=0.0)
                wu *= tl.load(up_scales[:, None] + blocks, mask=mask, other=0.0)
            if FP8 and not WIDE_K:  # the tile within one block: its scale once a row
                kb = k0 // group_k
                acc_g += tl.sum(wg * xv[None, :], axis=1) * tl.load(gate_scales + kb, mask=n_mask, other=0.0)
                acc_u += tl.sum(wu * xv[None, :], axis=1) * tl.load(up_scales + kb, mask=n_mask, other=0.0)
            else:
                acc_g += tl.sum(wg * xv[None, :], axis=1)
                acc_u += tl.sum(wu * xv[None, :], axis=1)
        if ACT:
            tl.store(gate_up + pair.to(tl.int64) * inter + offs_n, _silu(acc_g) * acc_u, mask=n_mask)
            return
        out = gate_up + pair.to(tl.int64) * 2 * inter + offs_n
        if SPLIT_K == 1:
            tl.store(out, acc_g, mask=n_mask)
            tl.store(out + inter, acc_u, mask=n_mask)
        else:
            tl.atomic_add(out, acc_g, mask=n_mask)
            tl.atomic_add(out + inter, acc_u, mask=n_mask)

    @triton.jit
    def _down_gemv(
        gate_up, w2, out, ids, weights, num_experts, top_k, N, inter, stride_we, stride_wn,
        scale, stride_se, stride_sn, group_n, group_k,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SLOTS: tl.constexpr, ROWS: tl.constexpr,
        K_SPLIT: tl.constexpr, K_PER_SPLIT: tl.constexpr, FP8: tl.constexpr, ACT: tl.constexpr,
        PDL: tl.constexpr,
    ):  # fmt: skip
        """out[t, n-tile] = sum over t's slots of weight * rows of w2[e] . (silu(gate) * up): the
        routing-weight combine in the kernel. ROWS == 1: one program a (token, N tile) takes all
        slots and the whole intermediate and writes the model dtype (no zeroing, no sum); else
        program (t, n, s) takes slot group s // K_SPLIT (slots [g * SLOTS, (g + 1) * SLOTS)) over
        intermediate part s % K_SPLIT (K_PER_SPLIT wide) and writes float32 row t * ROWS + s of
        `out`, which _sum_pairs adds up (more programs: at one token, 8 slots of 32-row tiles of
        DeepSeek-V3's 7168 rows were 224 programs, each streaming 8 experts' rows in turn).
        FP8: each weight element dequantized by its block's scale (a K tile may span blocks).
        ACT: gate_up holds each pair's activation (a row of `inter`), not its gate | up."""
        pdl_begin(PDL)  # first: before any load or store (pdl.py)
        token, pid_n, pid_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        group, k_lo = pid_s // K_SPLIT, (pid_s % K_SPLIT) * K_PER_SPLIT
        k_hi = tl.minimum(k_lo + K_PER_SPLIT, inter)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for j in range(0, SLOTS):
            slot = group * SLOTS + j
            pair = token * top_k + tl.minimum(slot, top_k - 1)
            expert = tl.load(ids + pair).to(tl.int64)
            ours = (slot < top_k) & (expert >= 0) & (expert < num_experts)
            rows = w2 + tl.where(ours, expert, 0) * stride_we + offs_n[:, None] * stride_wn
            row_scales = scale + tl.where(ours, expert, 0) * stride_se + (offs_n // group_n) * stride_sn
            gu_row = gate_up + pair.to(tl.int64) * (1 if ACT else 2) * inter
            part = tl.zeros([BLOCK_N], dtype=tl.float32)
            for k0 in range(k_lo, tl.where(ours, k_hi, k_lo), BLOCK_K):  # another rank's expert: skipped
                offs_k = k0 + tl.arange(0, BLOCK_K)
                k_mask = offs_k < k_hi
                if ACT:
                    a = tl.load(gu_row + offs_k, mask=k_mask, other=0.0)
                else:
                    g = tl.load(gu_row + offs_k, mask=k_mask, other=0.0)
                    a = _silu(g) * tl.load(gu_row + inter + offs_k, mask=k_mask, other=0.0)
                mask = n_mask[:, None] & k_mask[None, :]
                w = tl.load(rows + offs_k[None, :], mask=mask, other=0.0).to(tl.float32)
                if FP8:
                    w *= tl.load(row_scales[:, None] + (offs_k // group_k)[None, :], mask=mask, other=0.0)
                part += tl.sum(w * a[None, :], axis=1)
            acc += part * tl.load(weights + pair)
        row = token.to(tl.int64) * ROWS + pid_s
        tl.store(out + row * N + offs_n, acc.to(out.dtype.element_ty), mask=n_mask)

    @triton.jit
    def _grouped_topk_kernel(
        logits, bias, weights, ids, stride, scaling,
        K: tl.constexpr, K_POW2: tl.constexpr, E: tl.constexpr, GROUPS: tl.constexpr, TOPK_GROUP: tl.constexpr,
        RENORMALIZE: tl.constexpr, SHARED: tl.constexpr, PDL: tl.constexpr,
    ):  # fmt: skip
        """One token: fused_grouped_topk (ties: the lowest group, the lowest expert); then SHARED slots
        (_shared_slots)."""
        pdl_begin(PDL)  # first: before any load or store (pdl.py)
        token = tl.program_id(0).to(tl.int64)
        size: tl.constexpr = E // GROUPS
        experts = tl.arange(0, E)
        scores = tl.sigmoid(tl.load(logits + token * stride + experts).to(tl.float32))
        choice = scores + tl.load(bias + experts).to(tl.float32)
        # each group's score: its best two choices (the best twice where it occurs twice, as topk(2))
        grid = tl.reshape(choice, (GROUPS, size))
        lanes = tl.arange(0, size)
        best = tl.max(grid, axis=1)
        first = tl.min(tl.where(grid == best[:, None], lanes[None, :], size), axis=1)
        group_score = best + tl.max(tl.where(lanes[None, :] == first[:, None], -float("inf"), grid), axis=1)
        groups = tl.arange(0, GROUPS)
        kept = tl.zeros([GROUPS], dtype=tl.int32)
        for _ in tl.static_range(TOPK_GROUP):
            top = tl.max(group_score, axis=0)
            pick = tl.min(tl.where(group_score == top, groups, GROUPS), axis=0)
            kept = tl.where(groups == pick, 1, kept)
            group_score = tl.where(groups == pick, -float("inf"), group_score)
        kept_e = tl.reshape(tl.broadcast_to(kept[:, None], (GROUPS, size)), (E,))
        choice = tl.where(kept_e != 0, choice, -float("inf"))
        slots = tl.arange(0, K_POW2)
        top_w = tl.zeros([K_POW2], dtype=tl.float32)
        top_id = tl.zeros([K_POW2], dtype=tl.int64)
        for j in tl.static_range(K):
            top = tl.max(choice, axis=0)
            pick = tl.min(tl.where(choice == top, experts, E), axis=0)
            top_w = tl.where(slots == j, tl.sum(tl.where(experts == pick, scores, 0.0), axis=0), top_w)
            top_id = tl.where(slots == j, pick.to(tl.int64), top_id)
            choice = tl.where(experts == pick, -float("inf"), choice)
        if RENORMALIZE:
            top_w = top_w / (tl.sum(top_w, axis=0) + 1e-20)
        tl.store(weights + token * (K + SHARED) + slots, top_w * scaling, mask=slots < K)
        tl.store(ids + token * (K + SHARED) + slots, top_id, mask=slots < K)
        _shared_slots(weights, ids, token, E, K, SHARED)

    @triton.jit
    def _shared_slots(weights, ids, token, num_experts, K: tl.constexpr, SHARED: tl.constexpr):
        """A token's row of K + SHARED slots: slot K + j is expert num_experts + j with weight 1 (the
        shared experts, fused after the routed ones)."""
        for j in tl.static_range(SHARED):
            tl.store(weights + token * (K + SHARED) + K + j, 1.0)
            tl.store(ids + token * (K + SHARED) + K + j, token * 0 + num_experts + j)  # int64 (token's)

    @triton.jit
    def _router_gemv_kernel(
        x, w, out, num_tokens, num_experts, hidden, x_stride, w_stride,
        T_POW2: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_H: tl.constexpr, PDL: tl.constexpr,
    ):  # fmt: skip
        """out[t, e] = sum over h of x[t, h] * w[e, h] for all tokens and BLOCK_E experts: float32
        products and sums, stored in out's dtype."""
        pdl_begin(PDL)  # first: before any load or store (pdl.py)
        experts = tl.program_id(0) * BLOCK_E + tl.arange(0, BLOCK_E)
        tokens = tl.arange(0, T_POW2)
        cols = tl.arange(0, BLOCK_H)
        w_rows = w + experts.to(tl.int64)[:, None] * w_stride
        x_rows = x + tokens.to(tl.int64)[:, None] * x_stride
        acc = tl.zeros([T_POW2, BLOCK_E], dtype=tl.float32)
        for h0 in range(0, hidden, BLOCK_H):
            h = h0 + cols
            wt = tl.load(
                w_rows + h[None, :], mask=(experts[:, None] < num_experts) & (h[None, :] < hidden), other=0.0
            )
            xt = tl.load(
                x_rows + h[None, :], mask=(tokens[:, None] < num_tokens) & (h[None, :] < hidden), other=0.0
            )
            acc += tl.sum(xt.to(tl.float32)[:, None, :] * wt.to(tl.float32)[None, :, :], axis=2)
        mask = (tokens[:, None] < num_tokens) & (experts[None, :] < num_experts)
        tl.store(
            out + tokens[:, None] * num_experts + experts[None, :], acc.to(out.dtype.element_ty), mask=mask
        )

    @triton.jit
    def _topk_kernel(
        logits, weights, ids, num_experts, stride, scaling,
        K: tl.constexpr, E_POW2: tl.constexpr, RENORMALIZE: tl.constexpr, SHARED: tl.constexpr, PDL: tl.constexpr,
    ):  # fmt: skip
        """One token: softmax over the experts, then K rounds of argmax (ties: the lowest id); the
        weights times `scaling`; then SHARED slots (_shared_slots)."""
        pdl_begin(PDL)  # first: before any load or store (pdl.py)
        token = tl.program_id(0).to(tl.int64)
        experts = tl.arange(0, E_POW2)
        x = tl.load(logits + token * stride + experts, mask=experts < num_experts, other=-float("inf"))
        x = x.to(tl.float32)
        p = tl.exp(x - tl.max(x, axis=0))
        p = p / tl.sum(p, axis=0)
        scale = scaling
        if RENORMALIZE:  # the top-k sum first: no re-reading of this program's own stores
            q, total = p, 0.0
            for _ in tl.static_range(K):
                best = tl.max(q, axis=0)
                total += best
                q = tl.where(experts == tl.min(tl.where(q == best, experts, E_POW2), axis=0), -1.0, q)
            scale = scaling / total
        for j in tl.static_range(K):
            best = tl.max(p, axis=0)
            pick = tl.min(tl.where(p == best, experts, E_POW2), axis=0)
            tl.store(weights + token * (K + SHARED) + j, best * scale)
            tl.store(ids + token * (K + SHARED) + j, pick.to(tl.int64))
            p = tl.where(experts == pick, -1.0, p)
        _shared_slots(weights, ids, token, num_experts, K, SHARED)

    @triton.jit
    def _chunk_experts(ids, c, n, num_experts, CHUNK: tl.constexpr):
        """Chunk c's pairs: their indices and local experts (-1: another rank's)."""
        pair = c * CHUNK + tl.arange(0, CHUNK)
        e = tl.load(ids + pair, mask=pair < n, other=-1)
        return pair, tl.where((e >= 0) & (e < num_experts), e, -1).to(tl.int32)

    @triton.jit
    def _padded_layout(counts, expert_ids, num_padded, num_blocks, BLOCK: tl.constexpr, CHUNK: tl.constexpr):
        """From the pairs per expert: each expert's group padded to BLOCK; stores the used length and
        each block's expert (-1 past it); returns each expert's first slot."""
        padded = (counts + BLOCK - 1) // BLOCK * BLOCK
        padded_end = tl.cumsum(padded, axis=0)
        total = tl.sum(padded, axis=0)
        tl.store(num_padded, total)
        lanes = tl.arange(0, CHUNK)
        for start in range(0, num_blocks, CHUNK):
            first = (start + lanes) * BLOCK  # first slot of each block
            owner = tl.sum((padded_end[None, :] <= first[:, None]).to(tl.int32), axis=1)
            tl.store(
                expert_ids + start + lanes,
                tl.where(first < total, owner, -1),
                mask=start + lanes < num_blocks,
            )
        return padded_end - padded

    @triton.jit
    def _align_count(
        ids, chunk_counts, sorted_ids, n, num_experts, size, stripe,
        E_POW2: tl.constexpr, CHUNK: tl.constexpr, PDL: tl.constexpr,
    ):  # fmt: skip
        """chunk_counts[c, e] = chunk c's pairs of expert e; sorted_ids[c * stripe ...][:stripe] = n (the
        padding sentinel: _align_place, a later launch, overwrites the real slots)."""
        pdl_begin(PDL)  # first: before any load or store (pdl.py)
        c = tl.program_id(0)
        _, e = _chunk_experts(ids, c, n, num_experts, CHUNK)
        experts = tl.arange(0, E_POW2)
        tl.store(
            chunk_counts + c * E_POW2 + experts, tl.sum((e[:, None] == experts[None, :]).to(tl.int32), axis=0)
        )
        lanes = tl.arange(0, CHUNK)
        for start in range(c * stripe, c * stripe + stripe, CHUNK):
            slot = start + lanes
            tl.store(
                sorted_ids + slot,
                tl.zeros([CHUNK], dtype=tl.int32) + n,
                mask=(slot < size) & (slot < c * stripe + stripe),
            )

    @triton.jit
    def _align_scan(
        chunk_counts, expert_ids, num_padded, expert_start, num_chunks, num_blocks,
        BLOCK: tl.constexpr, E_POW2: tl.constexpr, ROWS: tl.constexpr, CHUNK: tl.constexpr, PDL: tl.constexpr,
    ):  # fmt: skip
        """One program: chunk_counts becomes each chunk's exclusive prefix per expert (in place), then
        the padded expert starts, the used length and each block's expert, as _align_kernel's."""
        pdl_begin(PDL)  # first: before any load or store (pdl.py)
        experts, rows = tl.arange(0, E_POW2), tl.arange(0, ROWS)
        carry = tl.zeros([E_POW2], dtype=tl.int32)
        for start in range(0, num_chunks, ROWS):
            r = start + rows
            ptr = chunk_counts + r[:, None] * E_POW2 + experts[None, :]
            tile = tl.load(ptr, mask=(r < num_chunks)[:, None], other=0)
            tl.store(ptr, tl.cumsum(tile, axis=0) - tile + carry[None, :], mask=(r < num_chunks)[:, None])
            carry += tl.sum(tile, axis=0)
        tl.store(
            expert_start + experts, _padded_layout(carry, expert_ids, num_padded, num_blocks, BLOCK, CHUNK)
        )

    @triton.jit
    def _align_place(
        ids, sorted_ids, chunk_base, expert_start, n, num_experts,
        E_POW2: tl.constexpr, CHUNK: tl.constexpr, PDL: tl.constexpr,
    ):  # fmt: skip
        """Chunk c's pairs into their slots: expert start + earlier chunks' + earlier in this chunk."""
        pdl_begin(PDL)  # first: before any load or store (pdl.py)
        c = tl.program_id(0)
        pair, e = _chunk_experts(ids, c, n, num_experts, CHUNK)
        lanes = tl.arange(0, CHUNK)
        rank = tl.sum(((e[:, None] == e[None, :]) & (lanes[None, :] < lanes[:, None])).to(tl.int32), axis=1)
        safe = tl.where(e >= 0, e, 0)
        base = tl.load(expert_start + safe) + tl.load(chunk_base + c * E_POW2 + safe)
        tl.store(sorted_ids + base + rank, pair.to(tl.int32), mask=e >= 0)

    @triton.jit
    def _align_kernel(
        ids, sorted_ids, expert_ids, num_padded, cursor, n, num_experts, size, num_blocks,
        BLOCK: tl.constexpr, E_POW2: tl.constexpr, CHUNK: tl.constexpr, PDL: tl.constexpr,
    ):  # fmt: skip
        """One program: count pairs per expert, pad, fill the sentinel, name each block's expert,
        then place the pairs chunk by chunk (a pair's rank = earlier same-expert pairs in its chunk
        + the expert's cursor, kept in `cursor` between chunks)."""
        pdl_begin(PDL)  # first: before any load or store (pdl.py)
        experts = tl.arange(0, E_POW2)
        lanes = tl.arange(0, CHUNK)
        counts = tl.zeros([E_POW2], dtype=tl.int32)
        for start in range(0, n, CHUNK):
            e = tl.load(ids + start + lanes, mask=start + lanes < n, other=-1)
            e = tl.where((e >= 0) & (e < num_experts), e, -1)
            counts += tl.sum((e[:, None] == experts[None, :]).to(tl.int32), axis=0)
        for start in range(0, size, CHUNK):
            tl.store(
                sorted_ids + start + lanes, tl.zeros([CHUNK], dtype=tl.int32) + n, mask=start + lanes < size
            )
        tl.store(cursor + experts, _padded_layout(counts, expert_ids, num_padded, num_blocks, BLOCK, CHUNK))
        tl.debug_barrier()
        for start in range(0, n, CHUNK):
            pair = start + lanes
            e = tl.load(ids + pair, mask=pair < n, other=-1)
            e = tl.where((e >= 0) & (e < num_experts), e, -1)
            earlier = (e[:, None] == e[None, :]) & (lanes[None, :] < lanes[:, None])
            rank = tl.sum(earlier.to(tl.int32), axis=1)
            base = tl.load(cursor + tl.where(e >= 0, e, 0))
            tl.store(sorted_ids + base + rank, pair, mask=e >= 0)
            tl.debug_barrier()  # every lane has read its cursor before any is advanced
            tl.store(
                cursor + experts,
                tl.load(cursor + experts) + tl.sum((e[:, None] == experts[None, :]).to(tl.int32), axis=0),
            )
            tl.debug_barrier()

    @triton.jit
    def _block_rows(
        sorted_ids, expert_ids, num_padded, pairs, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr
    ):
        """This program's block: its pair rows, whether each is real, its expert (-1 for blocks past
        the used length) and its N tile."""
        pid = tl.program_id(0)
        num_n = tl.cdiv(N, BLOCK_N)
        pid_m, pid_n = pid // num_n, pid % num_n
        expert = tl.load(expert_ids + pid_m).to(tl.int64)
        expert = tl.where(pid_m * BLOCK_M < tl.load(num_padded), expert, -1)
        rows = tl.load(sorted_ids + pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        return rows, rows < pairs, expert, offs_n

    @triton.jit
    def _gate_up_grouped(
        x, w13, act, sorted_ids, expert_ids, num_padded, pairs, top_k, K, inter,
        stride_x, stride_we, stride_wn,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr,
    ):  # fmt: skip
        """act[rows, n-tile] = silu(x[rows // k] @ gate^T) * (x[rows // k] @ up^T) for the block's expert."""
        pdl_begin(PDL)  # first: before any load or store (pdl.py)
        rows, real, expert, offs_n = _block_rows(
            sorted_ids, expert_ids, num_padded, pairs, inter, BLOCK_M, BLOCK_N
        )
        if expert < 0:
            return
        n_mask = offs_n < inter
        offs_k = tl.arange(0, BLOCK_K)
        a_ptr = x + (rows // top_k)[:, None] * stride_x + offs_k[None, :]
        g_ptr = w13 + expert * stride_we + offs_n[None, :] * stride_wn + offs_k[:, None]  # [BK, BN]
        u_ptr = g_ptr + inter * stride_wn
        acc_g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        acc_u = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k_mask = offs_k < K - k0
            a = tl.load(a_ptr, mask=real[:, None] & k_mask[None, :], other=0.0)
            w_mask = k_mask[:, None] & n_mask[None, :]
            acc_g = tl.dot(a, tl.load(g_ptr, mask=w_mask, other=0.0), acc_g)
            acc_u = tl.dot(a, tl.load(u_ptr, mask=w_mask, other=0.0), acc_u)
            a_ptr += BLOCK_K
            g_ptr += BLOCK_K
            u_ptr += BLOCK_K
        out = (_silu(acc_g) * acc_u).to(act.dtype.element_ty)
        tl.store(act + rows[:, None] * inter + offs_n[None, :], out, mask=real[:, None] & n_mask[None, :])

    @triton.jit
    def _fp8_dot(a, w, w_scales, acc, UPCAST: tl.constexpr):
        """acc + (a @ w) with a [M, K] quantized per row here (K = one group: scale = row amax / 448)
        and w [K, N] FP8 with w_scales [N] (its blocks' scales for this K tile)."""
        a = a.to(tl.float32)
        a_scale = tl.maximum(tl.max(tl.abs(a), axis=1), 1e-10) / 448.0
        a = tl.clamp(a / a_scale[:, None], -448.0, 448.0)
        if UPCAST:  # the interpreter: exact activations, widened weights (module docstring)
            prod = tl.dot(a, w.to(tl.float32))
        else:
            prod = tl.dot(a.to(w.dtype), w)
        return acc + prod * a_scale[:, None] * w_scales[None, :]

    @triton.jit
    def _w13_grouped(
        x, w13, out, sorted_ids, expert_ids, num_padded, pairs, top_k, K, N,
        stride_x, stride_we, stride_wn, scale, stride_se, stride_sn, group_n, group_k,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, FP8: tl.constexpr,
        UPCAST: tl.constexpr, PDL: tl.constexpr,
    ):  # fmt: skip
        """out[rows, n-tile] = x[rows // k] @ w13[expert]^T over N = 2I (gate | up, no activation).
        FP8: w8a8 per K tile (_fp8_dot; BLOCK_K = group_k)."""
        pdl_begin(PDL)  # first: before any load or store (pdl.py)
        rows, real, expert, offs_n = _block_rows(
            sorted_ids, expert_ids, num_padded, pairs, N, BLOCK_M, BLOCK_N
        )
        if expert < 0:
            return
        n_mask = offs_n < N
        offs_k = tl.arange(0, BLOCK_K)
        a_ptr = x + (rows // top_k)[:, None] * stride_x + offs_k[None, :]
        w_ptr = w13 + expert * stride_we + offs_n[None, :] * stride_wn + offs_k[:, None]  # [BK, BN]
        s_ptr = scale + expert * stride_se + (offs_n // group_n) * stride_sn  # FP8: [BN] block scales
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k_mask = offs_k < K - k0
            a = tl.load(a_ptr, mask=real[:, None] & k_mask[None, :], other=0.0)
            w = tl.load(w_ptr, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
            if FP8:
                acc = _fp8_dot(a, w, tl.load(s_ptr + k0 // group_k, mask=n_mask, other=0.0), acc, UPCAST)
            else:
                acc = tl.dot(a, w, acc)
            a_ptr += BLOCK_K
            w_ptr += BLOCK_K
        mask = real[:, None] & n_mask[None, :]
        tl.store(out + rows[:, None] * N + offs_n[None, :], acc.to(out.dtype.element_ty), mask=mask)

    @triton.jit
    def _down_grouped(
        act, w2, out, sorted_ids, expert_ids, num_padded, weights, pairs, N, inter, top_k,
        stride_we, stride_wn, scale, stride_se, stride_sn, group_n, group_k,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SILU_IN_LOAD: tl.constexpr,
        FP8: tl.constexpr, UPCAST: tl.constexpr, COMBINE: tl.constexpr, PDL: tl.constexpr,
    ):  # fmt: skip
        """out[rows, n-tile] = weight[rows] * act[rows] @ w2[expert]^T (one row per pair). SILU_IN_LOAD:
        act rows are [gate | up] (2I wide) and silu(gate) * up is formed as each tile is loaded.
        FP8: w8a8 per K tile (_fp8_dot; BLOCK_K = group_k). COMBINE: out is [T, N] (zeroed) and each
        row is added into its token's row instead (atomics, in out's dtype: any order)."""
        pdl_begin(PDL)  # first: before any load or store (pdl.py)
        rows, real, expert, offs_n = _block_rows(
            sorted_ids, expert_ids, num_padded, pairs, N, BLOCK_M, BLOCK_N
        )
        if expert < 0:
            return
        n_mask = offs_n < N
        offs_k = tl.arange(0, BLOCK_K)
        a_ptr = act + rows[:, None] * (2 * inter if SILU_IN_LOAD else inter) + offs_k[None, :]
        w_ptr = w2 + expert * stride_we + offs_n[None, :] * stride_wn + offs_k[:, None]  # [BK, BN]
        s_ptr = scale + expert * stride_se + (offs_n // group_n) * stride_sn  # FP8: [BN] block scales
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, inter, BLOCK_K):
            k_mask = offs_k < inter - k0
            a_mask = real[:, None] & k_mask[None, :]
            if SILU_IN_LOAD:
                g = tl.load(a_ptr, mask=a_mask, other=0.0).to(tl.float32)
                u = tl.load(a_ptr + inter, mask=a_mask, other=0.0).to(tl.float32)
                a = (_silu(g) * u).to(act.dtype.element_ty)
            else:
                a = tl.load(a_ptr, mask=a_mask, other=0.0)
            w = tl.load(w_ptr, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
            if FP8:
                acc = _fp8_dot(a, w, tl.load(s_ptr + k0 // group_k, mask=n_mask, other=0.0), acc, UPCAST)
            else:
                acc = tl.dot(a, w, acc)
            a_ptr += BLOCK_K
            w_ptr += BLOCK_K
        acc *= tl.load(weights + rows, mask=real, other=0.0)[:, None]
        mask = real[:, None] & n_mask[None, :]
        if COMBINE:
            dst = out + (rows // top_k)[:, None] * N + offs_n[None, :]
            tl.atomic_add(dst, acc.to(out.dtype.element_ty), mask=mask, sem="relaxed")
        else:
            tl.store(out + rows[:, None] * N + offs_n[None, :], acc.to(out.dtype.element_ty), mask=mask)
