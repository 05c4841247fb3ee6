"""On a CUDA GPU: norm_gemv (common/models/norm_gemv.py) compiled. At the 8B's qkv and gate_up,
Qwen3-30B-A3B's qkv and DeepSeek-V2-Lite's q | kv_a shapes the kernel equals the torch path in bf16
(the new residual bit for bit: the GPU rounds to nearest as torch does, which the interpreter cannot
show) for 1-8 tokens, and at the Qwen3-30B-A3B and Mixtral routers' and V2-Lite's shared gate_up
shapes with the normalised input returned; so does silu_mul_gemv (common/models/act_gemv.py) at the
8B's and V2-Lite's dense down shapes; every sweep layout of the benchmark agrees, both replay in a
CUDA graph on new inputs, the start-up checks pass on these shapes; a tiny Llama, Qwen2 and
Qwen3-MoE and a dummy V2-Lite-like DeepSeek with DISAGG_NORM_GEMV=1 (CUDA graphs, decode batches
fused) give the greedy tokens of the unfused engine within vLLM's logprob-closeness check."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import assert_logprobs_close

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
pytest.importorskip("triton")

SHAPES = {
    "llama-8b-qkv": (4096, 6144),
    "llama-8b-gate_up": (4096, 28672),
    "qwen3-30b-a3b-qkv": (2048, 5120),
    "v2-lite-qkv_a": (2048, 3648),  # DeepSeek-V2-Lite's MLA q_proj | kv_a_proj_with_mqa: 3072 + 576 rows
}


def _inputs(t, k, n, seed=0, bias=False):
    g = torch.Generator(device="cuda").manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, device="cuda") * scale).bfloat16()

    b = randn(n) if bias else None
    return randn(t, k), randn(t, k), randn(k), randn(n, k, scale=k**-0.5), b


def _assert_agrees(got, want):
    from disagg.common.models.fused_rope_kv import close_enough

    out, h = got
    assert close_enough(out, want[0]), (out.float() - want[0].float()).abs().max()
    assert torch.equal(h, want[1])  # x + residual rounded to nearest, as torch's add
    assert (out != want[0]).float().mean().item() < 0.05  # the same roundings: nearly all bits equal


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("tokens", [1, 2, 3, 8])
def test_kernel_matches_the_torch_path(shape, tokens):
    from disagg.common.models.norm_gemv import norm_gemv, norm_gemv_reference

    x, r, nw, w, b = _inputs(tokens, *SHAPES[shape], bias=tokens == 3)
    _assert_agrees(norm_gemv(x, r, nw, 1e-6, w, b), norm_gemv_reference(x, r, nw, 1e-6, w, b))
    got = norm_gemv(x, None, nw, 1e-6, w, b)  # before the first layer: h = x, returned as is
    assert got[1] is x
    _assert_agrees(got, norm_gemv_reference(x, None, nw, 1e-6, w, b))


# the launches returning the normalised input: MoE routers, DeepSeek-V2-Lite's two shared experts' gate_up
ROUTERS = {
    "qwen3-30b-a3b-router": (2048, 128),
    "mixtral-8x7b-router": (4096, 8),
    "v2-lite-shared-gate_up": (2048, 5632),
}


@pytest.mark.parametrize("shape", list(ROUTERS))
@pytest.mark.parametrize("tokens", [1, 2, 3, 8])
def test_router_kernel_returns_the_normalised_input(shape, tokens):
    """A MoE router's launch (narrow FMA tiles), V2-Lite's shared gate_up (16-row tiles, dots past 2
    tokens): output and new residual as above, and the normalised input the experts read: kernels.rms_norm's torch roundings, to nearest (nearly all bits equal;
    an ulp where the float32 sum of squares, summed in another order, rounds the other way)."""
    from disagg.common.models.fused_rope_kv import close_enough
    from disagg.common.models.norm_gemv import norm_gemv, norm_gemv_reference

    x, r, nw, w, _ = _inputs(tokens, *ROUTERS[shape])
    for residual in (r, None):
        *got, normed = norm_gemv(x, residual, nw, 1e-6, w, return_normed=True)
        *want, want_normed = norm_gemv_reference(x, residual, nw, 1e-6, w, return_normed=True)
        _assert_agrees(got, want)
        assert close_enough(normed, want_normed) and (normed != want_normed).float().mean().item() < 0.01


DOWNS = {"llama-8b-down": (14336, 4096), "v2-lite-dense-down": (10944, 2048)}  # (I, hidden)


def _gate_up(t, k, n, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    gate_up = (torch.randn(t, 2 * k, generator=g, device="cuda") * 2).bfloat16()
    return gate_up, (torch.randn(n, k, generator=g, device="cuda") * k**-0.5).bfloat16()


def _assert_down_agrees(got, want):
    from disagg.common.models.fused_rope_kv import close_enough

    assert close_enough(got, want), (got.float() - want.float()).abs().max()
    assert (got != want).float().mean().item() < 0.05  # silu and the product rounded as torch rounds them


@pytest.mark.parametrize("shape", list(DOWNS))
@pytest.mark.parametrize("tokens", [1, 2, 3, 8])
def test_down_kernel_matches_the_torch_path(shape, tokens):
    """silu_mul_gemv (act_gemv.py) at the 8B's and V2-Lite's dense down shapes: the torch path's
    SiLU·mul (two bf16 roundings) then the GEMV, nearly every bit; every sweep layout at 1 and 8."""
    from disagg.common.bench.norm_gemv import CANDIDATES
    from disagg.common.models.act_gemv import silu_mul_gemv, silu_mul_gemv_reference

    gate_up, w = _gate_up(tokens, *DOWNS[shape])
    want = silu_mul_gemv_reference(gate_up, w)
    _assert_down_agrees(silu_mul_gemv(gate_up, w), want)
    for launch in CANDIDATES if tokens in (1, 8) else ():
        _assert_down_agrees(silu_mul_gemv(gate_up, w, launch=launch), want)


def test_down_kernel_replays_in_a_cuda_graph():
    from disagg.common.models.act_gemv import silu_mul_gemv, silu_mul_gemv_reference

    static = _gate_up(4, *DOWNS["v2-lite-dense-down"])
    silu_mul_gemv(*static)  # compile outside the graph
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        got = silu_mul_gemv(*static)
    for seed in (1, 2):
        new = _gate_up(4, *DOWNS["v2-lite-dense-down"], seed=seed)
        for buf, value in zip(static, new, strict=True):
            buf.copy_(value)
        graph.replay()
        torch.cuda.synchronize()
        _assert_down_agrees(got, silu_mul_gemv_reference(*new))


@pytest.mark.parametrize("tokens", [1, 8])
def test_every_benchmark_layout_agrees(tokens):
    from disagg.common.bench.norm_gemv import CANDIDATES
    from disagg.common.models.norm_gemv import norm_gemv, norm_gemv_reference

    x, r, nw, w, _ = _inputs(tokens, 2048, 5632)
    want = norm_gemv_reference(x, r, nw, 1e-6, w)
    for launch in CANDIDATES:
        _assert_agrees(norm_gemv(x, r, nw, 1e-6, w, launch=launch), want)


def test_kernel_replays_in_a_cuda_graph():
    from disagg.common.models.norm_gemv import norm_gemv, norm_gemv_reference

    k, n = SHAPES["qwen3-30b-a3b-qkv"]
    static = _inputs(4, k, n)
    norm_gemv(*static[:3], 1e-6, static[3])  # compile outside the graph
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        got = norm_gemv(*static[:3], 1e-6, static[3])
    for seed in (1, 2):
        new = _inputs(4, k, n, seed=seed)
        for buf, value in zip(static[:4], new[:4], strict=True):
            buf.copy_(value)
        graph.replay()
        torch.cuda.synchronize()
        _assert_agrees(got, norm_gemv_reference(*new[:3], 1e-6, new[3]))


def test_start_up_check_passes_on_the_model_shapes(monkeypatch):
    from disagg.common.models.act_gemv import silu_mul_gemv_ok
    from disagg.common.models.norm_gemv import norm_gemv_ok

    monkeypatch.setenv("DISAGG_NORM_GEMV", "1")
    cuda = torch.device("cuda", 0)
    norm_gemv_ok.cache_clear()
    for k, n in [*SHAPES.values(), (896, 1152)]:
        assert norm_gemv_ok(cuda, torch.bfloat16, n, k, n == 1152), (n, k)
    for k, n in ROUTERS.values():  # returning the normalised input
        assert norm_gemv_ok(cuda, torch.bfloat16, n, k, False, True), (n, k)
    silu_mul_gemv_ok.cache_clear()
    for k, n in DOWNS.values():
        assert silu_mul_gemv_ok(cuda, torch.bfloat16, n, k), (n, k)
    silu_mul_gemv_ok.cache_clear()
    assert not norm_gemv_ok(cuda, torch.float32, 6144, 4096, False)  # float32 keeps the torch ops
    norm_gemv_ok.cache_clear()


PROMPTS = [[1, 409, 314, 253, 134, 282, 350, 30], list(range(200, 240)), [9, 8, 7, 6, 5, 4, 3, 2, 1] * 3]
PARAMS = {"max_new_tokens": 32, "temperature": 0, "ignore_eos": True, "top_logprobs_num": 5}


def _generate(path: str, fused: bool, monkeypatch, **engine_args) -> list[dict]:
    from disagg.common.engine.offline import Engine
    from disagg.common.models.act_gemv import silu_mul_gemv_ok
    from disagg.common.models.norm_gemv import norm_gemv_ok

    monkeypatch.setenv("DISAGG_NORM_GEMV", "1" if fused else "0")
    norm_gemv_ok.cache_clear()
    silu_mul_gemv_ok.cache_clear()
    engine = Engine(
        model_path=path, dtype="bfloat16", max_total_tokens=16384, page_size=16, chunked_prefill_size=16,
        **engine_args,
    )  # fmt: skip
    try:
        layers = engine.scheduler.runner.model.layers
        # MoE: the router (DeepSeekMoE: the shared experts' gate_up); a dense MLP: its gate_up and its
        # down (silu_mul_gemv); attention: the qkv (MLA: the fused q | kv_a)
        used = [
            layer.attn_norm_gemv and layer.mlp_norm_gemv and getattr(layer.mlp, "act_gemv", True)
            for layer in layers
        ]
        assert all(used) if fused else not any(used)
        return engine.generate(PROMPTS, PARAMS)
    finally:
        engine.shutdown()
        norm_gemv_ok.cache_clear()
        silu_mul_gemv_ok.cache_clear()


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3_moe"])
def test_engine_tokens_with_norm_gemv_close_to_without(family, tmp_path, monkeypatch):
    """CUDA graphs for decode (batches of 3 fused inside them), prefill chunks of 16 unfused;
    Qwen3-MoE: the router fused, its experts (fused_moe's kernels) on the launch's normalised input."""
    from tests.conftest import make_tiny_model

    path = make_tiny_model(tmp_path / family, family, head_dim=64, hidden_size=256, num_attention_heads=4)
    assert_logprobs_close(_generate(path, True, monkeypatch), _generate(path, False, monkeypatch))


# DeepSeek-V2-Lite's attention shape (16 heads, kv_lora_rank 512, rope 64, nope 128: FlashInfer's MLA
# kernels; q | kv_a 3072 + 576 rows) and two shared experts, small everything else; first layer dense
SMALL_V2_LITE = dict(num_hidden_layers=3, hidden_size=256, intermediate_size=512, moe_intermediate_size=128,
                     n_routed_experts=8, vocab_size=1024, max_position_embeddings=2048)  # fmt: skip


def test_deepseek_engine_tokens_with_norm_gemv_close_to_without(monkeypatch):
    """A dummy V2-Lite-like DeepSeek with CUDA graphs (decode batches of 3 fused inside them): MLA's
    input norm in its fused q | kv_a GEMV, the post-attention norm in the shared experts' gate_up,
    whose launch also gives the float32 gate and the routed experts (fused_moe) their input."""
    import json

    pytest.importorskip("flashinfer")
    args = dict(load_format="dummy", json_model_override_args=json.dumps(SMALL_V2_LITE))
    fused = _generate("DeepSeek-V2-Lite", True, monkeypatch, **args)
    assert_logprobs_close(fused, _generate("DeepSeek-V2-Lite", False, monkeypatch, **args))
