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

This is the "normal" (prefill) mode of DeepEP's split: the send counts are read on the host to
size the receive buffers, so it does not run inside a CUDA graph; the model falls back to the
`none` layout while capturing.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from disagg.common.parallel.state import attn_tp_group, get_parallel


def _exchange(send: torch.Tensor, send_counts: list[int], recv_counts: list[int], group) -> torch.Tensor:
    recv = send.new_empty((sum(recv_counts), *send.shape[1:]))
    dist.all_to_all_single(recv, send.contiguous(), recv_counts, send_counts, group=group)
    return recv


def a2a_moe(moe, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The MoE output for all T tokens on every rank. x: [T, H]; ids: [T, k] global expert ids;
    weights: [T, k]. `moe.routed_experts(rows, local_ids, weights)` runs this rank's experts."""
    ps, holders = get_parallel(), attn_tp_group()  # the ranks holding these same tokens
    ranks, group = ps.ep_size, ps.group
    num_tokens, k = ids.shape
    per = -(-num_tokens // holders.size)  # slice length; the last slices may be short or empty
    lo, hi = min(holders.rank * per, num_tokens), min((holders.rank + 1) * per, num_tokens)
    # 1. dispatch: this slice's pairs, grouped by the rank that owns their expert
    pair_expert = ids[lo:hi].flatten()
    dest = pair_expert // moe.num_local
    order = torch.argsort(dest, stable=True)
    send_counts = torch.bincount(dest, minlength=ranks)
    recv_counts = torch.empty_like(send_counts)
    dist.all_to_all_single(recv_counts, send_counts, group=group)
    sends, recvs = send_counts.tolist(), recv_counts.tolist()
    rows = _exchange(x[lo:hi][order // k], sends, recvs, group)  # [R, H]
    # expert (local to the receiver) and routing weight of each pair, exact in float32 for < 2^24 experts
    meta = torch.stack(
        [(pair_expert[order] % moe.num_local).float(), weights[lo:hi].flatten()[order].float()], 1
    )
    meta = _exchange(meta, sends, recvs, group)
    # 2. this rank's experts on the received pairs (one slot each)
    y = moe.routed_experts(rows, meta[:, :1].long(), meta[:, 1:])
    # 3. combine: results back to the slice owner, summed per token
    back = _exchange(y, recvs, sends, group)
    mine = torch.zeros(per, x.shape[1], dtype=x.dtype, device=x.device)
    mine.index_add_(0, order // k, back)
    if holders.size == 1:
        return mine
    slices = [torch.empty_like(mine) for _ in range(holders.size)]
    dist.all_gather(slices, mine, group=holders.group)
    return torch.cat(slices)[:num_tokens]
