"""The persistent MoE block (common/models/persistent_moe.py; the engine's DISAGG_PERSISTENT_MOE=1)
gives the MoE layer's output for one token: its float32 reference is SparseMoE's own routing and
experts on the CPU; the kernel matches the reference in Triton's CPU interpreter (one program doing
every task, several taking them by ticket, static assignment; shapes that no block divides; shared
slots; the pipelined tasks; the post-attention norm inside; the counters left zero for the next
launch; a stage that never finishes ends in NaN rows within a bound), compiles for sm_90 with the
memory ordering its stages rely on, and the engine with it gives transformers' tokens (interpreter)
and ends a faulted request with a typed error; on a GPU it matches at the benchmark's shapes, eager
and in a CUDA graph, and the engine's tokens stay those of the launches it replaces."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch

INTERPRETED = textwrap.dedent(
    """
    import torch
    from disagg.common.models.persistent_moe import new_scratch, persistent_moe, reference

    def check(E, H, I, K, shared, renorm, scaling, programs, dynamic, blocks):
        g = torch.Generator().manual_seed(E * 7 + H + I + K + shared)
        x = torch.randn(1, H, generator=g)
        rw = torch.randn(E, H, generator=g) / H**0.5
        w13 = torch.randn(E + shared, 2 * I, H, generator=g) / H**0.5
        w2 = torch.randn(E + shared, H, I, generator=g) / I**0.5
        want = reference(x, rw, w13, w2, K, renorm, scaling, shared)
        scratch = new_scratch(E, K + shared, I, x.device)
        for _ in range(2):  # the second launch finds the counters the first left: zero
            got = persistent_moe(x, rw, w13, w2, K, renorm, scaling, shared, programs=programs,
                                 dynamic=dynamic, blocks=blocks, scratch=scratch)
            err = ((got - want).abs().max() / want.abs().max()).item()
            assert err < 1e-5, (E, H, I, K, shared, programs, dynamic, err)
            assert scratch["counters"].tolist() == [0, 0, 0, 0], scratch["counters"]
            assert sorted(scratch["top_id"][:K].tolist()) == sorted(
                torch.softmax(rw @ x[0], -1).topk(K).indices.tolist())

    small = dict(BLOCK_E=4, BLOCK_N=16, BLOCK_K=32, DOWN_N=16, DOWN_K=32)
    check(8, 64, 48, 2, 0, True, 1.0, 1, True, small)     # one program: every task in order
    check(8, 64, 48, 2, 0, True, 1.0, 4, True, small)     # four by ticket (the rest find none left)
    check(8, 64, 48, 2, 0, True, 1.0, 1, False, small)    # static assignment
    check(12, 80, 40, 3, 2, False, 2.5, 3, True, small)   # V2-style: no renormalisation, scaling, 2 shared
    check(6, 100, 24, 2, 1, True, 1.0, 2, True, small)    # no block divides E, H or I
    # the pipelined tasks (PIPELINE: the next tile loading while one is summed; down's slots as one
    # sequence of K tiles, a slot's tiles crossing into the next's)
    piped = dict(small, PIPELINE=True)
    check(8, 64, 48, 2, 0, True, 1.0, 4, True, piped)
    check(12, 80, 40, 3, 2, False, 2.5, 3, True, piped)   # 5 slots of 8 (K_POW2); 2 K tiles a slot
    check(6, 100, 24, 2, 1, True, 1.0, 1, False, piped)

    # with the post-attention norm: x is the attention's delta; the residual becomes delta + residual
    for programs in (1, 3):
        g = torch.Generator().manual_seed(programs)
        x, res = torch.randn(1, 80, generator=g), torch.randn(1, 80, generator=g)
        nw = torch.rand(80, generator=g) + 0.5
        rw = torch.randn(12, 80, generator=g) / 9
        w13, w2 = torch.randn(13, 80, 80, generator=g) / 9, torch.randn(13, 80, 40, generator=g) / 6
        want, want_res = reference(x, rw, w13, w2, 3, True, 1.0, 1, residual=res, norm_weight=nw, eps=1e-5)
        residual = res.clone()
        got = persistent_moe(x, rw, w13, w2, 3, True, 1.0, 1, programs=programs, blocks=small,
                             residual=residual, norm_weight=nw, eps=1e-5)
        assert ((got - want).abs().max() / want.abs().max()).item() < 1e-5
        assert torch.allclose(residual, want_res, rtol=0, atol=1e-6)

    # a stage that never finishes (counters left wrong): the waits give up, the rows are NaN, the
    # counters end zero and the next launch is right
    import disagg.common.models.persistent_moe as P
    P.WAIT_POLLS = 8
    g = torch.Generator().manual_seed(1)
    x, rw = torch.randn(1, 64, generator=g), torch.randn(8, 64, generator=g) / 8
    w13, w2 = torch.randn(8, 96, 64, generator=g) / 8, torch.randn(8, 64, 48, generator=g) / 7
    scratch = new_scratch(8, 2, 48, x.device)
    scratch["counters"][1] = -100
    got = persistent_moe(x, rw, w13, w2, 2, True, programs=3, blocks=small, scratch=scratch)
    assert got.isnan().all(), got
    assert scratch["counters"].tolist() == [0, 0, 0, 0]
    want = reference(x, rw, w13, w2, 2, True)
    got = persistent_moe(x, rw, w13, w2, 2, True, programs=3, blocks=small, scratch=scratch)
    assert ((got - want).abs().max() / want.abs().max()).item() < 1e-5
    print("ok")
    """
)


def test_interpreted_block_equals_reference():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run(
        [sys.executable, "-c", INTERPRETED], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-3000:]


ENGINE = textwrap.dedent(
    """
    import sys
    import torch
    from disagg.common.engine.offline import Engine
    from disagg.common.models import persistent_moe as P
    from tests.conftest import assert_pool_clean, hf_greedy, make_tiny_model
    from tests.test_common_deepseek import make_tiny_deepseek

    root = sys.argv[1]
    paths = {
        "qwen3_moe": make_tiny_model(root + "/qwen3_moe", "qwen3_moe"),
        "mixtral": make_tiny_model(root + "/mixtral", "mixtral"),
        # V2-Lite's routing (greedy softmax top-k, routed_scaling_factor) and a shared expert fused as a slot
        "v2": make_tiny_deepseek(root + "/v2", "v2", topk_method="greedy", n_group=1, topk_group=1),
    }
    launches = []
    run = P.persistent_moe
    # each launch: whether it normed its input itself (the decoder layer's post-attention norm)
    P.persistent_moe = lambda *a, **kw: launches.append(kw.get("residual") is not None) or run(*a, **kw)
    import disagg.common.models.moe as M
    M.persistent_moe = P.persistent_moe
    for family, path in paths.items():
        engine = Engine(model_path=path, page_size=4, max_total_tokens=512)
        try:
            for prompt in ([1, 2, 3, 4, 5], [300]):  # one request at a time: decode batches of one token
                before = len(launches)
                out = engine.generate([prompt], {"max_new_tokens": 8, "temperature": 0, "ignore_eos": True})
                assert out[0]["output_ids"] == hf_greedy(path, prompt, 8), family
                assert len(launches) - before >= 7 * 2, (family, len(launches) - before)  # 7+ steps x 2 layers
                assert all(launches[before:]), family  # each with the norm: no add-RMSNorm launch of its own
            if family == "qwen3_moe":  # a layer's counters left wrong: that request ends with the
                # sampler's numerical error after its first token (its prefill's), the next is right
                P.WAIT_POLLS = 4
                layer = next(m for m in engine.scheduler.runner.model.modules() if isinstance(m, M.SparseMoE))
                with torch.inference_mode():  # the engine made it under inference mode
                    layer._persistent_scratch["counters"][1] = -100
                bad = engine.generate([[1, 2, 3]], {"max_new_tokens": 8, "temperature": 0, "ignore_eos": True})[0]
                assert bad["finish_reason"] == "abort" and "not finite" in bad["meta_info"]["error"], bad
                assert bad["output_ids"] == hf_greedy(path, [1, 2, 3], 1)
                out = engine.generate([[1, 2, 3]], {"max_new_tokens": 8, "temperature": 0, "ignore_eos": True})
                assert out[0]["output_ids"] == hf_greedy(path, [1, 2, 3], 8)
                assert_pool_clean(engine.scheduler)
        finally:
            engine.shutdown()
    print("ok")
    """
)


@pytest.mark.slow
def test_engine_with_the_persistent_block_gives_transformers_tokens(tmp_path):
    """DISAGG_PERSISTENT_MOE=1 under Triton's interpreter: Qwen3-MoE, Mixtral and a DeepSeek-V2 with
    V2-Lite's routing and a fused shared expert, one request at a time, run every one-token MoE block
    as the persistent launch and give transformers' float32 greedy tokens."""
    pytest.importorskip("triton")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, TRITON_INTERPRET="1", DISAGG_PERSISTENT_MOE="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    done = subprocess.run(
        [sys.executable, "-c", ENGINE, str(tmp_path)], env=env, cwd=root, capture_output=True, text=True,
        timeout=900,
    )  # fmt: skip
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-3000:]


@pytest.mark.parametrize("renormalize,shared", [(True, 0), (False, 2)])
def test_reference_is_the_engines_moe_layer(renormalize, shared):
    """reference() computes what the model's MoE layer does on the CPU (SparseMoE's softmax top-k
    and moe_align.grouped_experts), so a kernel equal to it is equal to the layer."""
    from disagg.common.models.moe_align import grouped_experts
    from disagg.common.models.persistent_moe import reference

    g = torch.Generator().manual_seed(3)
    E, H, inter, K = 16, 64, 32, 4
    x = torch.randn(1, H, generator=g)
    rw = torch.randn(E, H, generator=g) / H**0.5
    w13 = torch.randn(E + shared, 2 * inter, H, generator=g) / H**0.5
    w2 = torch.randn(E + shared, H, inter, generator=g) / inter**0.5
    weights, ids = torch.softmax(x @ rw.T, -1).topk(K)
    if renormalize:
        weights = weights / weights.sum(-1, keepdim=True)
    weights = torch.cat([weights * 1.5, torch.ones(1, shared)], 1)
    ids = torch.cat([ids, torch.arange(E, E + shared)[None]], 1)
    want = grouped_experts(x, w13, w2, weights, ids)
    got = reference(x, rw, w13, w2, K, renormalize, 1.5, shared)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "dynamic,trace,norm,pipeline",
    [
        (True, False, False, False),
        (False, False, True, False),
        (True, True, True, False),
        (True, False, True, True),
    ],
)
def test_block_compiles_for_hopper_with_its_ordering(dynamic, trace, norm, pipeline):
    """sm_90 PTX: the waits are acquire loads, the counts acquire-release atomics (the stages' stores
    visible to the next stage), and the produced data is read through L2 (.cg); the bench's trace
    reads the global timer."""
    pytest.importorskip("triton")
    from disagg.common.models.persistent_moe import _moe_block_kernel

    from tests.conftest import compile_for_hopper

    types = {n: "*bf16" for n in ("x", "router_w", "w13", "w2", "out", "delta", "residual", "norm_w")}
    types.update(logits="*fp32", act="*fp32", top_w="*fp32", top_id="*i32", counters="*i32", trace="*i64")
    types["scaling"] = types["eps"] = "fp32"
    consts = dict(K=8, SHARED=0, K_POW2=8, E_POW2=128, RENORMALIZE=True, DYNAMIC=dynamic, BLOCK_E=4,
                  ROUTER_K=2048, BLOCK_N=16, BLOCK_K=512, DOWN_N=8, DOWN_K=1024, NORM=norm, TRACE=trace,
                  PIPELINE=pipeline, WAIT_POLLS=1 << 22)  # fmt: skip
    ptx = compile_for_hopper(_moe_block_kernel, types, consts).asm["ptx"]
    assert re.search(r"ld\.global\.gpu\.acquire", ptx) or re.search(r"atom\.global\.gpu\.acquire", ptx)
    assert "atom.global.gpu.acq_rel.add" in ptx
    assert "ld.global.cg" in ptx
    assert ("%globaltimer" in ptx) == trace


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", ["qwen3-30b-a3b", "deepseek-v2-lite"])
def test_gpu_block_equals_reference_eager_and_graphed(name):
    """At the benchmark's shapes: eager at the SM count and twice it, then a CUDA graph of three blocks
    replayed on new inputs (x scaled: other weights and outputs, the same experts; each launch must
    find the counters zero)."""
    pytest.importorskip("triton")
    from disagg.common.bench.persistent_moe import SHAPES, make_layer
    from disagg.common.models.persistent_moe import new_scratch, persistent_moe, reference

    E, H, inter, K, renorm, scaling, shared = shape = SHAPES[name]
    gen = torch.Generator(device="cuda").manual_seed(0)
    layers = [make_layer(shape, gen) for _ in range(3)]  # logits far apart: the reference routes alike
    first_x = [layer["x"].clone() for layer in layers]
    sms = torch.cuda.get_device_properties(0).multi_processor_count

    def run(layer, **kw):
        return persistent_moe(layer["x"], layer["router_w"], layer["w13"], layer["w2"], K, renorm, scaling,
                              shared, scratch=scratch, **kw)  # fmt: skip

    def rel_err(got, layer):
        want = reference(layer["x"], layer["router_w"], layer["w13"], layer["w2"], K, renorm, scaling, shared)
        return ((got.float() - want.float()).abs().max() / want.float().abs().max()).item()

    scratch = new_scratch(E, K + shared, inter, torch.device("cuda"))
    for programs in (sms, 2 * sms):
        for layer in layers:
            assert rel_err(run(layer, programs=programs), layer) < 2e-2
    # with the post-attention norm (the engine's launch); the residual along x and unit weights keep
    # the normed input's logits apart (the interpreter test has random ones)
    layer = layers[0]
    residual = (layer["x"].float() * 0.5).bfloat16()
    norm_w = torch.ones(H, device="cuda", dtype=torch.bfloat16)
    want, want_res = reference(layer["x"], layer["router_w"], layer["w13"], layer["w2"], K, renorm, scaling,
                               shared, residual=residual, norm_weight=norm_w)  # fmt: skip
    got = run(layer, residual=residual, norm_weight=norm_w)
    assert ((got.float() - want.float()).abs().max() / want.float().abs().max()).item() < 2e-2
    assert torch.equal(residual, want_res)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = [run(layer) for layer in layers]
    for scale in (1.0, 1.5, 2.0):
        for layer, x in zip(layers, first_x, strict=True):
            layer["x"].copy_(x * scale)
        graph.replay()
        torch.cuda.synchronize()
        for out, layer in zip(outs, layers, strict=True):
            assert rel_err(out, layer) < 2e-2, scale
    assert scratch["counters"].tolist() == [0, 0, 0, 0]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_engine_with_the_persistent_block_under_cuda_graphs(tmp_path, monkeypatch):
    """A bf16 Qwen3-MoE decoding one request at a time in CUDA graphs, DISAGG_PERSISTENT_MOE 0 then 1:
    the same greedy tokens within the logprob-closeness check (split-K sums differ in order), and the
    persistent launch is what ran."""
    pytest.importorskip("triton")
    pytest.importorskip("flashinfer")
    from disagg.common.engine.offline import Engine
    from disagg.common.models.moe import SparseMoE

    from tests.conftest import assert_logprobs_close, make_tiny_model

    path = make_tiny_model(tmp_path / "m", "qwen3_moe", head_dim=64)  # FlashInfer's decode: 64, 128, 256
    params = {"max_new_tokens": 24, "temperature": 0, "ignore_eos": True, "top_logprobs_num": 5}
    outs = []
    for on in ("0", "1"):
        monkeypatch.setenv("DISAGG_PERSISTENT_MOE", on)
        engine = Engine(model_path=path, attention_backend="flashinfer", dtype="bfloat16", page_size=4,
                        max_total_tokens=4096)  # fmt: skip
        try:
            assert engine.scheduler.runner.graph_runner is not None  # decode replays graphs
            layers = [m for m in engine.scheduler.runner.model.modules() if isinstance(m, SparseMoE)]
            assert all(m.persistent == (on == "1") for m in layers)
            outs.append([engine.generate([[i + 1, 2 * i + 3, 5, 7 * i + 11]], params)[0] for i in range(6)])
            if on == "1":  # each layer's scratch: made by its first one-token block, its counters left zero
                assert all(m._persistent_scratch is not None for m in layers)  # the block ran
                assert all(m._persistent_scratch["counters"].tolist() == [0, 0, 0, 0] for m in layers)
        finally:
            engine.shutdown()
    assert_logprobs_close(*outs)


def test_resident_programs_counts_what_an_sm_holds(monkeypatch):
    """The static grid's size: registers (allocated 256 a warp), threads and shared memory of one SM,
    times the SMs (made-up device properties and compiled kernels)."""
    from types import SimpleNamespace

    from disagg.common.models import persistent_moe as P

    props = SimpleNamespace(multi_processor_count=132, regs_per_multiprocessor=65536,
                            max_threads_per_multi_processor=2048, shared_memory_per_multiprocessor=233472)  # fmt: skip
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: props)

    def kernel(regs, warps, shared):
        return SimpleNamespace(n_regs=regs, metadata=SimpleNamespace(num_warps=warps, shared=shared),
                               _init_handles=lambda: None)  # fmt: skip

    assert P.resident_programs(kernel(128, 8, 0), "cuda") == 132 * 2  # 65536 / (128 * 32 * 8)
    assert P.resident_programs(kernel(100, 4, 0), "cuda") == 132 * 4  # 100 -> 104 a thread (3328 a warp)
    assert P.resident_programs(kernel(32, 4, 0), "cuda") == 132 * 16  # threads: 2048 / 128
    assert P.resident_programs(kernel(32, 4, 100_000), "cuda") == 132 * 2  # shared memory
    assert P.resident_programs(kernel(255, 32, 0), "cuda") == 132  # at least one
