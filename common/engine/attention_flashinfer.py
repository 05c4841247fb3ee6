"""FlashInfer attention (CUDA): paged prefill/append and paged decode over the shared pool.

The pool's per-layer view [num_pages, 2, page_size, Hkv, D] is FlashInfer's NHD paged layout,
so the kernels read the pages in place. Planning happens once per forward in prepare(), outside
the layers (and outside any CUDA graph). A batch of fresh prompts (no cached prefix: every key is
one of this step's tokens) runs FlashInfer's ragged prefill over the step's own rotated K and V
instead (attends_new_kv; DISAGG_RAGGED_PREFILL=0 keeps the paged kernel): on an H100 its FA3 kernel
took 73 against the paged one's 91 us a layer for a 2048-token Qwen3-30B-A3B prompt (docs/benchmarks.md).

MLA (DeepSeek): `FlashInferMLABackend` runs `flashinfer.mla.BatchMLAPagedAttentionWrapper`
(FlashInfer 0.7.2: canonical `MLAPlanMetadata.csr` plans, split query and KV inputs) on the
latent pages in place, in the weight-absorbed form: decode (causal=False) and short prefill chunks
and mixed batches (causal=True), one plan per step for all layers. A batch whose attention takes
fewer FLOPs in the expanded form (a long prompt: per query-key pair 192 + 128 products a head, not
576 + 512, for one kv_b_proj GEMM over its keys' latents) runs that form on FlashInfer's ragged
prefill kernel instead (`BatchPrefillWithRaggedKVCacheWrapper`, head dims 192 / 128), over the
latent rows prepare() lists (expanded_pays, and its K/V within EXPANDED_MAX_BYTES;
DISAGG_MLA_PREFILL forces a form). The MLA kernels
need kv_lora_rank a multiple of 128 and qk_rope_head_dim a multiple of 64
(deepseek.flashinfer_mla_unsupported says when a model falls back to torch).
"""

from __future__ import annotations

import itertools

import torch
from disagg.common.config import mla_kernel, mla_prefill_mode, ragged_prefill
from disagg.common.engine.attention import AttentionBackend, ForwardBatch, MLABackend, TorchBackend
from disagg.common.engine.device_wait import host_tensor, host_to_device, to_device

_WORKSPACE_BYTES = 256 * 1024 * 1024
EXPANDED_MAX_BYTES = 1 << 30  # the expanded MLA form's per-layer K/V buffers at most (a 4096-token prompt
# at V3's 128 heads: 604 MB; at TP 8, 16 heads a rank: 75 MB)


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
        # fresh prompts (no cached prefix): the ragged kernel over the step's own K/V, contiguous
        # tokens instead of the paged kernel's page-by-page gathers (as SGLang's extend without prefix)
        self.ragged = (
            flashinfer.BatchPrefillWithRaggedKVCacheWrapper(self.workspace, "NHD")
            if ragged_prefill()
            else None
        )
        self.device = device
        self._wrapper = None

    def prepare(self, batch: ForwardBatch) -> None:
        ps = self.pool.page_size
        common = dict(q_data_type=self.pool.dtype, kv_data_type=self.pool.dtype)
        heads = (self.num_qo_heads, self.pool.num_kv_heads, self.pool.head_dim, ps)
        if not batch.is_decode_only:
            qo_indptr = host_tensor([0, *itertools.accumulate(batch.q_lens)], torch.int32, self.device)
            if self.ragged is not None and batch.kv_lens == batch.q_lens:
                self.ragged.plan(qo_indptr, qo_indptr, *heads[:3], causal=True, **common)
                self._wrapper = self.ragged
                batch.attn["ragged"] = True
                return
        kv_indptr, indices, last = paged_kv_layout(batch.kv_lens, batch.page_tables, ps, self.device)
        if batch.is_decode_only:
            self.decode.plan(kv_indptr, indices, last, *heads, **common)
            self._wrapper = self.decode
        else:
            self.prefill.plan(qo_indptr, kv_indptr, indices, last, *heads, causal=True, **common)
            self._wrapper = self.prefill

    def attends_new_kv(self, batch: ForwardBatch) -> bool:
        return batch.attn.get("ragged", False)

    def forward(self, q: torch.Tensor, kv: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        return self._wrapper.run(q.contiguous(), kv)

    def forward_new_kv(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: ForwardBatch
    ) -> torch.Tensor:
        return self.ragged.run(q.contiguous(), k, v)


def paged_kv_layout(
    kv_lens: list[int], tables: list[list[int]], page_size: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """FlashInfer's paged-KV arrays of these requests, int32: kv_indptr [B+1] and the last page's
    length [B] on the host, pinned for a GPU (the planner reads them there, then copies them:
    host_tensor), and the page indices [pages] on `device` (the kernel reads them)."""
    n_pages = [(kv + page_size - 1) // page_size for kv in kv_lens]
    kv_indptr = host_tensor([0, *itertools.accumulate(n_pages)], torch.int32, device)
    indices = to_device([p for t, n in zip(tables, n_pages, strict=True) for p in t[:n]], torch.int32, device)
    last = host_tensor(
        [kv - (n - 1) * page_size for kv, n in zip(kv_lens, n_pages, strict=True)], torch.int32, device
    )
    return kv_indptr, indices, last


def mla_metadata(
    q_lens: list[int], kv_lens: list[int], tables: list[list[int]], page_size: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """FlashInfer's MLA CSR metadata, int32: (qo_indptr [B+1], kv_indptr [B+1], kv_len [B]) on the
    host, pinned for a GPU (paged_kv_layout's), and kv_indices [pages] on `device`."""
    kv_indptr, indices, _ = paged_kv_layout(kv_lens, tables, page_size, device)
    qo_indptr = host_tensor([0, *itertools.accumulate(q_lens)], torch.int32, device)
    return qo_indptr, kv_indptr, indices, host_tensor(kv_lens, torch.int32, device)


def expanded_pays(q_lens: list[int], kv_lens: list[int], dims: tuple[int, int, int, int]) -> bool:
    """Whether a batch's MLA attention takes fewer FLOPs in the expanded form than in the absorbed
    one, per head (dims: kv_lora_rank, qk_rope, qk_nope, v). Absorbed: each causal query-key pair
    q.k over rank + rope and p.v over rank, each query through W_UK and W_UV (rank x (nope + v));
    expanded: a pair nope + rope and v, each key's latent through kv_b_proj (rank x (nope + v)).
    A prompt without a prefix: the same per-token products, 3.4x fewer a pair, so expanded; a
    chunk on a prefix: expanded past ~171 new tokens (V2/V3 dims); a decode row: absorbed. And only
    while the batch's keys are at most twice its new tokens: the expanded K and V exist per layer
    for every key (~150 KB a key at V3's 128 heads), so they stay within the size of the chunk's
    own activations (a prompt and its second chunk; not decode rows' long contexts riding along.
    SGLang expands prefix-free batches only)."""
    if sum(kv_lens) > 2 * sum(q_lens):
        return False
    rank, rope, nope, v = dims
    pairs = sum(q * (kv - q) + q * (q + 1) // 2 for q, kv in zip(q_lens, kv_lens, strict=True))
    per_token = rank * (nope + v)
    absorbed = pairs * (2 * rank + rope) + sum(q_lens) * per_token
    expanded = pairs * (nope + rope + v) + sum(kv_lens) * per_token
    return expanded < absorbed


def latent_kv_rows(
    kv_lens: list[int], tables: list[list[int]], page_size: int, device: torch.device
) -> torch.Tensor:
    """[sum kv_lens] int64 on `device`: every key's row in a layer's latent_pages(...).view(-1, latent),
    request by request in position order (built on the host, one pinned copy)."""
    n_pages = [(kv + page_size - 1) // page_size for kv in kv_lens]
    pages = torch.tensor([p for t, n in zip(tables, n_pages, strict=True) for p in t[:n]], dtype=torch.long)
    rows = (pages[:, None] * page_size + torch.arange(page_size)).flatten()
    spans = torch.tensor(n_pages) * page_size
    start = torch.repeat_interleave(torch.cumsum(spans, 0) - spans, spans)
    keep = torch.arange(rows.numel()) - start < torch.repeat_interleave(torch.tensor(kv_lens), spans)
    return host_to_device(rows[keep], device)


def plan_mla(
    api,
    wrapper,
    metadata,
    num_heads: int,
    dims: tuple[int, int],
    page_size: int,
    causal: bool,
    sm_scale,
    dtype,
) -> None:
    """wrapper.plan() with `metadata` from mla_metadata; `dims` = (kv_lora_rank, rope_dim); `api`
    is flashinfer.mla (or a stand-in with the same two names, tests)."""
    wrapper.plan(
        metadata=api.MLAPlanMetadata.csr(*metadata),
        num_heads=num_heads,
        head_dim_ckv=dims[0],
        head_dim_kpe=dims[1],
        page_size=page_size,
        causal=causal,
        sm_scale=sm_scale,
        q_data_type=dtype,
        kv_data_type=dtype,
        query_layout="split",
        kv_cache_layout="split",
    )


def run_mla_wrapper(wrapper, q_nope, q_pe, pages: torch.Tensor, rank: int) -> torch.Tensor:
    """The planned kernel over the latent pages in place: ckv and kpe are strided views of them."""
    return wrapper.run(query=(q_nope, q_pe), kv_cache=(pages[..., :rank], pages[..., rank:]))


def flashinfer_mla_api():
    import flashinfer.mla

    return flashinfer.mla


def flashinfer_ragged_wrapper():
    import flashinfer

    return flashinfer.BatchPrefillWithRaggedKVCacheWrapper


class FlashInferMLABackend(FlashInferBackend, MLABackend):
    """MLA on FlashInfer's paged MLA kernels (see the module docstring).

    A FlashInferBackend, so the model runner captures CUDA graphs for it (cuda_graph.py builds its
    own fixed-buffer MLA wrappers). The plan needs the layer's head count, latent widths and
    softmax scale, which the model owns: it is made at the first MLA layer of each forward (eager;
    graphs plan before the replay instead) and serves every layer of that forward.
    """

    def __init__(
        self, device: torch.device, pool, num_qo_heads: int, mla_dims=None, api=None, ragged=None, **_
    ):
        # NOTE: no super().__init__(): the MHA wrappers would only take workspace memory
        self.api = api or flashinfer_mla_api()
        self.pool, self.num_qo_heads, self.device = pool, num_qo_heads, device
        self.workspace = torch.empty(_WORKSPACE_BYTES, dtype=torch.uint8, device=device)
        self.wrapper = self.api.BatchMLAPagedAttentionWrapper(self.workspace, backend=mla_kernel())
        # DISAGG_MLA_PREFILL: prefill and mixed batches in the form of fewer FLOPs (auto; mla_dims:
        # kv_lora_rank, rope, nope, v; without them absorbed), or always absorbed or expanded on
        # FlashInfer, or expanded on torch SDPA (A/B runs); decode-only batches stay on the MLA kernel
        self.prefill_mode, self.torch, self.dims = mla_prefill_mode(), TorchBackend(), mla_dims
        if self.prefill_mode == "auto" and mla_dims is None:
            self.prefill_mode = "absorbed"
        # the ragged prefill wrapper shares the workspace: a batch runs one form or the other
        self.ragged = None
        if self.prefill_mode in ("auto", "expanded"):
            ragged = ragged or flashinfer_ragged_wrapper()
            self.ragged = ragged(self.workspace, "NHD")

    def prepare(self, batch: ForwardBatch) -> None:
        if not batch.q_lens:  # an idle DP-attention rank runs no attention
            return
        if not batch.is_decode_only and self.prefill_mode != "absorbed":
            if self.prefill_mode == "torch":
                self.torch.prepare(batch)
                return
            if self.prefill_mode == "expanded" or (
                expanded_pays(batch.q_lens, batch.kv_lens, self.dims) and self._expansion_fits(batch.kv_lens)
            ):
                a = batch.attn
                a["mla_kv_rows"] = latent_kv_rows(
                    batch.kv_lens, batch.page_tables, self.pool.page_size, self.device
                )
                a["mla_ragged"] = tuple(
                    host_tensor([0, *itertools.accumulate(lens)], torch.int32, self.device)
                    for lens in (batch.q_lens, batch.kv_lens)
                )
                return
        batch.attn["mla_metadata"] = mla_metadata(
            batch.q_lens, batch.kv_lens, batch.page_tables, self.pool.page_size, self.device
        )

    def attends_new_kv(self, batch: ForwardBatch) -> bool:
        return False  # MLA layers choose their form through runs_expanded

    def expanded_max_keys(self) -> int:
        """The most keys a batch's expanded form may hold: its per-layer buffers (kv_b_proj's rows, K, a
        contiguous V: (nope + v) + (nope + rope) + v values a key and head, 16-bit) within
        EXPANDED_MAX_BYTES, half the device headroom the KV pool leaves for activations
        (kv_pool.GPU_FREE_HEADROOM)."""
        rank, rope, nope, v = self.dims
        return EXPANDED_MAX_BYTES // (self.num_qo_heads * (2 * nope + rope + 2 * v) * 2)

    def _expansion_fits(self, kv_lens: list[int]) -> bool:
        return sum(kv_lens) <= self.expanded_max_keys()

    def runs_in_place(self, batch: ForwardBatch) -> bool:
        return "mla_metadata" in batch.attn or "mla_ragged" in batch.attn

    def runs_expanded(self, batch: ForwardBatch) -> bool:
        return "mla_ragged" in batch.attn

    def run_ragged(self, q, k, v, sm_scale, batch: ForwardBatch) -> torch.Tensor:
        a = batch.attn
        if not a.get("ragged_planned"):  # the first MLA layer of this forward plans for all
            qo_indptr, kv_indptr = a["mla_ragged"]
            self.ragged.plan(qo_indptr, kv_indptr, q.shape[1], k.shape[1], q.shape[-1], head_dim_vo=v.shape[-1],
                             causal=True, sm_scale=sm_scale, q_data_type=q.dtype, kv_data_type=k.dtype)  # fmt: skip
            a["ragged_planned"] = True
        return self.ragged.run(q, k, v)

    def run_mla(self, q_nope, q_pe, pages, sm_scale, batch: ForwardBatch) -> torch.Tensor:
        a = batch.attn
        if not a.get("mla_planned"):
            dims = (q_nope.shape[-1], q_pe.shape[-1])
            causal = not batch.is_decode_only
            plan_mla(self.api, self.wrapper, a["mla_metadata"], q_nope.shape[1], dims, self.pool.page_size,
                     causal, sm_scale, q_nope.dtype)  # fmt: skip
            a["mla_planned"] = True
        return run_mla_wrapper(self.wrapper, q_nope, q_pe, pages, q_nope.shape[-1])

    def forward(self, q: torch.Tensor, kv: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        return MLABackend.forward(self, q, kv, batch)
