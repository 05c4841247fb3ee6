"""Arrival counters: the last program of a tile finishes the work of the launch after it.

A split kernel's programs each write a partial result (float32 rows of the MoE's down GEMV, a
chunk's attention output and its log-sum-exp); a second launch used to combine them. Here each
program stores its partial, passes a CTA barrier and takes an acquire-release atomic ticket on its
tile's counter (the CUDA threadFenceReduction pattern); the one that draws the last ticket reads
the partials back through L2 (`.cg` loads), combines them, stores the result and zeroes the counter
for the next launch. One launch less (at batch 1 a launch and its gap cost a few microseconds
against ~1 µs of work), the same result as the separate launch's (combined in the same order).

The counters are int32 zeros on the device, one buffer per user, made at the first call outside a
CUDA graph capture (the engine runs each graph's forward eagerly before capturing it): inside a
capture before that, or with DISAGG_FUSED_TAILS=0 (A/B runs), `arrival_counters` says None and the
caller launches the combine separately.
"""

from __future__ import annotations

import torch
from disagg.common.config import fused_tails

_COUNTERS: dict[tuple[torch.device, str], torch.Tensor] = {}


def arrival_counters(device: torch.device, user: str, needed: int, size: int) -> torch.Tensor | None:
    """`user`'s `size` counters on `device` (zeros between launches), or None: the combine runs as a
    launch of its own (needed > size, a capture before the first eager call, DISAGG_FUSED_TAILS=0)."""
    if not fused_tails() or needed > size:
        return None
    counters = _COUNTERS.get((device, user))
    if counters is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None
        counters = _COUNTERS[(device, user)] = torch.zeros(size, dtype=torch.int32, device=device)
    return counters
