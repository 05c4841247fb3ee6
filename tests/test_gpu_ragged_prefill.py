"""On a CUDA GPU: a batch of fresh prompts attends on FlashInfer's ragged prefill kernel over the
step's own K/V (DISAGG_RAGGED_PREFILL=1), giving the paged kernel's output over the same
keys in the pool; a batch with a cached prefix, or decode, stays on the paged kernels; and a
Qwen3-shaped decoder (q/k norm, the fused RoPE + K/V write rotating K in place) gives the same
logits either way."""

from __future__ import annotations

import itertools

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _batch(q_lens, kv_lens, page_size, num_pages, gen):
    from disagg.common.engine.attention import ForwardBatch

    dev = torch.device("cuda")
    order = torch.randperm(
        num_pages, generator=gen
    ).tolist()  # pages in any order, as the pool hands them out
    tables, positions, pages, offsets = [], [], [], []
    for q, kv in zip(q_lens, kv_lens, strict=True):
        n = (kv + page_size - 1) // page_size
        tables.append([order.pop() for _ in range(n)])
        for pos in range(kv - q, kv):
            positions.append(pos)
            pages.append(tables[-1][pos // page_size])
            offsets.append(pos % page_size)

    def t(x):
        return torch.tensor(x, dtype=torch.long, device=dev)

    batch = ForwardBatch(
        input_ids=t([0] * len(positions)), positions=t(positions), out_page=t(pages), out_offset=t(offsets),
        q_lens=list(q_lens), kv_lens=list(kv_lens), page_tables=tables,
        logits_index=t(list(itertools.accumulate(q_lens))) - 1, page_size=page_size,
    )  # fmt: skip
    batch.k_rows = batch.out_page * (2 * page_size) + batch.out_offset
    return batch


@pytest.mark.parametrize("page_size", [1, 16])
def test_ragged_fresh_prompts_equal_the_paged_kernel(page_size, monkeypatch):
    from disagg.common.engine.attention_flashinfer import FlashInferBackend
    from disagg.common.engine.kv_pool import KVPagePool

    gen = torch.Generator().manual_seed(0)
    hq, hkv, d, dt = 8, 2, 128, torch.bfloat16
    monkeypatch.setenv("DISAGG_RAGGED_PREFILL", "1")
    pool = KVPagePool(4096 // page_size, page_size, 1, hkv, d, dt, torch.device("cuda"))
    backend = FlashInferBackend(torch.device("cuda"), pool, hq)
    assert backend.ragged is not None
    batch = _batch([37, 300, 1], [37, 300, 1], page_size, pool.num_pages, gen)
    t = sum(batch.q_lens)
    q = torch.randn(t, hq, d, generator=gen).to(dt).cuda()
    qkv = torch.randn(t, 2 * hkv * d, generator=gen).to(dt).cuda()  # K and V as strided views of one row
    k, v = qkv[:, : hkv * d].view(t, hkv, d), qkv[:, hkv * d :].view(t, hkv, d)
    kv = pool.kv_buffer[0]
    rows = kv.view(-1, hkv, d)
    rows[batch.k_rows] = k
    rows[batch.k_rows + page_size] = v
    backend.prepare(batch)
    assert backend.attends_new_kv(batch)
    ragged = backend.forward_new_kv(q, k, v, batch)
    backend.ragged, ragged_wrapper = None, backend.ragged  # the same batch on the paged kernel
    batch.attn.clear()
    backend.prepare(batch)
    assert not backend.attends_new_kv(batch)
    paged = backend.forward(q, kv, batch)
    torch.testing.assert_close(ragged.float(), paged.float(), atol=2e-2, rtol=2e-2)
    # a cached prefix (kv > q) or a decode step: the paged kernels
    backend.ragged = ragged_wrapper
    for q_lens, kv_lens in (([20, 1], [57, 1]), ([1, 1], [40, 9])):
        other = _batch(q_lens, kv_lens, page_size, pool.num_pages, gen)
        backend.prepare(other)
        assert not backend.attends_new_kv(other)


PARAMS = {"max_new_tokens": 8, "temperature": 0, "ignore_eos": True, "top_logprobs_num": 5}


@pytest.mark.parametrize("fused", [True, False])
def test_engine_tokens_ragged_close_to_paged(fused, tmp_path, monkeypatch):
    """A tiny Qwen3 (q/k norm, GQA, head_dim 128) in bf16 with FlashInfer: prompts prefilled whole
    (fresh: ragged) then decoded, against DISAGG_RAGGED_PREFILL=0; with the fused RoPE + K/V write
    (K rotated in place) and with the torch ops (DISAGG_FUSED_KERNELS=0). Eager prefills: the
    prefill graphs (test_gpu_prefill_graph.py) run their own ragged kernel whatever the switch says."""
    pytest.importorskip("flashinfer")
    from disagg.common.engine.attention_flashinfer import FlashInferBackend
    from disagg.common.engine.offline import Engine
    from disagg.common.models.fused_rope_kv import fused_rope_kv_ok
    from disagg.common.models.kernels import fused_kernels

    from tests.conftest import assert_logprobs_close, make_tiny_model

    path = make_tiny_model(tmp_path / "q3", "qwen3", head_dim=128, num_attention_heads=8, hidden_size=256)
    prompts = [list(range(3, 200)), [5, 9, 11] * 30, [7]]
    calls = []
    original = FlashInferBackend.forward_new_kv
    monkeypatch.setattr(
        FlashInferBackend, "forward_new_kv", lambda self, *a: calls.append(1) or original(self, *a)
    )
    monkeypatch.setenv("DISAGG_FUSED_KERNELS", "1" if fused else "0")
    outs = {}
    for ragged in ("1", "0"):
        monkeypatch.setenv("DISAGG_RAGGED_PREFILL", ragged)
        fused_rope_kv_ok.cache_clear()
        with fused_kernels(fused):
            engine = Engine(model_path=path, attention_backend="flashinfer", dtype="bfloat16",
                            max_total_tokens=8192, page_size=16, chunked_prefill_size=4096,
                            disable_prefill_cuda_graph=True)  # fmt: skip
            try:
                used = [layer.self_attn.fused_rope_kv for layer in engine.scheduler.runner.model.layers]
                assert all(used) if fused else not any(used)
                before = len(calls)
                outs[ragged] = engine.generate(prompts, PARAMS)
                assert (len(calls) > before) == (ragged == "1")  # the ragged kernel ran, or never
            finally:
                engine.shutdown()
    assert_logprobs_close(outs["1"], outs["0"])
