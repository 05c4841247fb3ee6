"""FlashInfer attention (CUDA): paged prefill/append and paged decode over the shared pool.

The pool's per-layer view [num_pages, 2, page_size, Hkv, D] is FlashInfer's NHD paged layout,
so the kernels read the pages in place. Planning happens once per forward in prepare(), outside
the layers (and outside any CUDA graph).
"""

from __future__ import annotations

import torch
from disagg.common.engine.attention import AttentionBackend, ForwardBatch

_WORKSPACE_BYTES = 256 * 1024 * 1024


class FlashInferBackend(AttentionBackend):
    def __init__(self, device: torch.device, pool, num_qo_heads: int, **_):
        import flashinfer

        self.pool = pool
        self.num_qo_heads = num_qo_heads
        self.workspace = torch.empty(_WORKSPACE_BYTES, dtype=torch.uint8, device=device)
        self.prefill = flashinfer.BatchPrefillWithPagedKVCacheWrapper(self.workspace, "NHD")
        self.decode = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
            self.workspace, "NHD", use_tensor_cores=num_qo_heads // pool.num_kv_heads >= 4
        )
        self.device = device
        self._wrapper = None

    def prepare(self, batch: ForwardBatch) -> None:
        ps = self.pool.page_size
        n_pages = [(kv + ps - 1) // ps for kv in batch.kv_lens]
        kv_indptr = torch.zeros(len(n_pages) + 1, dtype=torch.int32)
        kv_indptr[1:] = torch.tensor(n_pages, dtype=torch.int32).cumsum(0)
        indices = torch.tensor(
            [p for table, n in zip(batch.page_tables, n_pages, strict=True) for p in table[:n]],
            dtype=torch.int32,
        ).to(self.device, non_blocking=True)
        last = torch.tensor(
            [kv - (n - 1) * ps for kv, n in zip(batch.kv_lens, n_pages, strict=True)], dtype=torch.int32
        )
        common = dict(q_data_type=self.pool.dtype, kv_data_type=self.pool.dtype)
        heads = (self.num_qo_heads, self.pool.num_kv_heads, self.pool.head_dim, ps)
        if batch.is_decode_only:
            self.decode.plan(kv_indptr, indices, last, *heads, **common)
            self._wrapper = self.decode
        else:
            qo_indptr = torch.zeros(len(batch.q_lens) + 1, dtype=torch.int32)
            qo_indptr[1:] = torch.tensor(batch.q_lens, dtype=torch.int32).cumsum(0)
            self.prefill.plan(qo_indptr, kv_indptr, indices, last, *heads, causal=True, **common)
            self._wrapper = self.prefill

    def forward(self, q: torch.Tensor, kv: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        return self._wrapper.run(q.contiguous(), kv)
