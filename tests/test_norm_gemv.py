"""The residual add + RMSNorm folded into the GEMV that reads them (common/models/norm_gemv.py): under
Triton's CPU interpreter the kernel gives the torch path's output and new residual (1, 3 and 8
tokens, K and N off the tiles, with and without a residual and a bias, float32 and bf16, FMA and
tensor-core layouts, the normalised input a MoE router's launch returns) and leaves the old
residual alone; the start-up check refuses a kernel that disagrees; the kernel compiles for sm_90;
a tiny Llama, Qwen2 (qkv bias), Qwen3-MoE and Mixtral (the router fused), DeepSeek-V2 and V3 (MLA's
q | kv_a projection and the shared experts' gate_up fused) with DISAGG_NORM_GEMV=1 give
transformers' float32 tokens."""

from __future__ import annotations

import json
import textwrap

import pytest
import torch
from disagg.common.models.kernels import add_rms_norm, rms_norm
from disagg.common.models.norm_gemv import norm_gemv_reference

from tests.conftest import TINY_MOE_CONFIGS, compile_for_hopper, hf_greedy, make_tiny_model
from tests.test_common_deepseek import make_tiny_deepseek
from tests.test_fused_rope_kv import PROMPTS, _interpret

pytest.importorskip("triton")
interpreted = pytest.mark.skipif(
    torch.cuda.is_available(), reason="the start-up check and the GPU benchmark run the compiled kernel"
)

CHECK = textwrap.dedent(
    """
    import torch
    from disagg.common.models import norm_gemv as ng
    from disagg.common.models.fused_rope_kv import rms_norm_reference

    def case(t, n, k, residual, bias, dtype, launch=None, normed=False):
        g = torch.Generator().manual_seed(t * 31 + n + k)
        x = torch.randn(t, k + 3, generator=g).to(dtype)[:, :k]  # strided rows, as a view would be
        r = torch.randn(t, k, generator=g).to(dtype) if residual else None
        old = None if r is None else r.clone()
        norm_w = torch.randn(k, generator=g).to(dtype)
        w = (torch.randn(n, k, generator=g) * k**-0.5).to(dtype)
        b = torch.randn(n, generator=g).to(dtype) if bias else None
        out, h, *a = ng.norm_gemv(x, r, norm_w, 1e-6, w, b, launch=launch, return_normed=normed)
        want_out, want_h = ng.norm_gemv_reference(x, r, norm_w, 1e-6, w, b)
        assert out.shape == (t, n) and out.dtype == dtype and h.shape == (t, k) and len(a) == normed
        if normed:  # the normalised input: rms_norm's, to rounding (bf16: the interpreter's truncations)
            assert a[0].shape == (t, k) and a[0].dtype == dtype
            rtol = 1e-6 if dtype == torch.float32 else 2**-5
            torch.testing.assert_close(a[0], rms_norm_reference(want_h, norm_w, 1e-6), atol=1e-6, rtol=rtol)
        if t == 0:
            return print("case passed", t)
        # float32: the same arithmetic up to summation order. bf16: a few ulps of the largest value
        # (NOTE: the interpreter truncates float32 -> bf16 where the GPU rounds to nearest, so the
        # roundings themselves are the GPU benchmark's check)
        tol = (1e-5 if dtype == torch.float32 else 1 / 32) * want_out.abs().max().item()
        torch.testing.assert_close(out, want_out, atol=tol, rtol=0)
        if r is None:
            assert h is x
        elif dtype == torch.float32:
            assert torch.equal(h, want_h)  # x + residual, exactly
        else:  # the interpreter's truncation: at most one bf16 ulp below torch's rounded sum
            torch.testing.assert_close(h, want_h, atol=0, rtol=2**-7)
        assert old is None or (torch.equal(r, old) and h.data_ptr() != r.data_ptr())  # a new buffer
        print("case passed", t, n, k, residual, bias, dtype, launch)

    f32, bf16 = torch.float32, torch.bfloat16
    """
)


@interpreted
def test_interpreted_kernel_matches_the_torch_path():
    """K 200 with 64-wide K tiles and N 70 with 32-row tiles: the masked lanes of both loops; the
    default layouts at 1 and 8 tokens (FMA, then tensor-core dot with rows padded to 16)."""
    out = _interpret(
        CHECK
        + textwrap.dedent(
            """
            for t in (1, 3, 8):
                for residual in (True, False):
                    for bias in (True, False):
                        case(t, 70, 200, residual, bias, f32, launch=(32, 64, 4, False))
                case(t, 70, 200, True, True, f32, launch=(16, 64, 4, True))
                case(t, 70, 200, True, True, bf16, launch=(32, 64, 4, False))
                case(t, 70, 200, False, True, bf16, launch=(16, 64, 4, True))
            case(1, 48, 96, True, False, bf16)  # the default layouts
            case(8, 48, 96, True, False, bf16)
            case(0, 48, 96, True, True, f32)  # an idle DP-attention rank: no launch
            # a router: the normalised input returned; 4- and 8-row FMA tiles, N 10 off both
            for t in (1, 3, 8):
                case(t, 10, 200, True, False, f32, launch=(4, 64, 4, False), normed=True)
                case(t, 10, 200, t > 1, False, bf16, launch=(8, 64, 4, False), normed=True)
                case(t, 70, 200, True, True, f32, launch=(16, 64, 4, True), normed=True)
                case(t, 10, 72, True, False, bf16, normed=True)  # the default: 4-row tiles
            case(0, 10, 72, True, False, bf16, normed=True)
            """
        )
    )
    assert out.count("case passed") == 37


def test_small_n_launches_narrow_fma_tiles():
    """Where 16-row tiles leave fewer than 64 programs (a router's 128 experts: 8), 8- or 4-row FMA
    tiles at every batch; projections of a few thousand rows keep 16-row tiles and their dots."""
    from disagg.common.models.norm_gemv import launch_shape

    assert [launch_shape(t, 128, 2048)[0::3] for t in (1, 8, 16)] == [(4, False)] * 3
    assert launch_shape(8, 768, 4096)[0::3] == (8, False)
    assert launch_shape(8, 1024, 4096)[0::3] == (16, True) and launch_shape(1, 5120, 2048)[0] == 16
    assert launch_shape(16, 128, 2048)[1] * 4 * 16 <= 8192  # FMA products within 64 registers a thread


def test_reference_is_the_decoders_unfused_arithmetic():
    """norm_gemv_reference (the start-up check's and tests' reference) = the decoder's torch ops:
    kernels.add_rms_norm (rms_norm before the first layer), then the linear."""
    g = torch.Generator().manual_seed(0)
    x, r, w = (torch.randn(*shape, generator=g) for shape in ((3, 32), (3, 32), (20, 32)))
    norm_w, b = torch.randn(32, generator=g), torch.randn(20, generator=g)
    normed, h = add_rms_norm(x, r, norm_w, 1e-6)
    out, got_h = norm_gemv_reference(x, r, norm_w, 1e-6, w, b)
    assert torch.equal(got_h, h) and torch.equal(out, torch.nn.functional.linear(normed, w, b))
    out, got_h = norm_gemv_reference(x, None, norm_w, 1e-6, w)
    assert got_h is x and torch.equal(out, rms_norm(x, norm_w, 1e-6) @ w.T)


@interpreted
def test_start_up_check_refuses_a_kernel_that_disagrees():
    """A kernel that skips the norm's weight, or writes a wrong new residual, is refused (the layers
    keep the torch ops, logged); without DISAGG_NORM_GEMV=1 the kernel is off; the real one passes."""
    out = _interpret(
        textwrap.dedent(
            """
            import os, torch
            from disagg.common.models import norm_gemv as ng

            cpu, real = torch.device("cpu"), ng.norm_gemv
            def ok(normed=False):
                ng.norm_gemv_ok.cache_clear()
                return ng.norm_gemv_ok(cpu, torch.float32, 40, 72, True, normed)

            def unweighted(x, residual, norm_weight, *args, **kw):
                return real(x, residual, torch.ones_like(norm_weight), *args, **kw)

            def stale_residual(x, residual, *args, **kw):
                out, h, *rest = real(x, residual, *args, **kw)
                return out, x if residual is not None else h, *rest  # the delta, not the sum

            def unnormalised(*args, **kw):
                out, h, *rest = real(*args, **kw)
                return out, h, *(h for _ in rest)  # h where the normalised input belongs

            os.environ.pop("DISAGG_NORM_GEMV", None)
            assert not ok() and not ok(True)  # off by default
            os.environ["DISAGG_NORM_GEMV"] = "1"
            assert ok() and ok(True)
            for bad, normed in ((unweighted, False), (stale_residual, False), (unweighted, True), (unnormalised, True)):
                ng.norm_gemv = bad
                assert not ok(normed), bad.__name__
            assert ok()  # a wrong normalised input is only checked where it is asked for
            ng.norm_gemv = real
            os.environ["DISAGG_FUSED_KERNELS"] = "0"
            assert not ok()
            print("refused")
            """
        )
    )
    assert "refused" in out
    assert out.count("norm_gemv disagrees with torch") == 4 and "failed its start-up check" not in out


@pytest.mark.parametrize(
    ("block_t", "block_n", "block_k", "dot", "normed"),
    [
        (1, 16, 256, False, False), (2, 16, 128, False, False), (8, 16, 64, False, False),
        (16, 64, 128, True, False), (1, 4, 256, False, True), (8, 4, 256, False, True), (16, 16, 128, True, True),
    ],
)  # fmt: skip
def test_kernel_compiles_for_hopper(block_t, block_n, block_k, dot, normed):
    """The compiler's checks the interpreter skips, at bf16, with PDL (its wait before the first
    memory access): the default layouts of 1, 2 and 3-8 tokens (FMA at 1 and 2, a tensor-core dot
    past), FMA at 8 token rows (a sweep candidate); a router's, writing the normalised input: its
    default 4-row FMA tiles at 1 and 8 tokens, and a dot."""
    from disagg.common.models.norm_gemv import _norm_gemv_kernel

    names = ("x", "residual", "norm_w", "weight", "bias", "out", "new_residual", "normed")
    types = dict.fromkeys(names, "*bf16") | {"eps": "fp32"}
    consts = dict(BLOCK_T=block_t, BLOCK_N=block_n, BLOCK_K=block_k, HAS_RESIDUAL=True, HAS_BIAS=not normed,
                  WRITE_NORMED=normed, DOT=dot, INTERPRETED=False)  # fmt: skip
    compile_for_hopper(_norm_gemv_kernel, types, consts)


MODEL_RUN = textwrap.dedent(
    """
    import json, os, sys
    from disagg.common.engine.offline import Engine
    from disagg.common.models import decoder

    calls, act_sizes = set(), set()  # norm_gemv's (token count, normalised input returned); silu_mul_gemv's
    real, real_act = decoder.norm_gemv, decoder.silu_mul_gemv

    def counted(x, *args, **kw):
        calls.add((len(x), kw.get("return_normed", False)))
        return real(x, *args, **kw)

    def counted_act(gate_up, *args):
        act_sizes.add(len(gate_up))
        return real_act(gate_up, *args)

    decoder.norm_gemv, decoder.silu_mul_gemv = counted, counted_act

    path, chunk, max_tokens, prompts = sys.argv[1], int(sys.argv[2]), sys.argv[3], json.loads(sys.argv[4])
    os.environ |= {"DISAGG_NORM_GEMV": "1", "DISAGG_NORM_GEMV_MAX_TOKENS": max_tokens}
    engine = Engine(model_path=path, page_size=4, max_total_tokens=512, chunked_prefill_size=chunk)
    layers = engine.scheduler.runner.model.layers
    assert all(layer.attn_norm_gemv and layer.mlp_norm_gemv for layer in layers), "the kernel is not in use"
    assert all(layer.mlp.act_gemv for layer in layers if isinstance(layer.mlp, decoder.MLP))
    outs = engine.generate(prompts, {"max_new_tokens": 6, "temperature": 0, "ignore_eos": True})
    print("tokens", json.dumps([o["output_ids"] for o in outs]))
    print("sizes", json.dumps(sorted({t for t, _ in calls})))
    print("normed", json.dumps(sorted({t for t, normed in calls if normed})))
    print("act", json.dumps(sorted(act_sizes)))
    """
)


@pytest.fixture(scope="module")
def tiny_moe_models(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("tiny-moe")
    return {family: make_tiny_model(root / family, family) for family in TINY_MOE_CONFIGS}


@interpreted
@pytest.mark.parametrize(
    ("family", "chunk", "max_tokens", "sizes"),
    [
        ("llama", 8, "8", {2, 8}),
        ("qwen2", 16, "4", {2}),
        ("qwen3_moe", 8, "8", {2, 8}),
        ("mixtral", 16, "4", {2}),
    ],
)
def test_tiny_models_with_the_kernel_give_transformers_tokens(request, family, chunk, max_tokens, sizes):
    """Every layer's two norms in norm_gemv (the first layer's without a residual): transformers'
    float32 greedy tokens. Llama and Qwen3-MoE: prefill chunks of 8 and decode batches of 2, all
    fused; Qwen2 (qkv bias) and Mixtral: prefill chunks of 16 unfused, decode batches of 2 fused,
    the residual passing between. The MoE layers' router launches return the normalised input
    their experts read; the dense MLPs' SiLU·mul runs inside their down GEMV (act_gemv.py) at the
    same batches."""
    moe = family in TINY_MOE_CONFIGS
    path = request.getfixturevalue("tiny_moe_models" if moe else "tiny_models")[family]
    out = _interpret(MODEL_RUN, path, str(chunk), max_tokens, json.dumps(PROMPTS))
    lines = dict(
        s.split(" ", 1) for s in out.splitlines() if s.startswith(("tokens ", "sizes ", "normed ", "act "))
    )
    assert json.loads(lines["tokens"]) == [hf_greedy(path, p, 6) for p in PROMPTS]
    ran = set(json.loads(lines["sizes"]))  # the batch sizes the kernel ran at: these and no larger
    assert sizes <= ran and max(ran) <= int(max_tokens)
    assert set(json.loads(lines["normed"])) == (ran if moe else set())  # every MoE layer's, only theirs
    assert set(json.loads(lines["act"])) == (set() if moe else ran)  # every dense MLP's, at the same sizes


DEEPSEEK_RUN = textwrap.dedent(
    """
    import json, os, sys
    from disagg.common.engine.offline import Engine
    from disagg.common.models import decoder

    calls, real = set(), decoder.norm_gemv  # (token count, the projection's rows, normalised input returned)

    def counted(x, residual, norm_weight, eps, weight, *args, **kw):
        calls.add((len(x), weight.shape[0], kw.get("return_normed", False)))
        return real(x, residual, norm_weight, eps, weight, *args, **kw)

    decoder.norm_gemv = counted
    os.environ["DISAGG_NORM_GEMV"] = "1"
    engine = Engine(model_path=sys.argv[1], page_size=4, max_total_tokens=512, chunked_prefill_size=8)
    layers = engine.scheduler.runner.model.layers
    assert all(layer.attn_norm_gemv and layer.mlp_norm_gemv for layer in layers), "the kernel is not in use"
    print("qkv_a", layers[-1].self_attn.in_proj.weight.shape[0])
    print("shared", layers[-1].mlp.in_proj.weight.shape[0])
    outs = engine.generate(json.loads(sys.argv[2]), {"max_new_tokens": 6, "temperature": 0, "ignore_eos": True})
    print("tokens", json.dumps([o["output_ids"] for o in outs]))
    print("calls", json.dumps(sorted(calls)))
    """
)


@interpreted
@pytest.mark.parametrize("version", ["v2", "v3"])
def test_tiny_deepseek_with_the_kernel_gives_transformers_tokens(tmp_path, version):
    """MLA's input norm inside its fused q | kv_a projection (V2: q_proj's heads, V3: q_a_proj's
    rank, then q_a_layernorm after the split), and DeepSeekMoE's post-attention norm inside its shared
    experts' gate_up, whose launch returns the normalised input the float32 gate and the routed
    experts read (V3's dense first layer: the MLP's gate_up): prefill chunks of 8 (the expanded
    attention) and decode batches of 2 (the absorbed one) fused; transformers' float32 greedy tokens."""
    path = make_tiny_deepseek(tmp_path / version, version)
    out = _interpret(DEEPSEEK_RUN, path, json.dumps(PROMPTS))
    lines = dict(
        s.split(" ", 1) for s in out.splitlines() if s.startswith(("tokens ", "calls ", "qkv_a ", "shared "))
    )
    assert json.loads(lines["tokens"]) == [hf_greedy(path, p, 6) for p in PROMPTS]
    calls = {tuple(c) for c in json.loads(lines["calls"])}
    qkv_a, shared = int(lines["qkv_a"]), int(lines["shared"])
    for t in (2, 8):  # both norms fused at decode and in prefill
        assert (t, qkv_a, False) in calls and (t, shared, True) in calls, (t, calls)
    assert max(t for t, _, _ in calls) <= 8  # larger batches run the torch ops
