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

Loading (weights.py) never makes a 16/32-bit copy of a weight that stays FP8: while the model is
built (`deferred_fp8_weights`) the linears' and experts' weights take no memory; `quantize_linears`
and moe.quantize_experts then give them empty FP8 blocks + scales, and the loader copies each
checkpoint tensor's FP8 values and scales straight in (`Fp8Tensor`: each rank reads only its
slice, which must be whole blocks). Where FP8 is not kept, `Fp8Tensor.dequantize_into` writes the
rank's slice into the dense parameter one block row at a time. MLA's kv_b_proj stays in the model
dtype (the absorbed decode slices its weight per head). The MoE experts take the same block layout
in moe.py (the fused FP8 kernels of fused_moe.py).
"""

from __future__ import annotations

import functools
from contextlib import contextmanager

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
    """Give each FP8 linear float8_e4m3fn block weights and `weight_scale_inv` (on its device): a
    weight not allocated yet (deferred_fp8_weights) gets empty ones for the loader to fill, a dense
    one is quantized and freed layer by layer. Returns how many layers were converted."""
    layers = fp8_linear_modules(model)
    for _, m in layers:
        if is_unallocated(m.weight):
            q, scale = empty_fp8_blocks(m.weight.shape, block, m.weight.device)
        else:
            q, scale = quantize_weight_blocks(m.weight.data, block)
        m.weight = nn.Parameter(q, requires_grad=False)
        m.weight_scale_inv = nn.Parameter(scale, requires_grad=False)
        m.fp8_block, m.fp8_backend = block, backend
    return len(layers)


def empty_fp8_blocks(shape, block: tuple[int, int], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Uninitialised FP8 values [..., N, K] and float32 scales [..., ceil(N/bn), ceil(K/bk)]."""
    *lead, n, k = shape
    scale_shape = (*lead, -(-n // block[0]), -(-k // block[1]))
    return (
        torch.empty(shape, dtype=FP8_DTYPE, device=device),
        torch.empty(scale_shape, dtype=torch.float32, device=device),
    )


# ---- loading without a 16/32-bit copy ----------------------------------------------------------------


def is_unallocated(p: torch.Tensor) -> bool:
    """A weight deferred_fp8_weights created: its shape, dtype and device, but no bytes yet."""
    return getattr(p, "unallocated", False)


def unallocated_like(p: torch.Tensor, device) -> nn.Parameter:
    """A parameter of p's shape and dtype on `device` that holds no memory (one element, expanded):
    code that reads a weight's device or dtype while the model is built sees the real ones, and
    writing into it before load_weights allocates it fails loudly."""
    out = nn.Parameter(torch.empty((), dtype=p.dtype, device=device).expand(p.shape), requires_grad=False)
    out.unallocated = True
    return out


def _deferring(init, device):
    @functools.wraps(init)
    def build(self, *args, **kwargs):
        with torch.device("meta"):
            init(self, *args, **kwargs)
        for name, p in list(self.named_parameters(recurse=False)):
            if p.is_meta:
                setattr(self, name, unallocated_like(p, device))

    return build


@contextmanager
def deferred_fp8_weights(config, device: torch.device, backend: str | None = None):
    """Build the model inside this: where the weights stay FP8 (`backend`, default fp8_gemm_backend),
    every TP linear's and MoE expert stack's parameters are created unallocated (no 16/32-bit copy
    of them ever exists); load_weights gives the FP8 ones their block layout and the others their
    dense bytes. A no-op elsewhere. NOTE: patches those classes' __init__ while inside (model
    building is single-threaded) and restores them on exit."""
    if fp8_block_size(config) is None or (backend or fp8_gemm_backend(device)) is None:
        yield
        return
    from disagg.common.models.layers import ColumnParallelLinear, RowParallelLinear
    from disagg.common.models.moe import Experts

    classes = (ColumnParallelLinear, RowParallelLinear, Experts)
    inits = [cls.__init__ for cls in classes]
    for cls, init in zip(classes, inits, strict=True):
        cls.__init__ = _deferring(init, device)
    try:
        yield
    finally:
        for cls, init in zip(classes, inits, strict=True):
            cls.__init__ = init


def _span(index: slice, dim: int) -> tuple[int, int]:
    start, stop, step = index.indices(dim)
    if step != 1:
        raise ValueError("strided weight slices are not supported")
    return start, stop


def block_index(index: tuple, shape, block: tuple[int, int], what: str) -> tuple:
    """The index of the scale blocks covering `index` (ints and slices over `shape`, the last two
    dims blocked); ValueError naming `what` if a slice cuts a block (its start, or its end short of
    the dim's end, not on the block grid)."""
    index = tuple(index) + (slice(None),) * (len(shape) - len(index))
    lead = len(shape) - 2
    out = list(index[:lead])
    for d, (ix, b) in enumerate(zip(index[lead:], block, strict=True)):
        dim = shape[lead + d]
        start, stop = _span(ix, dim)
        if start % b or (stop % b and stop != dim):
            raise ValueError(
                f"FP8 {what}: {'rows' if d == 0 else 'columns'} [{start}, {stop}) of {dim} cut its "
                f"{list(block)} blocks; choose --tp/--ep so that each rank's share is whole blocks, or "
                f"dequantize with DISAGG_FP8_GEMM=off"
            )
        out.append(slice(start // b, -(-stop // b)))
    return tuple(out)


class Fp8Tensor:
    """A checkpoint's FP8 weight [N, K] (a safetensors slice: only what is indexed is read) and its
    float32 `weight_scale_inv` [ceil(N/bn), ceil(K/bk)]."""

    def __init__(self, name: str, values, scale: torch.Tensor, block: tuple[int, int]):
        self.name, self.values, self.scale, self.block = name, values, scale.float(), block
        self.shape = tuple(values.get_shape())

    def get_shape(self) -> list[int]:
        return list(self.shape)

    def copy_fp8_into(self, dst: torch.Tensor, dst_scale: torch.Tensor, index: tuple = ()) -> None:
        """dst, dst_scale = the FP8 values and scales of `index` (whole blocks), as stored."""
        scale_index = block_index(index, self.shape, self.block, f"checkpoint tensor {self.name}")
        dst.copy_(self.values[_full(index, self.shape)])
        dst_scale.copy_(self.scale[scale_index])

    def dequantize_into(self, dst: torch.Tensor, index: tuple = ()) -> None:
        """dst = the values of `index` (any rows/columns), dequantized one block row at a time: the
        only full-size temporary is the FP8 slice (1 byte a value)."""
        (r0, r1), (c0, c1) = self._spans(index)
        q = self.values[r0:r1, c0:c1]
        bn, bk = self.block
        for row in range(r0 - r0 % bn, r1, bn):
            lo, hi = max(row, r0) - r0, min(row + bn, r1) - r0
            scale = self.scale[row // bn, c0 // bk : -(-c1 // bk)].repeat_interleave(bk)
            dst[lo:hi].copy_(q[lo:hi].float() * scale[c0 % bk : c0 % bk + c1 - c0])

    def __getitem__(self, index) -> torch.Tensor:
        """The values of `index`, dequantized to float32 (readers that take a plain tensor)."""
        index = index if isinstance(index, tuple) else (index,)
        (r0, r1), (c0, c1) = self._spans(index)
        out = torch.empty(r1 - r0, c1 - c0)
        self.dequantize_into(out, index)
        return out

    def _spans(self, index: tuple) -> list[tuple[int, int]]:
        return [_span(ix, dim) for ix, dim in zip(_full(index, self.shape), self.shape, strict=True)]


def _full(index: tuple, shape) -> tuple:
    return tuple(index) + (slice(None),) * (len(shape) - len(index))
