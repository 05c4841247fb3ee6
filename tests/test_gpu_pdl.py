"""On a Hopper GPU: the Triton kernels launched with PDL (DISAGG_PDL=1, common/models/pdl.py), eager
and inside a CUDA graph replayed on new inputs, give the bits of plain launches. Each chain makes
one of our kernels read what the previous one just wrote (a PDL edge): routing -> the expert GEMVs
(or the alignment and grouped GEMMs) -> the next layer's experts -> RoPE + K/V write on the experts'
output; the FP8 activation quantization -> the FP8 block GEMM -> MLA's fused steps on its output.
A kernel that read its predecessor's output before `griddepcontrol.wait` would read the previous
replay's (other) values."""

from __future__ import annotations

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0),
        reason="PDL needs a CUDA GPU of compute capability >= 9",
    ),
]
pytest.importorskip("triton")

BF16 = torch.bfloat16
E, INTER, TOP_K, LAYERS = 16, 256, 4, 3  # experts
HQ, HKV, D = 8, 2, 64  # attention heads
HIDDEN = (HQ + 2 * HKV) * D  # the experts' output is the fused qkv the RoPE kernel reads


@pytest.fixture
def pdl_switch(monkeypatch):
    from disagg.common.models import pdl

    def switch(on: bool) -> None:
        monkeypatch.setenv("DISAGG_PDL", "1" if on else "0")
        pdl.pdl_enabled.cache_clear()
        assert pdl.pdl_enabled(torch.device("cuda", torch.cuda.current_device())) == on

    yield switch
    pdl.pdl_enabled.cache_clear()  # the next test decides again, under the restored environment


def _run(step, values: list[list[torch.Tensor]], graphed: bool) -> list[list[torch.Tensor]]:
    """step's outputs for each set of input values: eager, or captured once in a CUDA graph (static
    inputs, Triton compiled before the capture) and replayed with each set copied in."""
    if not graphed:
        return [[o.clone() for o in step(*[v.clone() for v in vs])] for vs in values]
    inputs = [v.clone() for v in values[0]]
    step(*[v.clone() for v in inputs])
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = step(*inputs)
    results = []
    for vs in values:
        for static, v in zip(inputs, vs, strict=True):
            static.copy_(v)
        graph.replay()
        results.append([o.clone() for o in outs])
    torch.cuda.synchronize()
    return results


def _same_with_and_without_pdl(pdl_switch, step, values, exact: bool = True) -> None:
    pdl_switch(False)
    want = _run(step, values, graphed=False)
    pdl_switch(True)
    for graphed in (False, True):
        got = _run(step, values, graphed)
        for i, (outs, refs) in enumerate(zip(got, want, strict=True)):
            for j, (a, b) in enumerate(zip(outs, refs, strict=True)):
                if exact:  # the same arithmetic, the same bits
                    assert torch.equal(a, b), (graphed, i, j)
                else:  # split-K atomics: fp32 sums in any order
                    torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("tokens, split_k", [(1, 1), (1, 8), (16, 1), (300, 1)])
def test_moe_and_rope_kv_chain(pdl_switch, tokens, split_k):
    """1 token: the GEMV path (split K 1: stores; 8: atomics into a zeroed buffer); 16 tokens x 4
    experts: the one-program alignment, the grouped GEMMs and the top-k sum; 300 (1200 pairs): the
    alignment's three launches."""
    from disagg.common.models.fused_moe import fused_experts, fused_topk, moe_config
    from disagg.common.models.fused_rope_kv import fused_rope_kv

    g = torch.Generator(device="cuda").manual_seed(0)
    w13 = (torch.randn(LAYERS, E, 2 * INTER, HIDDEN, generator=g, device="cuda") / HIDDEN**0.5).to(BF16)
    w2 = (torch.randn(LAYERS, E, HIDDEN, INTER, generator=g, device="cuda") / INTER**0.5).to(BF16)
    freqs = torch.outer(
        torch.arange(4096, device="cuda").float(), torch.rand(D // 2, generator=g, device="cuda")
    )
    cos_sin = torch.cat([freqs.cos(), freqs.sin()], -1)
    config = dict(moe_config(E, INTER, HIDDEN))
    config["gemv"] = dict(config["gemv"], SPLIT_K=split_k)

    def step(logits, x, positions, k_rows, pool):
        weights, ids = fused_topk(logits, TOP_K, renormalize=True)
        h = x
        for layer in range(LAYERS):
            h = fused_experts(h, w13[layer], w2[layer], weights, ids, config)
        q, k, v = (p.view(tokens, -1, D) for p in h.split([HQ * D, HKV * D, HKV * D], -1))
        return h, fused_rope_kv(positions, q, k, v, pool, k_rows, cos_sin), pool

    def values(seed):
        g = torch.Generator(device="cuda").manual_seed(seed)
        pages, page_size = -(-tokens // 16) + 4, 16
        slots = torch.randperm(pages * page_size, generator=g, device="cuda")[:tokens]  # distinct
        return [
            torch.randn(tokens, E, generator=g, device="cuda"),
            torch.randn(tokens, HIDDEN, generator=g, device="cuda").to(BF16),
            torch.randint(0, 4096, (tokens,), generator=g, device="cuda"),
            slots // page_size * (2 * page_size) + slots % page_size,
            torch.randn(pages, 2, page_size, HKV, D, generator=g, device="cuda").to(BF16),
        ]

    _same_with_and_without_pdl(pdl_switch, step, [values(s) for s in (1, 2, 3)], exact=split_k == 1)


@pytest.mark.parametrize("tokens", [1, 64])
def test_fp8_gemm_and_mla_rope_chain(pdl_switch, tokens):
    """The FP8 path of a DeepSeek-V3 layer's x projection: quantize, block GEMM into the latent
    (kv_a, 512 + 64 wide; split K 1 at these sizes), MLA's fused steps on it."""
    from disagg.common.models.fp8_kernels import block_fp8_matmul, quantize_activation_groups_triton
    from disagg.common.models.fused_mla_rope import fused_mla_rope

    heads, nope, rope, rank, k_dim = 16, 128, 64, 512, 1024
    g = torch.Generator(device="cuda").manual_seed(0)
    wq = (torch.randn(rank + rope, k_dim, generator=g, device="cuda") / 2).to(torch.float8_e4m3fn)
    ws = torch.rand(-(-(rank + rope) // 128), k_dim // 128, generator=g, device="cuda") / 32
    norm_w = torch.randn(rank, generator=g, device="cuda").to(BF16)
    freqs = torch.outer(
        torch.arange(4096, device="cuda").float(), torch.rand(rope // 2, generator=g, device="cuda")
    )
    cos_sin = torch.cat([freqs.cos(), freqs.sin()], -1)

    def step(x, q, positions, out_page, out_offset, pages):
        xq, xs = quantize_activation_groups_triton(x, 128)
        kv_a = block_fp8_matmul(xq, xs, wq, ws, (128, 128), BF16)
        q_pe = fused_mla_rope(positions, q, kv_a, norm_w, 1e-6, pages, out_page, out_offset, cos_sin, True)
        return kv_a, q_pe, pages

    def values(seed):
        g = torch.Generator(device="cuda").manual_seed(seed)
        num_pages, page_size = 2 * tokens // 16 + 4, 16
        slots = torch.randperm(num_pages * page_size, generator=g, device="cuda")[:tokens]
        return [
            torch.randn(tokens, k_dim, generator=g, device="cuda").to(BF16),
            torch.randn(tokens, heads, nope + rope, generator=g, device="cuda").to(BF16),
            torch.randint(0, 4096, (tokens,), generator=g, device="cuda"),
            slots // page_size,
            slots % page_size,
            torch.randn(num_pages, page_size, rank + rope, generator=g, device="cuda").to(BF16),
        ]

    _same_with_and_without_pdl(pdl_switch, step, [values(s) for s in (1, 2, 3)])
