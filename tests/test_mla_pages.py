"""MLA's latent pages as FlashInfer reads them: the pool's page bytes reinterpreted as
[page_size, kv_lora_rank + qk_rope_head_dim], one contiguous latent per token, with no copy."""

from __future__ import annotations

import random

import pytest
import torch
from disagg.common.engine.attention import ForwardBatch
from disagg.common.engine.kv_pool import KVPagePool

from tests.conftest import assert_pool_clean, hf_greedy


def _write_batch(pages: list[int], offsets: list[int], page_size: int) -> ForwardBatch:
    t = torch.tensor
    n = len(pages)
    return ForwardBatch(
        input_ids=t([0] * n),
        positions=t(list(range(n))),
        out_page=t(pages),
        out_offset=t(offsets),
        q_lens=[n],
        kv_lens=[n],
        page_tables=[sorted(set(pages))],
        logits_index=t([n - 1]),
        page_size=page_size,
    )


def test_latent_pages_are_the_pool_bytes_one_contiguous_latent_per_token():
    """A latent written for (page 2, slot 3) is the 24 contiguous values at that slot of the pool's
    own buffer; ckv and kpe are strided views of those bytes (what FlashInfer's MLA kernel takes)."""
    from disagg.common.models.deepseek import latent_pages, write_latent

    rank, rope, ps = 16, 8, 4
    pool = KVPagePool(5, ps, 2, 1, (rank + rope) // 2, torch.float32, torch.device("cpu"))
    latents = torch.randn(3, rank + rope)
    write_latent(pool.kv_buffer[1], _write_batch([2, 2, 0], [3, 0, 1], ps), latents)
    raw = pool.kv_buffer[1].reshape(-1)  # the layer's bytes, page after page
    page_len = ps * (rank + rope)
    for (page, slot), latent in zip([(2, 3), (2, 0), (0, 1)], latents, strict=True):
        start = page * page_len + slot * (rank + rope)
        assert torch.equal(raw[start : start + rank + rope], latent)
    assert not pool.kv_buffer[0].any()  # another layer untouched

    view = latent_pages(pool.kv_buffer[1])
    ckv, kpe = view[..., :rank], view[..., rank:]
    assert view.data_ptr() == pool.kv_buffer[1].data_ptr()  # no copy
    assert ckv.shape == (6, ps, rank) and kpe.shape == (6, ps, rope)  # 5 pages + the pad page
    assert ckv.stride() == kpe.stride() == (page_len, rank + rope, 1)
    assert torch.equal(ckv[2, 3], latents[0, :rank]) and torch.equal(kpe[0, 1], latents[2, rank:])


class ReferenceMLAPlanMetadata:
    """flashinfer.mla.MLAPlanMetadata's CSR form."""

    def __init__(self, qo_indptr, kv_indptr, kv_indices, kv_len_arr):
        self.qo_indptr, self.kv_indptr, self.kv_indices, self.kv_len_arr = (
            qo_indptr,
            kv_indptr,
            kv_indices,
            kv_len_arr,
        )

    @classmethod
    def csr(cls, qo_indptr, kv_indptr, kv_indices, kv_len_arr):
        return cls(qo_indptr, kv_indptr, kv_indices, kv_len_arr)


class ReferenceMLAWrapper:
    """flashinfer.mla.BatchMLAPagedAttentionWrapper (0.7.2) in torch: the keyword API the backend
    calls, the planner's metadata checks, and the kernel's math (absorbed MLA, bottom-right causal
    mask), so the backend's glue runs on the CPU exactly as it drives FlashInfer on a GPU."""

    def __init__(self, float_workspace_buffer, use_cuda_graph=False, backend="auto", **buffers):
        assert backend in ("auto", "fa2", "fa3")  # DISAGG_MLA_KERNEL's values
        self.plans = 0

    def plan(self, *, metadata, num_heads, head_dim_ckv, head_dim_kpe, page_size, causal, sm_scale,
             q_data_type, kv_data_type, query_layout="packed", kv_cache_layout="packed"):  # fmt: skip
        m = metadata
        for t in (m.qo_indptr, m.kv_indptr, m.kv_indices, m.kv_len_arr):
            assert t.dtype == torch.int32 and t.ndim == 1 and t.is_contiguous()
        pages = (m.kv_len_arr.long() + page_size - 1) // page_size
        assert torch.equal(m.kv_indptr.diff().long(), pages)  # FlashInfer's CSR check
        assert m.kv_indices.numel() >= int(m.kv_indptr[-1])
        assert (query_layout, kv_cache_layout) == ("split", "split") and q_data_type == kv_data_type
        self.meta, self.num_heads, self.dims = m, num_heads, (head_dim_ckv, head_dim_kpe)
        self.page_size, self.causal, self.scale, self.dtype = page_size, causal, sm_scale, q_data_type
        self.plans += 1

    def run(self, *, query, kv_cache):
        (q_nope, q_pe), (ckv, kpe) = query, kv_cache
        assert (q_nope.shape[-1], q_pe.shape[-1]) == (ckv.shape[-1], kpe.shape[-1]) == self.dims
        assert q_nope.shape[1] == self.num_heads and ckv.shape[1] == self.page_size
        assert all(t.stride(-1) == 1 and t.dtype == self.dtype for t in (q_nope, q_pe, ckv, kpe))
        m, out = self.meta, torch.empty_like(q_nope)
        for i, kv_len in enumerate(m.kv_len_arr.tolist()):
            pages = m.kv_indices[m.kv_indptr[i] : m.kv_indptr[i + 1]].long()
            c = ckv[pages].reshape(-1, ckv.shape[-1])[:kv_len]
            k = kpe[pages].reshape(-1, kpe.shape[-1])[:kv_len]
            q0, q1 = int(m.qo_indptr[i]), int(m.qo_indptr[i + 1])
            s = (
                torch.einsum("qhd,kd->qhk", q_nope[q0:q1], c) + torch.einsum("qhd,kd->qhk", q_pe[q0:q1], k)
            ) * self.scale
            if self.causal:  # query j of q_len sits at position kv_len - q_len + j
                pos = torch.arange(kv_len - (q1 - q0), kv_len)
                s = s.masked_fill(torch.arange(kv_len)[None, None, :] > pos[:, None, None], float("-inf"))
            out[q0:q1] = torch.einsum("qhk,kd->qhd", s.softmax(-1), c)
        return out


class ReferenceMLAApi:
    BatchMLAPagedAttentionWrapper = ReferenceMLAWrapper
    MLAPlanMetadata = ReferenceMLAPlanMetadata


class ReferenceRaggedWrapper:
    """flashinfer.BatchPrefillWithRaggedKVCacheWrapper (0.7.2) in torch: the calls the backend makes,
    the plan's checks, and the kernel's math (per request: its rows of q against its rows of k and
    v, bottom-right causal: query j of q_len sits at position kv_len - q_len + j)."""

    def __init__(self, float_workspace_buffer, kv_layout="NHD"):
        assert kv_layout == "NHD"
        self.plans = 0

    def plan(self, qo_indptr, kv_indptr, num_qo_heads, num_kv_heads, head_dim_qk, head_dim_vo=None, *,
             causal=False, sm_scale=None, q_data_type="float16", kv_data_type=None):  # fmt: skip
        for t in (qo_indptr, kv_indptr):
            assert t.dtype == torch.int32 and t.ndim == 1 and t.device.type == "cpu"
        assert (qo_indptr.diff() <= kv_indptr.diff()).all() and causal
        self.qo, self.kv, self.heads = qo_indptr.tolist(), kv_indptr.tolist(), (num_qo_heads, num_kv_heads)
        self.dims, self.scale, self.dtype = (head_dim_qk, head_dim_vo), sm_scale, q_data_type
        self.plans += 1

    def run(self, q, k, v):
        assert q.shape[1:] == (self.heads[0], self.dims[0]) and k.shape[1:] == (self.heads[1], self.dims[0])
        assert (
            v.shape[1:] == (self.heads[1], self.dims[1])
            and len(k) == len(v) == self.kv[-1]
            and len(q) == self.qo[-1]
        )
        assert all(t.dtype == self.dtype and t.stride(-1) == 1 for t in (q, k, v))
        out = q.new_empty(len(q), q.shape[1], v.shape[-1])
        for q0, q1, k0, k1 in zip(self.qo[:-1], self.qo[1:], self.kv[:-1], self.kv[1:], strict=True):
            s = torch.einsum("qhd,khd->qhk", q[q0:q1], k[k0:k1]) * self.scale
            pos = torch.arange(k1 - k0 - (q1 - q0), k1 - k0)
            s = s.masked_fill(torch.arange(k1 - k0)[None, None, :] > pos[:, None, None], float("-inf"))
            out[q0:q1] = torch.einsum("qhk,khd->qhd", s.softmax(-1), v[k0:k1])
        return out


@pytest.fixture(scope="module")
def tiny_v3(tmp_path_factory) -> str:
    from tests.test_common_deepseek import make_tiny_deepseek

    return make_tiny_deepseek(tmp_path_factory.mktemp("mla") / "v3", "v3")


def test_expanded_form_for_long_prompts_only_while_the_keys_stay_near_the_new_tokens():
    """DeepSeek-V3's dims: a prompt (or its second chunk, past 171 tokens) takes the expanded form; decode
    rows, a short chunk on a long prefix, and a prompt with 64 long decode rows beside it (their
    keys would be expanded too: ~9 GB at V3's 128 heads) take the absorbed one."""
    from disagg.common.engine.attention_flashinfer import expanded_pays

    dims = (512, 64, 128, 128)
    assert expanded_pays([4096], [4096], dims) and expanded_pays([4096], [8192], dims)
    assert expanded_pays([1000, 2000], [1000, 2000], dims)
    assert not expanded_pays([1] * 64, [1000] * 64, dims)  # decode
    assert not expanded_pays([64], [10000], dims)  # a short chunk on a long prefix
    assert expanded_pays([16], [16], dims)  # a prompt: the same per-token products, fewer per pair
    assert not expanded_pays([100], [200], dims)  # a chunk of < 171 tokens on a prefix: more FLOPs
    assert not expanded_pays([4096] + [1] * 64, [4096] + [1000] * 64, dims)  # keys 16x the new tokens
    # and the expanded K/V of a batch's keys within 1 GiB a layer: V3's 128 heads at TP 1 expand a
    # 4096-token prompt (604 MB), not an 8192-token chunk; its 16 heads a rank at TP 8 do both
    from disagg.common.engine.attention_flashinfer import FlashInferMLABackend

    for heads, fits in ((128, (True, False)), (16, (True, True))):
        backend = FlashInferMLABackend(torch.device("cpu"), None, heads, dims, api=ReferenceMLAApi,
                                       ragged=ReferenceRaggedWrapper)  # fmt: skip
        assert (backend._expansion_fits([4096]), backend._expansion_fits([8192])) == fits


@pytest.mark.parametrize("prefill", ["absorbed", "expanded", "auto", "torch"])
def test_flashinfer_mla_backend_glue_gives_transformers_tokens(engines, tiny_v3, monkeypatch, prefill):
    """The FlashInfer MLA backend (plan per forward, latent pages read in place) over FlashInfer's API
    in torch: transformers' greedy tokens, one plan per forward whatever the number of layers.
    DISAGG_MLA_PREFILL: prefill chunks and mixed batches (a chunk on a cached prefix, decode rows
    beside it) in the absorbed form on the MLA kernel, in the expanded form on the ragged prefill
    kernel (every key's latent listed and expanded), each batch in the form of fewer FLOPs (auto:
    here the long chunks expanded, the mixed batches absorbed), or expanded on torch SDPA; decode
    batches always on the MLA kernel."""
    from disagg.common.engine.attention_flashinfer import FlashInferMLABackend, expanded_pays
    from disagg.common.models.deepseek import mla_dims

    monkeypatch.setenv("DISAGG_MLA_PREFILL", prefill)

    engine = engines.get(model_path=tiny_v3, page_size=4, chunked_prefill_size=16, max_total_tokens=1024)
    runner = engine.scheduler.runner
    heads, dims = runner.hf_config.num_attention_heads, mla_dims(runner.hf_config)
    backend = FlashInferMLABackend(
        torch.device("cpu"), runner.pool, heads, dims, api=ReferenceMLAApi, ragged=ReferenceRaggedWrapper
    )
    batches, prepare = [], backend.prepare

    def recording_prepare(batch):
        batches.append((batch.is_decode_only, expanded_pays(batch.q_lens, batch.kv_lens, dims)))
        prepare(batch)

    backend.prepare = recording_prepare
    torch_backend, runner.backend = runner.backend, backend
    try:
        rng = random.Random(3)
        prompts = [[rng.randrange(512) for _ in range(n)] for n in (1, 6, 23, 41)]
        outs = engine.generate(prompts, {"max_new_tokens": 12, "temperature": 0, "ignore_eos": True})
    finally:
        runner.backend = torch_backend
    for prompt, out in zip(prompts, outs, strict=True):
        assert out["output_ids"] == hf_greedy(tiny_v3, prompt, 12)
    decode = sum(d for d, _ in batches)
    expanded = {"absorbed": 0, "expanded": len(batches) - decode, "torch": 0}.get(
        prefill, sum(not d and pays for d, pays in batches)
    )
    mla = len(batches) - expanded - (len(batches) - decode if prefill == "torch" else 0)
    assert 0 < decode < len(batches) >= 12
    assert (backend.wrapper.plans, backend.ragged.plans if backend.ragged else 0) == (mla, expanded)
    if prefill == "auto":
        assert 0 < expanded < len(batches) - decode  # both forms ran
    assert_pool_clean(engine.scheduler)


def test_float32_mla_model_runs_torch_attention_on_a_gpu(monkeypatch):
    """FlashInfer's MLA kernels take 16-bit queries: on a GPU with FlashInfer, auto gives a float32
    MLA model the torch backend and an explicit flashinfer is refused with the dtype named."""
    from types import SimpleNamespace

    from disagg.common.engine import attention
    from disagg.common.engine.attention import TorchBackend, create_attention_backend

    monkeypatch.setattr(attention, "_has_flashinfer", lambda: True)
    pool = SimpleNamespace(dtype=torch.float32)
    assert isinstance(create_attention_backend("auto_mla", torch.device("cuda"), pool=pool), TorchBackend)
    with pytest.raises(ValueError, match="bfloat16"):
        create_attention_backend("flashinfer_mla", torch.device("cuda"), pool=pool)
