"""Tensor/expert-parallel state of this process and its collectives.

One process per rank. With tp == 1 every collective is a no-op, so single-process code pays
nothing. Activations travel only through these process groups (NCCL on GPU, gloo on CPU).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class ParallelState:
    tp_rank: int = 0
    tp_size: int = 1
    ep_rank: int = 0
    ep_size: int = 1
    group: object | None = None  # the TP process group (None: the default world group)
    # DP attention (--enable-dp-attention): the tp ranks form attn_dp_size groups of attn_tp_size
    # ranks, each running attention over its own requests (common/parallel/dp_attention.py)
    attn_dp_size: int = 1
    attn_group: object | None = None  # this rank's attention TP group (None while attn_tp_size == 1)

    @property
    def attn_tp_size(self) -> int:
        return self.tp_size // self.attn_dp_size

    @property
    def attn_tp_rank(self) -> int:
        return self.tp_rank % self.attn_tp_size

    @property
    def attn_dp_rank(self) -> int:
        return self.tp_rank // self.attn_tp_size

    cpu_group: object | None = None  # gloo group for control broadcasts (every rank of the engine)
    pp_rank: int = 0  # pipeline stage of this rank (common/parallel/pipeline.py)
    pp_size: int = 1

    @property
    def rank(self) -> int:
        """This rank in the engine's world (stage-major: stage s holds ranks [s * tp, (s + 1) * tp))."""
        return self.pp_rank * self.tp_size + self.tp_rank

    @property
    def world_size(self) -> int:
        return self.pp_size * self.tp_size


@dataclass(frozen=True)
class TPGroup:
    """The ranks one layer is split over: this rank's index among them, how many, their process group."""

    rank: int
    size: int
    group: object | None


_STATE = ParallelState()


def get_parallel() -> ParallelState:
    return _STATE


def set_parallel(state: ParallelState) -> None:
    global _STATE
    _STATE = state


def tp_group() -> TPGroup:
    return TPGroup(_STATE.tp_rank, _STATE.tp_size, _STATE.group)


def attn_tp_group() -> TPGroup:
    """The ranks attention (and the embedding) is split over: the TP group, or with DP attention
    the tp / dp ranks that share one DP rank's requests."""
    if _STATE.attn_dp_size == 1:
        return tp_group()
    return TPGroup(_STATE.attn_tp_rank, _STATE.attn_tp_size, _STATE.attn_group)


def all_reduce(x: torch.Tensor, group: TPGroup | None = None) -> torch.Tensor:
    """Sum over `group` (default: the TP group), in place."""
    size, pg = (_STATE.tp_size, _STATE.group) if group is None else (group.size, group.group)
    if size == 1:
        return x
    dist.all_reduce(x, group=pg)
    return x


def all_gather_last_dim(x: torch.Tensor, group: TPGroup | None = None) -> torch.Tensor:
    """Concatenate each rank's slice of the last dimension (vocab-parallel logits) over `group`."""
    group = group or tp_group()
    if group.size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(group.size)]
    dist.all_gather(parts, x.contiguous(), group=group.group)
    return torch.cat(parts, dim=-1)


def shard_range(total: int, rank: int, size: int) -> tuple[int, int]:
    """[start, end) of rank's even share of `total` (caller checks divisibility)."""
    per = total // size
    return rank * per, (rank + 1) * per
