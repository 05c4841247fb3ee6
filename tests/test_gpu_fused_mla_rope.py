"""On a CUDA GPU: MLA's latent norm + RoPE + latent write (common/models/fused_mla_rope.py) compiled.
The start-up check passes at DeepSeek-V3's widths (128 heads, nope 128, rope 64, rank 512; a TP
shard of 16 heads) and V2-Lite's (16 heads), interleaved and plain, in bf16 (float32 keeps the
torch ops); inside a CUDA graph replayed on new inputs the kernel equals the torch path. The engine
with the kernel is covered by tests/test_gpu_mla.py (FlashInfer's MLA against the CPU path)."""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_start_up_check_passes_on_the_model_shapes():
    pytest.importorskip("triton")
    from disagg.common.models.fused_mla_rope import fused_mla_rope_ok

    cuda = torch.device("cuda", 0)
    fused_mla_rope_ok.cache_clear()
    for heads in (128, 16, 3):
        for interleaved in (True, False):
            assert fused_mla_rope_ok(cuda, torch.bfloat16, heads, 128, 64, 512, interleaved), heads
    assert not fused_mla_rope_ok(cuda, torch.float32, 16, 128, 64, 512, True)


def _inputs(t, h, dtype, seed, page_size=16):
    g = torch.Generator(device="cuda").manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, device="cuda").to(dtype)

    pages = 2 * t // page_size + 4
    slots = torch.randperm(pages * page_size, generator=g, device="cuda")[:t]
    positions = torch.randint(0, 4096, (t,), generator=g, device="cuda")
    return (
        randn(t, h, 192),
        randn(t, 576),
        positions,
        slots // page_size,
        slots % page_size,
        randn(pages, page_size, 576),
    )


@pytest.mark.parametrize("t", [1, 64])
def test_kernel_in_a_cuda_graph_equals_the_torch_path(t):
    pytest.importorskip("triton")
    from disagg.common.models.fused_mla_rope import fused_mla_rope, mla_rope_reference

    h, dtype = 16, torch.bfloat16
    q, kv_a, positions, out_page, out_offset, pool = _inputs(t, h, dtype, 0)
    inv = 1.0 / (10000.0 ** (torch.arange(0, 64, 2, device="cuda").float() / 64))
    freqs = torch.outer(torch.arange(4096, device="cuda").float(), inv)
    cos_sin = torch.cat([freqs.cos(), freqs.sin()], -1)
    weight = torch.randn(512, device="cuda").to(dtype)
    pages = pool.clone()
    args = (
        positions,
        q,
        kv_a,
        weight,
        1e-6,
        pages,
        out_page,
        out_offset,
        cos_sin,
        True,
    )  # the static buffers
    fused_mla_rope(*args)  # compile outside the graph
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fused_mla_rope(*args)
    for seed in (1, 2):
        new = _inputs(t, h, dtype, seed)
        for static, value in zip((q, kv_a, positions, out_page, out_offset, pages), new, strict=True):
            static.copy_(value)
        graph.replay()
        want_pages = new[-1].clone()
        want = mla_rope_reference(
            new[2], new[0], new[1], weight, 1e-6, want_pages, new[3], new[4], cos_sin, True
        )
        torch.cuda.synchronize()
        for got, ref in ((out, want), (pages, want_pages)):
            tol = ref.float().abs().max().item() / 32  # a few bf16 ulps (fused_rope_kv.close_enough)
            torch.testing.assert_close(got.float(), ref.float(), atol=tol, rtol=0)
