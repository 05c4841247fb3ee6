"""On a CUDA GPU with FlashInfer: MLA (DeepSeek) attention on FlashInfer's MLA kernels over the
latent pages in place. The kernel's decode and prefill (absorbed form, causal), and the expanded form
on the ragged prefill kernel, equal the torch MLA path on the same pages; a small dummy DeepSeek-V3 shape (FP8 linears on Hopper) decodes the same
greedy tokens on torch attention, on FlashInfer eagerly and on FlashInfer under CUDA graphs (bf16:
vLLM's check_logprobs_close, as tests/test_gpu_engine.py). Skipped without CUDA or flashinfer."""

from __future__ import annotations

import json

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

# DeepSeek-V3's attention shape (kv_lora_rank 512, rope 64, nope 128, v 128) with 16 heads and
# small everything else; first layer dense, second DeepSeekMoE
SMALL_V3 = dict(num_hidden_layers=2, hidden_size=256, intermediate_size=512, moe_intermediate_size=128,
                num_attention_heads=16, num_key_value_heads=16, q_lora_rank=192, n_routed_experts=8,
                n_group=4, topk_group=2, vocab_size=1024, first_k_dense_replace=1,
                max_position_embeddings=2048)  # fmt: skip


def attn_config():
    from disagg.common.models.weights import load_config

    return load_config("DeepSeek-V3", json.dumps(SMALL_V3))


def _mla_layer():
    from disagg.common.models.deepseek import MLAttention
    from disagg.common.models.layers import RotaryEmbedding

    config = attn_config()
    torch.manual_seed(0)
    with torch.device("cuda"):
        attn = MLAttention(config, 0, RotaryEmbedding(config, config.qk_rope_head_dim, 2048))
    for p in attn.parameters():
        p.data.normal_(0, 0.05)
    return attn.to(torch.bfloat16)


def _batch(q_lens: list[int], kv_lens: list[int], page_size: int):
    """Requests on scattered pages (reversed order), new tokens at the end of each."""
    from disagg.common.engine.attention import ForwardBatch

    tables, pos, pages, offsets, next_page = [], [], [], [], 200
    for q, kv in zip(q_lens, kv_lens, strict=True):
        n = (kv + page_size - 1) // page_size
        table = list(range(next_page, next_page - n, -1))
        next_page -= n
        tables.append(table)
        pos += list(range(kv - q, kv))
        pages += [table[p // page_size] for p in range(kv - q, kv)]
        offsets += [p % page_size for p in range(kv - q, kv)]

    def t(x):
        return torch.tensor(x, dtype=torch.long, device="cuda")

    return ForwardBatch(input_ids=t([0] * len(pos)), positions=t(pos), out_page=t(pages), out_offset=t(offsets),
                        q_lens=q_lens, kv_lens=kv_lens, page_tables=tables, logits_index=t([0]),
                        page_size=page_size)  # fmt: skip


@pytest.mark.parametrize(
    "q_lens,kv_lens,page_size,form",
    [
        ([1, 1, 1, 1], [1, 17, 300, 1024], 16, "absorbed"),  # decode (causal=False)
        ([1, 1], [5, 70], 1, "absorbed"),  # decode, page size 1 (SGLang's MLA layout)
        (
            [37, 1, 130],
            [37, 900, 200],
            16,
            "absorbed",
        ),  # a prompt, a decode and a chunk on a prefix (causal=True)
        ([37, 1, 130], [37, 900, 200], 16, "expanded"),  # the same on the ragged prefill kernel
        ([1000, 300], [1000, 301], 16, "expanded"),  # a long prompt, a chunk on a one-token prefix
    ],
)
def test_flashinfer_mla_equals_torch_on_the_same_pages(q_lens, kv_lens, page_size, form, monkeypatch):
    pytest.importorskip("flashinfer")
    from disagg.common.engine.attention import TorchBackend
    from disagg.common.engine.attention_flashinfer import FlashInferMLABackend
    from disagg.common.engine.kv_pool import KVPagePool
    from disagg.common.models.deepseek import gather_latent, latent_pages, mla_dims, write_latent

    monkeypatch.setenv("DISAGG_MLA_PREFILL", form)
    attn = _mla_layer()
    pool = KVPagePool(256, page_size, 1, 1, (attn.rank + attn.rope_dim) // 2, torch.bfloat16, "cuda")
    batch = _batch(q_lens, kv_lens, page_size)
    # every cached latent (prefix and new tokens): random bf16 values written through write_latent
    full = _batch(kv_lens, kv_lens, page_size)
    latent = torch.randn(sum(kv_lens), attn.rank + attn.rope_dim, device="cuda", dtype=torch.bfloat16)
    write_latent(pool.kv_buffer[0], full, latent)
    t = len(batch.input_ids)
    q_nope = torch.randn(t, attn.num_heads, attn.nope, device="cuda", dtype=torch.bfloat16)
    q_pe = torch.randn(t, attn.num_heads, attn.rope_dim, device="cuda", dtype=torch.bfloat16)

    fi = FlashInferMLABackend(torch.device("cuda"), pool, attn.num_heads, mla_dims(attn_config()))
    fi.prepare(batch)
    assert fi.runs_expanded(batch) == (form == "expanded" and not batch.is_decode_only)
    # the planners' host arrays are pinned: their copies never wait for a step in flight
    planned = batch.attn["mla_ragged"] if fi.runs_expanded(batch) else batch.attn["mla_metadata"]
    assert all(t.is_pinned() for t in planned if t.device.type == "cpu")
    TorchBackend().prepare(batch)
    pages = latent_pages(pool.kv_buffer[0])
    with torch.inference_mode():  # as the model runs (its GEMMs write into preallocated rows)
        if fi.runs_expanded(batch):
            out = attn.ragged_expanded_attention(q_nope, q_pe, pages, batch, fi).float()
        else:
            out = attn.paged_absorbed_attention(q_nope, q_pe, pages, batch, fi).float()
    # the torch MLA path in float32 on the same bf16 values: absorbed for decode, expanded for prefill
    ref_attn = attn.float()
    form = ref_attn.absorbed_attention if batch.is_decode_only else ref_attn.expanded_attention
    ref = form(q_nope.float(), q_pe.float(), gather_latent(pool.kv_buffer[0], batch).float(), batch)
    assert out.shape == ref.shape == (t, attn.num_heads, attn.v_dim)
    assert ((out - ref).norm() / ref.norm()).item() < 2e-2


def _generate(backend: str, disable_cuda_graph: bool, prompts, params, **kwargs):
    from disagg.common.engine.offline import Engine

    engine = Engine(model_path="DeepSeek-V3", load_format="dummy", json_model_override_args=json.dumps(SMALL_V3),
                    attention_backend=backend, disable_cuda_graph=disable_cuda_graph, chunked_prefill_size=64,
                    max_total_tokens=8192, cuda_graph_max_bs=8, **kwargs)  # fmt: skip
    try:
        runner = engine.scheduler.runner
        kinds = (type(runner.backend).__name__, runner.graph_runner is not None)
        outs = engine.generate(prompts, params)
        engine.scheduler.cache.reset()
        assert engine.scheduler.pool.num_free_pages == engine.scheduler.pool.num_pages
        return kinds, [(o["output_ids"], o["meta_info"]["output_top_logprobs"]) for o in outs]
    finally:
        engine.shutdown()


def _assert_close(ours, ref) -> int:
    """vLLM's check_logprobs_close: equal up to the first difference, where each side's token is in
    the other's top 5. Returns how many sequences are equal throughout."""
    exact = 0
    for (a, a_top), (b, b_top) in zip(ours, ref, strict=True):
        k = next((j for j, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), None)
        if k is None:
            exact += 1
            continue
        assert a[k] in {tok for tok, _ in b_top[k]} and b[k] in {tok for tok, _ in a_top[k]}, (k, a, b)
    return exact


def test_small_v3_greedy_tokens_torch_flashinfer_and_cuda_graphs():
    """auto on CUDA picks FlashInfer's MLA backend and captures decode graphs; its tokens (chunked
    prefill over a prefix included) follow the torch path's, with or without graphs."""
    pytest.importorskip("flashinfer")
    prompts = [[5, 6, 7], list(range(100, 140)), list(range(200, 330)), [(7 * i) % 1000 for i in range(300)]]
    params = {"max_new_tokens": 24, "temperature": 0, "ignore_eos": True, "top_logprobs_num": 5}
    kinds_t, torch_out = _generate("torch", True, prompts, params)
    kinds_e, eager = _generate("flashinfer", True, prompts, params)
    kinds_g, graphs = _generate("auto", False, prompts, params)
    assert kinds_t == ("TorchBackend", False)
    assert kinds_e == ("FlashInferMLABackend", False)
    assert kinds_g == ("FlashInferMLABackend", True)
    exact = (_assert_close(eager, torch_out), _assert_close(graphs, eager))
    print(f"equal throughout: flashinfer vs torch {exact[0]}/4, graphs vs eager {exact[1]}/4")
    assert exact[1] >= 3  # the same kernel: at most a padded bucket's different split may flip a tie


def test_small_v3_fused_shared_experts_keep_the_tokens():
    """Shared-experts fusion (the default) on the GPU (FP8 experts on Hopper, the shared expert a slot
    of their GEMV and grouped GEMM, the routing kernel writing its slot, CUDA graphs): the unfused
    engine's (--disable-shared-experts-fusion) greedy tokens within vLLM's logprob-closeness check."""
    pytest.importorskip("flashinfer")
    prompts = [[5, 6, 7], list(range(100, 140)), list(range(200, 330)), [(7 * i) % 1000 for i in range(300)]]
    params = {"max_new_tokens": 24, "temperature": 0, "ignore_eos": True, "top_logprobs_num": 5}
    _, plain = _generate("auto", False, prompts, params, disable_shared_experts_fusion=True)
    _, fused = _generate("auto", False, prompts, params)
    print(f"equal throughout: fused vs plain {_assert_close(fused, plain)}/4")
