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


_STATE = ParallelState()


def get_parallel() -> ParallelState:
    return _STATE


def set_parallel(state: ParallelState) -> None:
    global _STATE
    _STATE = state


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    if _STATE.tp_size == 1:
        return x
    dist.all_reduce(x, group=_STATE.group)
    return x


def all_gather_last_dim(x: torch.Tensor) -> torch.Tensor:
    """Concatenate each rank's slice of the last dimension (vocab-parallel logits)."""
    if _STATE.tp_size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(_STATE.tp_size)]
    dist.all_gather(parts, x.contiguous(), group=_STATE.group)
    return torch.cat(parts, dim=-1)


def shard_range(total: int, rank: int, size: int) -> tuple[int, int]:
    """[start, end) of rank's even share of `total` (caller checks divisibility)."""
    per = total // size
    return rank * per, (rank + 1) * per
