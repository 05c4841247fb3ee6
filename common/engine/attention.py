"""Attention over the paged KV pool, behind one interface.

Plug point: `AttentionBackend`. `prepare(batch)` runs once per forward, outside the layers
(planning, index building); `forward(...)` runs per layer. Backends: `torch` (portable, CPU and
GPU, SDPA over gathered pages) and `flashinfer` (CUDA, paged prefill/decode kernels). MLA models
(DeepSeek) get `MLABackend`s instead (`flashinfer_mla`: attention over the latent pages in place)
or the torch backend, on which deepseek.py gathers the latents itself.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from disagg.common.engine.device_wait import host_to_device


@dataclass
class ForwardBatch:
    """One flattened batch of tokens from many requests (no padding)."""

    input_ids: torch.Tensor  # [T] int64, device
    positions: torch.Tensor  # [T] int64, device
    out_page: torch.Tensor  # [T] int64: page receiving each new token's K/V
    out_offset: torch.Tensor  # [T] int64: slot inside that page
    q_lens: list[int]  # new tokens per request
    kv_lens: list[int]  # tokens in the pool per request after this forward (prefix + new)
    page_tables: list[list[int]]  # pages of each request covering kv_lens
    logits_index: torch.Tensor  # [B_out] int64: rows of T whose next-token logits are wanted
    page_size: int = 16
    k_rows: torch.Tensor | None = (
        None  # [T] int64: row of each new K in a layer's pool rows (set by the model)
    )
    attn: dict = field(default_factory=dict)  # backend-private metadata built by prepare()

    @property
    def is_decode_only(self) -> bool:
        return all(q == 1 for q in self.q_lens)


class AttentionBackend(ABC):
    """Contract: forward() gets this layer's q [T, Hq, D] and the layer's pool view
    kv [num_pages, 2, page_size, Hkv, D] in which the new K/V are already written, and returns
    [T, Hq, D]: causal attention of each request's new tokens over its kv_lens tokens."""

    @abstractmethod
    def prepare(self, batch: ForwardBatch) -> None: ...

    @abstractmethod
    def forward(self, q: torch.Tensor, kv: torch.Tensor, batch: ForwardBatch) -> torch.Tensor: ...

    def attends_new_kv(self, batch: ForwardBatch) -> bool:
        """True: this batch's attention runs on forward_new_kv over the step's own K and V (every
        request fresh: its keys are exactly this step's tokens), not on forward over the pool."""
        return False

    def forward_new_kv(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: ForwardBatch
    ) -> torch.Tensor:
        """q [T, Hq, D], the rotated k and v [T, Hkv, D] (rows may be strided) -> [T, Hq, D], causal
        within each request (the K/V are in the pool too, as forward() would read them)."""
        raise NotImplementedError


class MLABackend(AttentionBackend):
    """Contract for MLA (weight-absorbed) attention over latent pages: run_mla() gets this layer's
    absorbed queries q_nope [T, H, kv_lora_rank] and q_pe [T, H, rope_dim], the layer's pages
    [num_pages, page_size, kv_lora_rank + rope_dim] (deepseek.latent_pages, new latents already
    written) and the softmax scale; it returns the latent context [T, H, kv_lora_rank] of each new
    token over its request's kv_lens latents, causally (decode-only batches: all of them)."""

    def runs_in_place(self, batch: ForwardBatch) -> bool:
        """False: this batch runs the torch path (gathered latents) instead, TorchBackend's indices
        built by prepare()."""
        return True

    def runs_expanded(self, batch: ForwardBatch) -> bool:
        """True: this batch runs the expanded form on run_ragged() instead of run_mla(), over the
        latent rows batch.attn["mla_kv_rows"] that prepare() listed."""
        return False

    def run_ragged(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sm_scale: float, batch: ForwardBatch
    ) -> torch.Tensor:
        """The expanded form: q [T, H, qk] (new tokens), k [N, H, qk] and v [N, H, v] (every key of
        each request, batch.attn["mla_kv_rows"]'s order: request by request, position order), causal
        with each request's new tokens last; returns [T, H, v]."""
        raise NotImplementedError(f"{type(self).__name__} runs the absorbed form only")

    @abstractmethod
    def run_mla(
        self,
        q_nope: torch.Tensor,
        q_pe: torch.Tensor,
        pages: torch.Tensor,
        sm_scale: float,
        batch: ForwardBatch,
    ) -> torch.Tensor: ...

    def forward(self, q: torch.Tensor, kv: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        raise NotImplementedError("an MLA backend runs MLA layers only (run_mla)")


class TorchBackend(AttentionBackend):
    """Pads the batch to [B, max_q] queries over [B, max_kv] gathered keys, one SDPA per layer. A
    single fresh prompt (no cached prefix) in a standard decoder layer attends over its own K/V
    instead: one causal SDPA, no gather, no mask (torch's flash kernel: a 1024-token prefill of the
    default model 1.43-1.45 s against 1.63-1.66 s on a 2-core CPU)."""

    def prepare(self, batch: ForwardBatch) -> None:
        # NOTE: the indices below are built for a fresh prompt too: DeepSeek's torch MLA reads them
        batch.attn["fresh"] = len(batch.q_lens) == 1 and batch.kv_lens == batch.q_lens and batch.q_lens[0] > 1
        device = batch.input_ids.device
        bsz, max_q, max_kv, ps = len(batch.q_lens), max(batch.q_lens), max(batch.kv_lens), batch.page_size
        q_index = torch.zeros(bsz, max_q, dtype=torch.long)
        kv_page = torch.zeros(bsz, max_kv, dtype=torch.long)
        q_pos = torch.full((bsz, max_q), -1, dtype=torch.long)  # position of each query inside its request
        kv_len = torch.tensor(batch.kv_lens, dtype=torch.long)
        start = 0
        for i, (q_len, n_kv, pages) in enumerate(
            zip(batch.q_lens, batch.kv_lens, batch.page_tables, strict=True)
        ):
            q_index[i, :q_len] = torch.arange(start, start + q_len)
            q_pos[i, :q_len] = torch.arange(n_kv - q_len, n_kv)
            n_pages = (n_kv + ps - 1) // ps
            kv_page[i, :n_kv] = torch.tensor(pages[:n_pages]).repeat_interleave(ps)[:n_kv]
            start += q_len
        kv_pos = torch.arange(max_kv)
        kv_offset = kv_pos.remainder(ps).expand(bsz, max_kv)
        # key j is visible to query i iff j < kv_len and j <= position of i (causal)
        mask = (kv_pos[None, None, :] <= q_pos[:, :, None]) & (kv_pos[None, None, :] < kv_len[:, None, None])
        valid = q_pos >= 0
        # NOTE: no stream sync: a plain copy to the device waits for the step in flight (the overlap
        # schedule's step n while step n+1 is prepared); device_wait.host_to_device
        batch.attn.update(
            q_index=host_to_device(q_index, device),
            kv_page=host_to_device(kv_page, device),
            kv_offset=host_to_device(kv_offset.contiguous(), device),
            mask=host_to_device(mask[:, None], device),  # [B, 1, max_q, max_kv]
            # padded rows that are real tokens
            out_rows=host_to_device(valid.flatten().nonzero().squeeze(1), device),
        )

    def attends_new_kv(self, batch: ForwardBatch) -> bool:
        return batch.attn.get("fresh", False)

    def forward_new_kv(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: ForwardBatch
    ) -> torch.Tensor:
        q, k, v = (x.transpose(0, 1)[None] for x in (q, k, v))  # [1, H, T, D]: 4-D takes the flash kernel
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)[0].transpose(0, 1)

    def forward(self, q: torch.Tensor, kv: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        a = batch.attn
        bsz, max_q = a["q_index"].shape
        num_heads, head_dim = q.shape[1], q.shape[2]
        qp = q[a["q_index"]].transpose(1, 2)  # [B, Hq, max_q, D]
        k = kv[a["kv_page"], 0, a["kv_offset"]].transpose(1, 2)  # [B, Hkv, max_kv, D]
        v = kv[a["kv_page"], 1, a["kv_offset"]].transpose(1, 2)
        out = F.scaled_dot_product_attention(qp, k, v, attn_mask=a["mask"], enable_gqa=True)
        out = out.transpose(1, 2).reshape(bsz * max_q, num_heads, head_dim)
        return out[a["out_rows"]]


_FP16 = (torch.bfloat16, torch.float16)


def create_attention_backend(name: str, device: torch.device, **kwargs) -> AttentionBackend:
    """`name`: auto, torch or flashinfer; an MLA model's names end in `_mla`
    (deepseek.attention_backend_for), and its flashinfer is the MLA kernels' backend."""
    base, mla = name.removesuffix("_mla"), name.endswith("_mla")
    if base == "auto":
        # NOTE: FlashInfer's MLA kernels take 16-bit queries only: a float32 MLA model runs torch
        usable = device.type == "cuda" and _has_flashinfer() and (not mla or kwargs["pool"].dtype in _FP16)
        base = "flashinfer" if usable else "torch"
    if base == "torch":
        return TorchBackend()
    if base == "flashinfer":
        if device.type != "cuda":
            raise ValueError("--attention-backend flashinfer needs a CUDA device")
        from disagg.common.engine.attention_flashinfer import FlashInferBackend, FlashInferMLABackend

        if not mla:
            return FlashInferBackend(device=device, **kwargs)
        if kwargs["pool"].dtype not in _FP16:
            raise ValueError(
                f"FlashInfer's MLA kernels need --dtype bfloat16 or float16, not {kwargs['pool'].dtype}"
            )
        return FlashInferMLABackend(device=device, **kwargs)
    raise ValueError(f"unknown attention backend {name!r} (choose auto, torch, flashinfer)")


def _has_flashinfer() -> bool:
    try:
        import flashinfer  # noqa: F401
    except ImportError:
        return False
    return True
