"""Token -> expert alignment and the plain-torch grouped expert computation.

`moe_align_block_size` lays the routed (token, slot) pairs out the way the Triton kernel
(common/models/fused_moe.py) reads them: grouped by expert, each expert's group padded to a
multiple of the block size, one expert per block. It runs on the device with static output shapes
and no host sync, so a CUDA graph can capture it. `grouped_experts` is the torch reference that
consumes exactly that layout (gather a block's rows, one batched matmul per block), so the CPU
tests exercise the same indexing the GPU kernel uses.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from disagg.common.models.kernels import silu_and_mul


class ExpertScales(NamedTuple):
    """The block scales of FP8 experts (DeepSeek-V3's checkpoint format): w13 / w2 hold float8_e4m3fn
    values and expert e's weight is w[e] * scale[e] per [block_n, block_k] block."""

    w13: torch.Tensor  # [E, ceil(2I / bn), ceil(H / bk)] float32
    w2: torch.Tensor  # [E, ceil(H / bn), ceil(I / bk)] float32
    block: tuple[int, int]  # [block_n, block_k]


def dequantize_experts(w: torch.Tensor, scale: torch.Tensor, block: tuple[int, int], dtype) -> torch.Tensor:
    """[n, N, K] FP8 expert weights and their [n, ceil(N/bn), ceil(K/bk)] scales -> [n, N, K] in dtype."""
    full = scale.repeat_interleave(block[0], 1).repeat_interleave(block[1], 2)
    return (w.to(dtype) * full[:, : w.shape[1], : w.shape[2]].to(dtype)).to(dtype)


def max_padded_pairs(num_pairs: int, num_experts: int, block_size: int) -> int:
    """Static bound on the aligned length: each touched expert pads at most block_size - 1 slots,
    and at most min(num_pairs, num_experts) experts are touched."""
    bound = num_pairs + min(num_pairs, num_experts) * (block_size - 1)
    return (bound + block_size - 1) // block_size * block_size


def expert_keys(topk_ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each flat pair's local expert (num_experts: another rank's) [n] int64, and the pairs per key
    [num_experts + 1] int64, on the device without a host sync."""
    flat = topk_ids.flatten().long()
    key = torch.where((flat >= 0) & (flat < num_experts), flat, num_experts)
    # NOTE: scatter_add_ rather than bincount: bincount on CUDA reads its max back to the host
    counts = torch.zeros(num_experts + 1, dtype=torch.long, device=topk_ids.device)
    counts.scatter_add_(0, key, torch.ones_like(key))
    return key, counts


def moe_align_block_size(
    topk_ids: torch.Tensor, num_experts: int, block_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group the flat pairs p = token * k + slot by expert, padded per expert to block_size.

    topk_ids: [T, k] local expert ids; an id outside [0, num_experts) (another rank's expert) is
    left out. Returns, all int32 on topk_ids' device:
      sorted_ids [max_padded]: pair indices, expert by expert (stable: ascending p within an expert);
        padding slots hold the sentinel T * k
      expert_ids [max_padded // block_size]: the expert of each block; -1 for blocks past the end
      num_padded [1]: the used length (a multiple of block_size)
    """
    n, device = topk_ids.numel(), topk_ids.device
    key, counts = expert_keys(topk_ids, num_experts)
    padded = (counts[:num_experts] + block_size - 1) // block_size * block_size
    padded_end = padded.cumsum(0)  # [E]
    padded_start = padded_end - padded
    group_start = counts.cumsum(0) - counts  # [E + 1], unpadded
    order = torch.argsort(key, stable=True)  # pairs grouped by expert, ascending within a group
    sorted_key = key[order]
    rank = torch.arange(n, device=device) - group_start[sorted_key]
    size = max_padded_pairs(n, num_experts, block_size)
    ours = sorted_key < num_experts
    dest = torch.where(ours, padded_start[sorted_key.clamp(max=num_experts - 1)] + rank, size)
    sorted_ids = torch.full((size + 1,), n, dtype=torch.int32, device=device)
    sorted_ids.scatter_(0, dest, order.to(torch.int32))  # other ranks' pairs all land in the spare slot
    block_start = torch.arange(0, size, block_size, device=device)
    expert_ids = torch.searchsorted(padded_end, block_start, right=True)  # first expert ending past it
    expert_ids = torch.where(expert_ids < num_experts, expert_ids, -1).to(torch.int32)
    return sorted_ids[:size], expert_ids, padded_end[-1:].to(torch.int32)


def grouped_experts(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    block_size: int = 16,
    trim: bool = True,
    scales: ExpertScales | None = None,
) -> torch.Tensor:
    """sum_slot weight * w2[e] @ (silu(w13[e, :I] @ x) * (w13[e, I:] @ x)) over the routed local experts.

    x: [T, H]; w13: [E, 2I, H] (gate | up); w2: [E, H, I]; topk_weights, topk_ids: [T, k].
    Only the routed experts' weights are read: each block gathers its one expert. trim=True cuts
    the static layout to the used blocks (one host read); a CUDA graph capture needs trim=False.
    scales: w13 / w2 are FP8 and each block's expert is dequantized (in x's dtype) after the gather:
    the math of the FP8 kernels with exact activations (the CPU path and the kernels' reference).
    """
    num_tokens, k = topk_ids.shape
    n = num_tokens * k
    sorted_ids, expert_ids, num_padded = moe_align_block_size(topk_ids, w13.shape[0], block_size)
    if trim:
        used = int(num_padded.item())
        sorted_ids, expert_ids = sorted_ids[:used], expert_ids[: used // block_size]
    pairs = sorted_ids.view(-1, block_size).long()  # [blocks, B]
    real = pairs < n
    token = torch.where(real, pairs // k, 0)
    expert = expert_ids.clamp(min=0).long()
    w_up, w_down = w13[expert], w2[expert]  # [blocks, 2I, H], [blocks, H, I]
    if scales is not None:
        w_up = dequantize_experts(w_up, scales.w13[expert], scales.block, x.dtype)
        w_down = dequantize_experts(w_down, scales.w2[expert], scales.block, x.dtype)
    gate, up = torch.bmm(x[token], w_up.transpose(1, 2)).chunk(2, dim=-1)  # [blocks, B, I] each
    y = torch.bmm(F.silu(gate) * up, w_down.transpose(1, 2))  # [blocks, B, H]
    weight = torch.where(real, topk_weights.flatten()[pairs.clamp(max=n - 1)], 0).to(y.dtype)
    out = torch.zeros(num_tokens + 1, x.shape[1], dtype=x.dtype, device=x.device)  # last row: padding
    out.index_add_(0, torch.where(real, token, num_tokens).flatten(), (y * weight[..., None]).flatten(0, 1))
    return out[:num_tokens]


def grouped_mm_experts(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    foreign: bool = True,
) -> torch.Tensor:
    """grouped_experts' result through torch's grouped GEMM (`torch._grouped_mm`: CUTLASS on Hopper,
    a loop of matmuls elsewhere): the pairs sorted by expert, one GEMM per weight over all groups
    (the group boundaries stay on the device: no host sync). bf16/float32 weights only (no scales).
    Prefill-sized batches: each expert's rows form one group, no padding to a block.
    foreign=False: every id is in [0, E) (no expert parallelism), so no output row needs masking."""
    num_tokens, k = topk_ids.shape
    num_experts = w13.shape[0]
    key, counts = expert_keys(topk_ids, num_experts)
    order = torch.argsort(key, stable=True)
    offs = counts[:num_experts].cumsum(0, dtype=torch.int32)  # group ends; other ranks' pairs after the last
    h = torch._grouped_mm(x[order // k], w13.transpose(1, 2), offs=offs)  # [n, 2I], expert by expert
    y = torch._grouped_mm(silu_and_mul(h), w2.transpose(1, 2), offs=offs)  # [n, H]
    if foreign:  # rows past the last group (other ranks' experts) are never written by the GEMM
        y = torch.where((key[order] < num_experts)[:, None], y, 0)
    # back to pair order by a gather (cheaper than scattering y), then each token's k rows weighted
    # and summed in one batched product (fp32 accumulation)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    per_pair = y.index_select(0, inverse).view(num_tokens, k, -1)
    out = torch.bmm(topk_weights.to(y.dtype).view(num_tokens, 1, k), per_pair)
    return out.view(num_tokens, -1).to(x.dtype)
