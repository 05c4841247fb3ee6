"""On a CUDA GPU: the fused RoPE + K/V write (common/models/fused_rope_kv.py) compiled. The kernel
equals the torch path in bf16 and float32 at the 8B shape (32 q heads, 8 KV heads, head_dim 128,
page 16) and Qwen3-30B-A3B's (32/4/128 with q/k norm), for a decode batch, a prefill-sized launch
and inside a CUDA graph replayed on new inputs; the start-up check passes on these shapes; the engine
with every fused kernel on gives the greedy tokens of DISAGG_FUSED_KERNELS=0 within vLLM's
logprob-closeness check (tests/test_gpu_engine.py's), on the default model and on a tiny Qwen3."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import assert_logprobs_close

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

SHAPES = {"llama-8b": (32, 8, 128, False), "qwen3-30b-a3b": (32, 4, 128, True)}


def _inputs(t, hq, hkv, d, qk_norm, dtype, page_size=16, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, device="cuda").to(dtype)

    pages = 2 * t // page_size + 4
    qkv = randn(t, (hq + 2 * hkv) * d)
    positions = torch.randint(0, 4096, (t,), generator=g, device="cuda")
    slots = torch.randperm(pages * page_size, generator=g, device="cuda")[:t]
    k_rows = slots // page_size * (2 * page_size) + slots % page_size
    inv = 1.0 / (500000.0 ** (torch.arange(0, d, 2, device="cuda").float() / d))
    freqs = torch.outer(torch.arange(4096, device="cuda").float(), inv)
    cos_sin = torch.cat([freqs.cos(), freqs.sin()], -1)
    norm = (randn(d), randn(d), 1e-6) if qk_norm else None
    pool = randn(pages, 2, page_size, hkv, d)
    return qkv, positions, k_rows, cos_sin, norm, pool


def _views(qkv, hq, hkv, d):
    q, k, v = qkv.split([hq * d, hkv * d, hkv * d], -1)
    return q.view(len(qkv), hq, d), k.view(len(qkv), hkv, d), v.view(len(qkv), hkv, d)


def _assert_close(got, want, dtype):
    # float32: rounding order only; 16 bits: a few ulps of the largest value (fused_rope_kv.close_enough's why)
    tol = (1e-5 if dtype == torch.float32 else 1 / 32) * want.float().abs().max().item()
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("shape", list(SHAPES), ids=list(SHAPES))
@pytest.mark.parametrize("tokens", [1, 64, 4096], ids=["decode1", "decode64", "prefill4096"])
def test_kernel_matches_the_torch_path(shape, dtype, tokens):
    pytest.importorskip("triton")
    from disagg.common.models.fused_rope_kv import fused_rope_kv, rope_kv_reference

    hq, hkv, d, qk_norm = SHAPES[shape]
    qkv, positions, k_rows, cos_sin, norm, pool = _inputs(tokens, hq, hkv, d, qk_norm, dtype)
    kv_got, kv_want = pool.clone(), pool.clone()
    got = fused_rope_kv(positions, *_views(qkv, hq, hkv, d), kv_got, k_rows, cos_sin, norm)
    want = rope_kv_reference(positions, *_views(qkv, hq, hkv, d), kv_want, k_rows, cos_sin, norm)
    _assert_close(got, want, dtype)
    _assert_close(kv_got, kv_want, dtype)
    if dtype == torch.bfloat16:  # torch's roundings (to nearest): nearly every element bit-equal
        assert (got != want).float().mean().item() < 1e-2


@pytest.mark.parametrize("shape", list(SHAPES), ids=list(SHAPES))
def test_kernel_replays_in_a_cuda_graph(shape):
    """Captured once on static buffers, replayed on new positions, slots and activations."""
    pytest.importorskip("triton")
    from disagg.common.models.fused_rope_kv import fused_rope_kv, rope_kv_reference

    hq, hkv, d, qk_norm = SHAPES[shape]
    dtype, t = torch.bfloat16, 8
    qkv, positions, k_rows, cos_sin, norm, pool = _inputs(t, hq, hkv, d, qk_norm, dtype)
    kv = pool.clone()
    fused_rope_kv(positions, *_views(qkv, hq, hkv, d), kv, k_rows, cos_sin, norm)  # compile outside the graph
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fused_rope_kv(positions, *_views(qkv, hq, hkv, d), kv, k_rows, cos_sin, norm)
    for seed in (1, 2):
        new_qkv, new_pos, new_rows, _, _, new_pool = _inputs(t, hq, hkv, d, qk_norm, dtype, seed=seed)
        for static, new in ((qkv, new_qkv), (positions, new_pos), (k_rows, new_rows), (kv, new_pool)):
            static.copy_(new)
        graph.replay()
        kv_want = new_pool.clone()
        want = rope_kv_reference(new_pos, *_views(new_qkv, hq, hkv, d), kv_want, new_rows, cos_sin, norm)
        torch.cuda.synchronize()
        _assert_close(out, want, dtype)
        _assert_close(kv, kv_want, dtype)


def test_start_up_check_passes_on_the_model_shapes():
    pytest.importorskip("triton")
    from disagg.common.models.fused_rope_kv import fused_rope_kv_ok

    cuda = torch.device("cuda", 0)
    fused_rope_kv_ok.cache_clear()
    for hq, hkv, d, qk_norm in [*SHAPES.values(), (9, 3, 64, False), (4, 2, 64, True)]:
        assert fused_rope_kv_ok(cuda, torch.bfloat16, hq, hkv, d, qk_norm), (hq, hkv, d, qk_norm)
    assert not fused_rope_kv_ok(cuda, torch.float32, 32, 8, 128, False)  # float32 keeps the torch ops


PROMPTS = [
    [1, 409, 314, 253, 134, 282, 350, 30],
    list(range(200, 240)),
    [9, 8, 7, 6, 5, 4, 3, 2, 1] * 3,
]  # < 512: tiny vocab
PARAMS = {"max_new_tokens": 32, "temperature": 0, "ignore_eos": True, "top_logprobs_num": 5}


def _generate(path: str, fused: bool, monkeypatch) -> list[dict]:
    from disagg.common.engine.offline import Engine
    from disagg.common.models.fused_rope_kv import fused_rope_kv_ok
    from disagg.common.models.kernels import fused_kernels

    monkeypatch.setenv("DISAGG_FUSED_KERNELS", "1" if fused else "0")
    fused_rope_kv_ok.cache_clear()
    with fused_kernels(fused):  # FlashInfer's kernels read the variable at import: the switch instead
        engine = Engine(model_path=path, attention_backend="flashinfer", dtype="bfloat16", max_total_tokens=16384,
                        page_size=16, chunked_prefill_size=16)  # fmt: skip
        try:
            used = [layer.self_attn.fused_rope_kv for layer in engine.scheduler.runner.model.layers]
            assert all(used) if fused else not any(used)
            return engine.generate(PROMPTS, PARAMS)
        finally:
            engine.shutdown()


@pytest.mark.parametrize("model", ["default", "tiny-qwen3"])
def test_engine_tokens_with_fused_kernels_close_to_without(model, default_model_path, tmp_path, monkeypatch):
    """CUDA graphs for decode, prefill chunks of 16 (tiny Qwen3 at head_dim 64: FlashInfer's decode
    takes 64/128/256)."""
    pytest.importorskip("flashinfer")
    from tests.conftest import make_tiny_model

    path = (
        default_model_path if model == "default" else make_tiny_model(tmp_path / "q3", "qwen3", head_dim=64)
    )
    assert_logprobs_close(_generate(path, True, monkeypatch), _generate(path, False, monkeypatch))
