"""MLA's latent norm + RoPE + latent write fused (common/models/fused_mla_rope.py), under Triton's CPU
interpreter: the kernel gives the torch path's rotated q_pe and latent pool (every slot, so a stray
write fails too) for interleaved and plain pairs, page sizes 1 and 16, widths that are not powers of
two, a prefill chunk and a decode batch, in float32 and bf16; tiny DeepSeek-V2 and V3 with the
kernel in every layer give transformers' float32 tokens; the start-up check refuses a kernel that
disagrees."""

from __future__ import annotations

import json
import random
import textwrap

import pytest
import torch

from tests.conftest import compile_for_hopper, hf_greedy
from tests.test_common_deepseek import make_tiny_deepseek
from tests.test_fused_rope_kv import _interpret

triton = pytest.importorskip("triton")
pytestmark = pytest.mark.skipif(
    torch.cuda.is_available(), reason="the start-up check and test_gpu_mla.py run the compiled kernel"
)

CHECK = textwrap.dedent(
    """
    import torch
    from disagg.common.models import fused_mla_rope as fm

    def case(t, h, nope, rope, rank, page_size, interleaved, dtype, decode=False, block_h=None):
        g = torch.Generator().manual_seed(t * 31 + h + rank + page_size)
        pages = 2 * t // page_size + 3
        q = torch.randn(t, h, nope + rope + 4, generator=g).to(dtype)[..., : nope + rope]  # strided view
        kv_a = torch.randn(t, rank + rope + 8, generator=g).to(dtype)[:, : rank + rope]  # strided rows
        positions = torch.randint(0, 200, (t,), generator=g) if decode else torch.arange(7, 7 + t)
        slots = torch.randperm(pages * page_size, generator=g)[:t]  # scattered, distinct
        inv = 1.0 / (10000 ** (torch.arange(0, rope, 2).float() / rope))
        freqs = torch.outer(torch.arange(256).float(), inv)
        cos_sin = torch.cat([freqs.cos(), freqs.sin()], -1)
        weight = torch.randn(rank, generator=g).to(dtype)
        pool = torch.randn(pages, page_size, rank + rope, generator=g).to(dtype)
        got_pool, want_pool = pool.clone(), pool.clone()
        args = (positions, q, kv_a, weight, 1e-6)
        rest = (slots // page_size, slots % page_size, cos_sin, interleaved)
        got = fm.fused_mla_rope(*args, got_pool, *rest, block_h=block_h)
        want = fm.mla_rope_reference(*args, want_pool, *rest)
        assert got.is_contiguous() and got.shape == (t, h, rope)
        # float32: rounding order only; bf16: a few ulps of the largest value (fused_rope_kv.close_enough)
        for a, b in ((got, want), (got_pool, want_pool)):
            tol = (1e-5 if dtype == torch.float32 else 1 / 32) * b.abs().max().item()
            torch.testing.assert_close(a, b, atol=tol, rtol=0)
        assert not torch.equal(got_pool, pool)
        print("case passed", t, h, nope, rope, rank, page_size, interleaved, dtype, block_h)
    """
)


def test_interpreted_kernel_matches_the_torch_path():
    """rope 12 (half 6) and rank 20 exercise the masked lanes; 3 heads with 4 a program the masked
    heads of a prefill-sized launch."""
    out = _interpret(
        CHECK
        + textwrap.dedent(
            """
            f32, bf16 = torch.float32, torch.bfloat16
            for page_size in (1, 16):
                for interleaved in (True, False):
                    case(11, 4, 16, 8, 32, page_size, interleaved, f32)  # a prefill chunk
                    case(5, 4, 16, 8, 32, page_size, interleaved, f32, decode=True)  # a decode batch
            case(6, 3, 24, 12, 20, 4, True, f32, block_h=4)
            case(4, 16, 128, 64, 512, 16, True, bf16, decode=True)  # V3's widths, bf16 roundings
            case(9, 2, 16, 8, 32, 4, False, bf16, block_h=4)
            """
        )
    )
    assert out.count("case passed") == 11


MODEL_RUN = textwrap.dedent(
    """
    import json, sys
    from disagg.common.engine.offline import Engine

    path, prompts = sys.argv[1], json.loads(sys.argv[2])
    engine = Engine(model_path=path, page_size=4, max_total_tokens=512, chunked_prefill_size=16)
    layers = engine.scheduler.runner.model.layers
    assert all(layer.self_attn.fused_rope for layer in layers), "the kernel is not in use"
    outs = engine.generate(prompts, {"max_new_tokens": 6, "temperature": 0, "ignore_eos": True})
    print("tokens", json.dumps([o["output_ids"] for o in outs]))
    """
)


@pytest.mark.parametrize("version", ["v2", "v3"])
def test_tiny_deepseek_with_the_kernel_gives_transformers_tokens(tmp_path, version):
    """The kernel in every MLA layer (prefill chunks of 16 over three requests, then decode batches):
    transformers' float32 greedy tokens. V2: plain RoPE, no q compression; V3: YaRN, q compression;
    both DeepSeek's interleaved pairs."""
    path = make_tiny_deepseek(tmp_path / version, version)
    rng = random.Random(version)
    prompts = [[rng.randrange(512) for _ in range(n)] for n in (3, 21, 9)]
    out = _interpret(MODEL_RUN, path, json.dumps(prompts))
    line = next(s for s in out.splitlines() if s.startswith("tokens "))
    assert json.loads(line.removeprefix("tokens ")) == [hf_greedy(path, p, 6) for p in prompts]


def test_start_up_check_refuses_a_kernel_that_disagrees():
    """A kernel that reads the wrong pairs, or writes one pool row too many, is refused (the layer
    keeps the torch ops, logged); DISAGG_FUSED_KERNELS=0 turns it off; the real kernel passes."""
    out = _interpret(
        textwrap.dedent(
            """
            import os, torch
            from disagg.common.models import fused_mla_rope as fm

            cpu, real = torch.device("cpu"), fm.fused_mla_rope
            def ok():
                fm.fused_mla_rope_ok.cache_clear()
                return fm.fused_mla_rope_ok(cpu, torch.float32, 4, 16, 8, 32, True)

            def plain_pairs(*args, block_h):  # the checkpoint read as rotate-half pairs
                return real(*args[:-1], False, block_h=block_h)

            def stray(*args, block_h):
                out = real(*args, block_h=block_h)
                args[5].view(-1, 40)[-1] += 1.0  # a slot no token owns
                return out

            assert ok()
            for bad in (plain_pairs, stray):
                fm.fused_mla_rope = bad
                assert not ok(), bad.__name__
            fm.fused_mla_rope = real
            os.environ["DISAGG_FUSED_KERNELS"] = "0"
            assert not ok()
            print("refused")
            """
        )
    )
    assert "refused" in out
    assert out.count("fused_mla_rope disagrees with torch") == 2 and "failed its start-up check" not in out


def test_kernel_compiles_for_hopper():
    """Triton's interpreter runs the kernel as Python, so it misses what only the compiler checks
    (e.g. a name typed differently in the two branches of the q/latent split): compile it for sm_90
    here, as the H200 does, at V3's widths and both launch shapes."""
    from disagg.common.models.fused_mla_rope import _mla_rope_kernel

    pointers = dict.fromkeys(("q", "kv_a", "norm_w", "q_pe", "pages"), "*bf16")
    pointers |= dict.fromkeys(("positions", "out_page", "out_offset"), "*i64") | {
        "cos_sin": "*fp32",
        "eps": "fp32",
    }
    for block_h in (1, 4):
        consts = dict(
            NOPE=128, RANK=512, RANK_POW2=512, HALF=32, HALF_POW2=32, BLOCK_H=block_h, INTERLEAVED=True
        )
        compile_for_hopper(_mla_rope_kernel, pointers, consts)
