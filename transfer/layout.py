"""The KV pool layout both sides agree on, and how KV heads are split between TP ranks.

A server rank's KV pool is one tensor
    kv_buffer: [num_layers, num_pages, 2, page_size, num_local_kv_heads, head_dim]   (2 = K, V)
A request's KV lives in a list of (scattered) page indices; token t sits in page t // page_size,
slot t % page_size. Prefill and decode pools may have different page counts and TP sizes, but
the same model, page size, dtype, layers and head_dim. A prefill pipeline stage (--pp-size) holds
only its layers [layer_start, layer_end) and sends those; the decode (one stage) gets every layer
range from the stage that holds it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from disagg.common.messages import message

# bumped whenever a transfer message changes incompatibly: peers of different versions never pair
PROTOCOL_VERSION = 6  # 5: the done's metadata carries prompt_logprobs; 6: KVLayout.kv_kind, MLA pages
# hold one contiguous latent per token (they held K slot | V slot halves before)


class KVLayoutMismatchError(ValueError):
    """The prefill and decode KV pools cannot exchange pages (different model/page size/dtype...)."""


@message
@dataclass
class KVLayout:
    num_layers: int
    page_size: int
    num_kv_heads_total: int  # KV heads of the model, before the TP split
    head_dim: int
    dtype: str  # torch dtype name without the prefix: "bfloat16", "float16", "float32"
    tp_rank: int = 0
    tp_size: int = 1
    model_name: str = ""
    model_fingerprint: str = ""  # model_files.model_fingerprint: same config and weights ("" = unknown)
    protocol_version: int = PROTOCOL_VERSION
    pp_rank: int = 0  # pipeline stage of this rank, of pp_size
    pp_size: int = 1
    layer_start: int = 0  # the stage's layers [layer_start, layer_end) (layer_end 0: num_layers)
    layer_end: int = 0
    kv_kind: str = "mha"  # "mha": per-head K and V; "mla": one latent per token (DeepSeek)

    # what two sides must share to exchange pages (TP rank and size may differ)
    COMPARED = ("protocol_version", "model_name", "model_fingerprint", "num_layers", "page_size",
                "num_kv_heads_total", "head_dim", "dtype", "kv_kind")  # fmt: skip

    def identity(self) -> dict:
        """The compared fields: a server publishes them (/server_info `pd_identity`) and the router
        pairs only prefill and decode servers whose identities are equal."""
        return {f: getattr(self, f) for f in self.COMPARED}

    @property
    def layer_range(self) -> tuple[int, int]:
        """Global layers [start, end) in this rank's pool."""
        return self.layer_start, self.layer_end or self.num_layers

    @property
    def num_local_layers(self) -> int:
        return self.layer_range[1] - self.layer_range[0]

    @property
    def rank(self) -> int:
        """This rank among its server's ranks (stage-major, as common/parallel/state.py numbers them)."""
        return self.pp_rank * self.tp_size + self.tp_rank

    @property
    def world_size(self) -> int:
        return self.pp_size * self.tp_size

    @property
    def head_range(self) -> tuple[int, int]:
        """Global KV heads [start, end) held by this rank."""
        return head_range(self.tp_rank, self.tp_size, self.num_kv_heads_total)

    @property
    def num_local_heads(self) -> int:
        start, end = self.head_range
        return end - start

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def pool_shape(self, num_pages: int) -> tuple[int, ...]:
        return (self.num_local_layers, num_pages, 2, self.page_size, self.num_local_heads, self.head_dim)

    def check_pool(self, kv_buffer: torch.Tensor) -> None:
        """Raise ValueError if `kv_buffer` does not have this layout."""
        want = self.pool_shape(kv_buffer.shape[1]) if kv_buffer.dim() == 6 else None
        if want != tuple(kv_buffer.shape) or kv_buffer.dtype != self.torch_dtype:
            raise ValueError(
                f"kv_buffer {tuple(kv_buffer.shape)} {kv_buffer.dtype} does not match layout {self} "
                f"(expected [layers, pages, 2, page_size, local_heads, head_dim] = {want}, {self.dtype})"
            )
        if not kv_buffer.is_contiguous():
            raise ValueError("kv_buffer must be contiguous")

    def check_compatible(self, other: KVLayout) -> None:
        """Raise KVLayoutMismatchError naming every field that differs (TP rank/size may differ)."""
        diffs = [
            f"{f}: {getattr(self, f)!r} != {getattr(other, f)!r}"
            for f in self.COMPARED
            if getattr(self, f) != getattr(other, f)
        ]
        if diffs:
            raise KVLayoutMismatchError("incompatible KV layouts (local != remote): " + "; ".join(diffs))


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def head_range(tp_rank: int, tp_size: int, num_heads: int) -> tuple[int, int]:
    """KV heads split evenly over TP ranks; with fewer heads than ranks each rank holds a replica
    of head tp_rank * num_heads // tp_size."""
    if not 0 <= tp_rank < tp_size:
        raise ValueError(f"tp_rank {tp_rank} out of range for tp_size {tp_size}")
    if num_heads >= tp_size:
        if num_heads % tp_size:
            raise ValueError(f"{num_heads} KV heads cannot be split evenly over tp_size {tp_size}")
        per_rank = num_heads // tp_size
        return tp_rank * per_rank, (tp_rank + 1) * per_rank
    head = tp_rank * num_heads // tp_size
    return head, head + 1


@dataclass(frozen=True)
class HeadSlice:
    """Global heads [start, end) that decode rank `decode_rank` gets from prefill rank `prefill_rank`."""

    prefill_rank: int
    decode_rank: int
    start: int
    end: int


def plan_head_slices(prefill_tp: int, decode_tp: int, num_heads: int) -> list[HeadSlice]:
    """Which prefill rank sends which heads to which decode rank (heterogeneous TP).

    Every head a decode rank holds comes from exactly one prefill rank; when several prefill ranks
    hold a replica of the head, the decode ranks are spread over them.
    """
    holders: dict[int, list[int]] = {}
    for p in range(prefill_tp):
        start, end = head_range(p, prefill_tp, num_heads)
        for h in range(start, end):
            holders.setdefault(h, []).append(p)
    slices: list[HeadSlice] = []
    for d in range(decode_tp):
        start, end = head_range(d, decode_tp, num_heads)
        for h in range(start, end):
            src = holders[h][d % len(holders[h])]
            last = slices[-1] if slices else None
            if last and last.decode_rank == d and last.prefill_rank == src and last.end == h:
                slices[-1] = HeadSlice(src, d, last.start, h + 1)
            else:
                slices.append(HeadSlice(src, d, h, h + 1))
    return slices
