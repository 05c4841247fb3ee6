"""FP8 block-quantized linear layers (DeepSeek-V3's checkpoint format, `quantization_config` fp8).

A weight W [N, K] is stored as float8_e4m3fn values Wq and one float32 `weight_scale_inv` per
[block_n, block_k] block (W = Wq * scale_inv, block by block). A GEMM quantizes its activations
on the fly, one float32 scale per token per group of block_k input values, then multiplies the FP8
operands and applies both scales per K-block inside the accumulation (SGLang's and vLLM's
`w8a8_block_fp8_matmul` scheme).

Where it runs:
  - CUDA with compute capability >= 9.0 (Hopper) and Triton: the Triton kernels below (FP8 tensor cores);
  - elsewhere the weights are dequantized at load (weights.py) and the layers are plain matmuls;
  - DISAGG_FP8_GEMM=torch: the same block-scaled math in torch on any device (tests, CPU).

The runtime layout is made after the weights are loaded (`quantize_linears`): each rank quantizes
its own shard in blocks aligned to that shard, so any TP split works. MLA's kv_b_proj stays in the
model dtype (the absorbed decode slices its weight per head). The MoE experts take the same
block layout in moe.py (`quantize_experts`, the fused FP8 kernels of fused_moe.py).
"""

from __future__ import annotations

import torch
from disagg.common.config import fp8_gemm_mode
from torch import nn

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite float8_e4m3fn
_EPS = 1e-10  # smallest amax a scale is taken from (an all-zero block stays zero)
KEEP_DTYPE = ("kv_b_proj",)  # modules whose weight other code reads as a dense matrix


def fp8_block_size(config) -> tuple[int, int] | None:
    """[block_n, block_k] of an FP8 block-quantized checkpoint's config, else None."""
    quant = getattr(config, "quantization_config", None) or {}
    if not isinstance(quant, dict):
        quant = quant.to_dict()
    if quant.get("quant_method") != "fp8":
        return None
    block = quant.get("weight_block_size")
    if not block:
        raise ValueError("fp8 quantization_config without weight_block_size (per-tensor FP8): not supported")
    return int(block[0]), int(block[1])


def fp8_gemm_backend(device: torch.device) -> str | None:
    """'triton' (Hopper), 'torch' (DISAGG_FP8_GEMM=torch) or None: dequantize at load."""
    mode = fp8_gemm_mode()
    if mode == "off":
        return None
    if mode == "torch":
        return "torch"
    if device.type != "cuda" or torch.cuda.get_device_capability(device) < (9, 0):
        return None
    from disagg.common.models.fp8_kernels import triton_available

    return "triton" if triton_available() else None


# ---- the math, in torch (reference and CPU path) -------------------------------------------------


def _pad_to(x: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    if x.shape == (rows, cols):
        return x
    out = x.new_zeros(rows, cols)
    out[: x.shape[0], : x.shape[1]] = x
    return out


def quantize_weight_blocks(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] -> (float8_e4m3fn [N, K], float32 scale_inv [ceil(N/bn), ceil(K/bk)]); each block's
    largest |value| maps to 448."""
    bn, bk = block
    n, k = w.shape
    rows, cols = -(-n // bn), -(-k // bk)
    blocks = _pad_to(w.float(), rows * bn, cols * bk).view(rows, bn, cols, bk)
    scale = blocks.abs().amax(dim=(1, 3)).clamp(min=_EPS) / FP8_MAX
    q = (blocks / scale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).view(rows * bn, cols * bk)
    return q[:n, :k].to(FP8_DTYPE).contiguous(), scale


def expand_block_scales(scale: torch.Tensor, block: tuple[int, int], shape) -> torch.Tensor:
    """One scale per element: [ceil(N/bn), ceil(K/bk)] -> [N, K]."""
    full = scale.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)
    return full[: shape[0], : shape[1]]


def dequantize_weight_blocks(
    q: torch.Tensor, scale: torch.Tensor, block: tuple[int, int], dtype=torch.float32
) -> torch.Tensor:
    return (q.float() * expand_block_scales(scale.float(), block, q.shape)).to(dtype)


def quantize_activation_groups(x: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (float8_e4m3fn [M, K], float32 scales [M, ceil(K/group)]): per token, per group of
    `group` input values (the K-block of the weight)."""
    m, k = x.shape
    groups = -(-k // group)
    g = _pad_to(x.float(), m, groups * group).view(m, groups, group)
    scale = g.abs().amax(dim=-1).clamp(min=_EPS) / FP8_MAX
    q = (g / scale[..., None]).clamp(-FP8_MAX, FP8_MAX).view(m, groups * group)[:, :k]
    return q.to(FP8_DTYPE).contiguous(), scale


def block_fp8_matmul_torch(
    xq: torch.Tensor, xs: torch.Tensor, wq: torch.Tensor, ws: torch.Tensor, block, out_dtype
) -> torch.Tensor:
    """(xq * xs) @ (wq * ws)^T in float32: what the kernel computes, up to summation order."""
    x = xq.float() * xs.repeat_interleave(block[1], 1)[:, : xq.shape[1]]
    return (x @ dequantize_weight_blocks(wq, ws, block).T).to(out_dtype)


# ---- the layers ------------------------------------------------------------------------------------


def fp8_linear(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """x [..., K] @ W^T for a layer quantize_linears converted (no bias: the caller adds it)."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    block, w, ws = layer.fp8_block, layer.weight, layer.weight_scale_inv
    if layer.fp8_backend == "triton":
        from disagg.common.models.fp8_kernels import block_fp8_matmul, quantize_activation_groups_triton

        xq, xs = quantize_activation_groups_triton(x2, block[1])
        out = block_fp8_matmul(xq, xs, w, ws, block, x.dtype)
    else:
        xq, xs = quantize_activation_groups(x2, block[1])
        out = block_fp8_matmul_torch(xq, xs, w, ws, block, x.dtype)
    return out.view(*shape[:-1], w.shape[0])


def fp8_linear_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The linear layers an FP8 checkpoint quantizes: every TP linear but KEEP_DTYPE's (not the
    router, the embeddings, the LM head or the MoE experts, which are no such layers)."""
    from disagg.common.models.layers import ColumnParallelLinear, RowParallelLinear

    return [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, (ColumnParallelLinear, RowParallelLinear)) and not name.endswith(KEEP_DTYPE)
    ]


@torch.no_grad()
def quantize_linears(model: nn.Module, block: tuple[int, int], backend: str) -> int:
    """Replace each FP8 linear's weight by float8_e4m3fn blocks and `weight_scale_inv` (on its device);
    returns how many layers were converted. The dense weight is freed layer by layer."""
    layers = fp8_linear_modules(model)
    for _, m in layers:
        q, scale = quantize_weight_blocks(m.weight.data, block)
        m.weight = nn.Parameter(q, requires_grad=False)
        m.weight_scale_inv = nn.Parameter(scale, requires_grad=False)
        m.fp8_block, m.fp8_backend = block, backend
    return len(layers)
