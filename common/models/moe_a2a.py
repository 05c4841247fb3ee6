"""All-to-all expert parallelism (`--moe-a2a-backend all_to_all`): each token goes only to the EP
ranks that hold its experts, and back.

Layout: --tp N --ep N (one whole expert set per rank, E / N experts each). The tokens a rank
dispatches are its share of the tokens its attention group holds: under tensor-parallel attention
every rank holds every token, so rank r takes the r-th 1/N slice, sends each of its (token, slot)
pairs to the rank owning that expert, the owners run their experts on what they received, send the
results back, rank r combines its slice, and an all-gather of the slices replaces the all-reduce of
the `none` backend. With DP attention (common/parallel/dp_attention.py) each attention group
of A ranks holds its own DP rank's tokens: the slices are 1/A of those (A == 1: all of them, and
no all-gather at all).

Two exchange modes, as DeepEP distinguishes them (`--deepep-mode`, SGLang's flag):

- normal (prefill): the pairs are sent packed, so the send counts are exchanged first and read on
  the host to size the receive buffers. Fewest bytes, but a host sync: no CUDA graph.
- low_latency (decode): fixed-size buffers, no size exchange. Each rank sends every rank a block of
  `capacity` rows (the largest slice any rank holds this step, known everywhere without asking:
  the batch shape, or the DP plan's sizes), each row a token with its k (local expert, weight)
  pairs, the pairs of experts the receiver does not hold masked out (weight 0, out-of-range id).
  The receiver runs its experts on the block and sends one partial sum per row back; the sender
  adds the N partials. Static shapes and no `.item()`: a decode step can be captured in a CUDA graph.
- auto: low_latency for decode batches (every attention group's batch one token per request, and
  inside a CUDA graph capture), normal otherwise.

Under `normal`, a CUDA graph capture falls back to the `none` layout (SparseMoE.uses_all_to_all).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from disagg.common.parallel.state import attn_tp_group, get_parallel

DEEPEP_MODES = ("auto", "normal", "low_latency")


@dataclass
class ForwardShape:
    """What every rank of the TP group knows about this forward without communicating."""

    decode: bool = False  # every attention group's batch is decode-only (auto: low latency)
    max_tokens: int | None = None  # DP attention: the largest DP rank's tokens; None: this batch's


_FORWARD = ForwardShape()


def set_forward_shape(decode: bool, max_tokens: int | None = None) -> None:
    """Before the layers of each forward (decoder.CausalLM.run_layers): every rank must pick the same
    exchange mode and buffer size, so both come from what all ranks share (the plan)."""
    global _FORWARD
    _FORWARD = ForwardShape(decode, max_tokens)


def capturing(x: torch.Tensor) -> bool:
    return x.is_cuda and torch.cuda.is_current_stream_capturing()


def uses_low_latency(mode: str, x: torch.Tensor) -> bool:
    """The exchange mode of this forward under `--deepep-mode mode`."""
    if get_parallel().attn_dp_size > 1 and _FORWARD.max_tokens is None:
        return False  # DP attention without every DP rank's sizes (e.g. a warm-up): they may differ
    if mode == "low_latency":
        return True
    if mode == "normal":
        return False
    return _FORWARD.decode or capturing(x)


def a2a_moe(moe, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The MoE output for all T tokens on every rank. x: [T, H]; ids: [T, k] global (physical) expert
    ids; weights: [T, k]. `moe.routed_experts(rows, local_ids, weights)` runs this rank's experts;
    `moe.a2a_mode` is its --deepep-mode."""
    holders = attn_tp_group()  # the ranks holding these same tokens
    num_tokens = ids.shape[0]
    per = -(-num_tokens // holders.size)  # slice length; the last slices may be short or empty
    lo, hi = min(holders.rank * per, num_tokens), min((holders.rank + 1) * per, num_tokens)
    if uses_low_latency(moe.a2a_mode, x):
        cap = ll_capacity(num_tokens, holders.size)
        mine = _low_latency(moe, x[lo:hi], ids[lo:hi], weights[lo:hi], per, cap)
    else:
        mine = _normal(moe, x[lo:hi], ids[lo:hi], weights[lo:hi], per)
    if holders.size == 1:
        return mine
    slices = [torch.empty_like(mine) for _ in range(holders.size)]
    dist.all_gather(slices, mine, group=holders.group)
    return torch.cat(slices)[:num_tokens]


# ---- normal: packed pairs, sizes exchanged ------------------------------------------------------


def _exchange(send: torch.Tensor, send_counts: list[int], recv_counts: list[int], group) -> torch.Tensor:
    recv = send.new_empty((sum(recv_counts), *send.shape[1:]))
    dist.all_to_all_single(recv, send.contiguous(), recv_counts, send_counts, group=group)
    return recv


def _normal(moe, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, per: int) -> torch.Tensor:
    """This slice's MoE output [per, H] (rows past the slice: zeros). x: [S, H], ids/weights: [S, k]."""
    ps = get_parallel()
    ranks, group, k = ps.ep_size, ps.group, ids.shape[1]
    # 1. dispatch: the slice's pairs, grouped by the rank that owns their expert
    pair_expert = ids.flatten()
    dest = pair_expert // moe.num_local
    order = torch.argsort(dest, stable=True)
    send_counts = torch.bincount(dest, minlength=ranks)
    recv_counts = torch.empty_like(send_counts)
    dist.all_to_all_single(recv_counts, send_counts, group=group)
    sends, recvs = send_counts.tolist(), recv_counts.tolist()  # NOTE: the host sync low_latency avoids
    rows = _exchange(x[order // k], sends, recvs, group)  # [R, H]
    # expert (local to the receiver) and routing weight of each pair, exact in float32 for < 2^24 experts
    meta = torch.stack([(pair_expert[order] % moe.num_local).float(), weights.flatten()[order].float()], 1)
    meta = _exchange(meta, sends, recvs, group)
    # 2. this rank's experts on the received pairs (one slot each)
    y = moe.routed_experts(rows, meta[:, :1].long(), meta[:, 1:])
    # 3. combine: results back to the slice owner, summed per token
    back = _exchange(y, recvs, sends, group)
    mine = torch.zeros(per, x.shape[1], dtype=x.dtype, device=x.device)
    mine.index_add_(0, order // k, back)
    return mine


# ---- low latency: fixed-size blocks, no size exchange -------------------------------------------


def ll_capacity(num_tokens: int, holders: int) -> int:
    """Rows each rank sends every rank: the largest slice of any rank this forward (>= 1). Under
    TP attention every rank holds the same num_tokens; under DP attention the plan says the most."""
    most = _FORWARD.max_tokens if _FORWARD.max_tokens is not None else num_tokens
    return max(1, -(-most // holders))


def _low_latency(
    moe, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, per: int, cap: int
) -> torch.Tensor:
    """Same contract as _normal, with static shapes: [ranks * cap, H] each way (cap >= per)."""
    ps = get_parallel()
    ranks, group = ps.ep_size, ps.group
    (n, k), hidden = ids.shape, x.shape[1]
    # 1. the slice padded to `cap` rows; padding rows route nowhere (id -1)
    rows = x.new_zeros(cap, hidden)
    rows[:n] = x
    slot_ids = ids.new_full((cap, k), -1)
    slot_ids[:n] = ids
    slot_w = weights.new_zeros(cap, k, dtype=torch.float32)
    slot_w[:n] = weights
    # the receiver's local expert of each pair, per destination rank; not its expert: id num_local
    # (out of range, skipped by the expert kernels) and weight 0
    first = torch.arange(ranks, device=ids.device).view(ranks, 1, 1) * moe.num_local
    local = slot_ids.unsqueeze(0) - first  # [ranks, cap, k]
    held = (local >= 0) & (local < moe.num_local)
    meta = torch.cat([torch.where(held, local, moe.num_local).float(), torch.where(held, slot_w, 0.0)], dim=2)
    # 2. dispatch: every rank gets the whole padded slice with its own pairs (equal splits)
    recv_rows = torch.empty(ranks * cap, hidden, dtype=x.dtype, device=x.device)
    dist.all_to_all_single(recv_rows, rows.repeat(ranks, 1), group=group)
    recv_meta = torch.empty(ranks * cap, 2 * k, dtype=torch.float32, device=x.device)
    dist.all_to_all_single(recv_meta, meta.reshape(ranks * cap, 2 * k), group=group)
    # 3. this rank's experts on every received row: one partial sum per (source rank, row)
    y = moe.routed_experts(recv_rows, recv_meta[:, :k].long(), recv_meta[:, k:])
    # 4. combine: the partials back to their sender, summed over the ranks that computed them
    back = torch.empty_like(y)
    dist.all_to_all_single(back, y, group=group)
    return back.view(ranks, cap, hidden).sum(0)[:per]
