"""RoPE (+ Qwen3's q/k RMSNorm) fused with the paged K/V write (common/models/fused_rope_kv.py), under
Triton's CPU interpreter: the kernel gives the torch path's rotated q and pool (every slot, so a stray
write fails too) for page sizes 1 and 16, GQA, q/k norm on and off, neox and GPT-J pairs, scattered
slots, a prefill chunk and a decode batch; the decoder's tiny Llama (Llama-3 rope) and Qwen3 (q/k
norm) with the kernel in every layer give transformers' float32 tokens; the start-up check refuses a
kernel that disagrees; the reference is the decoder's own unfused arithmetic."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from disagg.common.models.fused_rope_kv import rope_kv_reference
from disagg.common.models.kernels import apply_rope, rms_norm

from tests.conftest import hf_greedy

pytest.importorskip("triton")

CHECK = textwrap.dedent(
    """
    import torch
    from disagg.common.models import fused_rope_kv as fr

    def case(t, hq, hkv, d, page_size, qk_norm, neox, dtype, prefix=0, decode=False, launch=None, rotate_k=False):
        g = torch.Generator().manual_seed(t * 31 + hq + d + page_size)
        pages = 2 * t // page_size + 3
        qkv = torch.randn(t, (hq + 2 * hkv) * d, generator=g).to(dtype)
        q, k, v = (x.view(t, -1, d) for x in qkv.split([hq * d, hkv * d, hkv * d], -1))
        # a prefill chunk: consecutive positions after a prefix; a decode batch: one per request
        positions = torch.randint(0, 200, (t,), generator=g) if decode else torch.arange(prefix, prefix + t)
        slots = torch.randperm(pages * page_size, generator=g)[:t]  # scattered, distinct
        k_rows = slots // page_size * (2 * page_size) + slots % page_size
        inv = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
        freqs = torch.outer(torch.arange(256).float(), inv)
        cos_sin = torch.cat([freqs.cos(), freqs.sin()], -1)
        norm = (torch.randn(d, generator=g).to(dtype), torch.randn(d, generator=g).to(dtype), 1e-6) if qk_norm else None
        pool = torch.randn(pages, 2, page_size, hkv, d, generator=g).to(dtype)
        kv_got, kv_want = pool.clone(), pool.clone()
        # rotate_k: the projection's K rows rotated in place too (each path on its own copy of them)
        qkv_got, qkv_want = qkv.clone(), qkv.clone()
        views = lambda x: (y.view(t, -1, d) for y in x.split([hq * d, hkv * d, hkv * d], -1))
        got = fr.fused_rope_kv(positions, *views(qkv_got), kv_got, k_rows, cos_sin, norm, neox, launch, rotate_k)
        want = fr.rope_kv_reference(positions, *views(qkv_want), kv_want, k_rows, cos_sin, norm, neox, rotate_k)
        assert got.is_contiguous() and got.shape == (t, hq, d)
        assert torch.equal(qkv_got, qkv) == torch.equal(qkv_want, qkv) == (not rotate_k)
        # float32: the same arithmetic up to rounding order. bf16: a few ulps of the largest value
        # (NOTE: the interpreter truncates float32 -> bf16 where the GPU rounds to nearest, so the
        # roundings themselves are checked in tests/test_gpu_fused_rope_kv.py)
        for a, b in ((got, want), (kv_got, kv_want), (qkv_got, qkv_want)):
            tol = (1e-5 if dtype == torch.float32 else 1 / 32) * b.abs().max().item()
            torch.testing.assert_close(a, b, atol=tol, rtol=0)
        assert not torch.equal(kv_got, pool)
        print("case passed", t, hq, hkv, d, page_size, qk_norm, neox, dtype, launch)
    """
)


def _interpret(code: str, *args: str) -> str:
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run(
        [sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout + done.stderr


@pytest.mark.skipif(
    torch.cuda.is_available(), reason="tests/test_gpu_fused_rope_kv.py checks the compiled kernel"
)
def test_interpreted_kernel_matches_the_torch_path():
    """head_dim 24 (half 12, not a power of two) exercises the masked lanes; the (4 heads, 2 warps)
    launch with 6 q heads the masked heads of a prefill-sized launch."""
    out = _interpret(
        CHECK
        + textwrap.dedent(
            """
            f32, bf16 = torch.float32, torch.bfloat16
            for page_size in (1, 16):
                for qk_norm in (False, True):
                    for neox in (True, False):
                        case(13, 4, 2, 16, page_size, qk_norm, neox, f32, prefix=5)  # prefill chunk, GQA
                        case(5, 4, 2, 16, page_size, qk_norm, neox, f32, decode=True)  # decode batch
            case(3, 4, 4, 24, 16, True, True, f32, decode=True)  # MHA, half not a power of two
            case(9, 8, 1, 32, 4, True, True, bf16, prefix=40)  # one KV head (a TP shard), bf16 roundings
            case(6, 4, 2, 16, 16, False, True, bf16, decode=True)
            case(7, 6, 2, 16, 16, True, False, f32, prefix=3, launch=(8, 4))  # fewer heads than a program takes
            case(11, 4, 2, 16, 16, True, True, f32, rotate_k=True)  # a fresh prompt's K for the ragged kernel
            case(9, 8, 1, 32, 4, False, True, bf16, launch=(4, 2), rotate_k=True)
            case(9, 12, 2, 32, 4, True, True, bf16, launch=fr.LAUNCHES[1], rotate_k=True)  # the prefill launch
            """
        )
    )
    assert out.count("case passed") == 23


def test_reference_is_the_decoders_unfused_arithmetic():
    """rope_kv_reference (the start-up check's and tests' reference) = kernels.rms_norm + apply_rope
    (the decoder's torch ops, bitwise equal to transformers in float32) and the two index_copy_s."""
    g = torch.Generator().manual_seed(0)
    t, hq, hkv, d, page_size = 6, 4, 2, 16, 4
    q, k, v = (torch.randn(t, h, d, generator=g) for h in (hq, hkv, hkv))
    positions = torch.tensor([0, 9, 3, 4, 30, 7])
    freqs = torch.outer(torch.arange(64).float(), torch.rand(d // 2, generator=g))
    cos, sin = freqs.cos(), freqs.sin()
    wq, wk = torch.randn(d, generator=g), torch.randn(d, generator=g)
    k_rows = torch.tensor([0, 1, 2, 8, 9, 17])
    kv = torch.zeros(6, 2, page_size, hkv, d)
    got = rope_kv_reference(positions, q, k, v, kv, k_rows, torch.cat([cos, sin], -1), (wq, wk, 1e-6))
    want_q, want_k = apply_rope(positions, rms_norm(q, wq, 1e-6), rms_norm(k, wk, 1e-6), cos, sin, None)
    assert torch.equal(got, want_q)
    rows = kv.view(-1, hkv, d)
    assert torch.equal(rows[k_rows], want_k) and torch.equal(rows[k_rows + page_size], v)
    k_in = k.clone()  # rotate_k: k itself becomes the rotated K
    rope_kv_reference(
        positions, q, k_in, v, kv, k_rows, torch.cat([cos, sin], -1), (wq, wk, 1e-6), rotate_k=True
    )
    assert torch.equal(k_in, want_k)


MODEL_RUN = textwrap.dedent(
    """
    import json, sys
    from disagg.common.engine.offline import Engine

    path, page_size, prompts = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
    engine = Engine(model_path=path, page_size=page_size, max_total_tokens=512, chunked_prefill_size=8)
    layers = engine.scheduler.runner.model.layers
    assert all(layer.self_attn.fused_rope_kv for layer in layers), "the kernel is not in use"
    outs = engine.generate(prompts, {"max_new_tokens": 6, "temperature": 0, "ignore_eos": True})
    print("tokens", json.dumps([o["output_ids"] for o in outs]))
    """
)
PROMPTS = [[7, 100, 3, 256, 41, 9, 11, 12, 300, 5, 77], list(range(20, 33))]


@pytest.mark.parametrize(("family", "page_size"), [("llama", 16), ("qwen3", 1)])
def test_tiny_models_with_the_kernel_give_transformers_tokens(tiny_models, family, page_size):
    """The kernel in every attention layer (prefill chunks of 8 over 2 requests, then decode
    batches): transformers' float32 greedy tokens. Llama: Llama-3 scaled rope; Qwen3: q/k norm."""
    path = tiny_models[family]
    out = _interpret(MODEL_RUN, path, str(page_size), json.dumps(PROMPTS))
    line = next(s for s in out.splitlines() if s.startswith("tokens "))
    assert json.loads(line.removeprefix("tokens ")) == [hf_greedy(path, p, 6) for p in PROMPTS]


def test_start_up_check_refuses_a_kernel_that_disagrees():
    """A kernel that rotates the wrong pairs, writes one pool row too many, or leaves K unrotated where
    asked to rotate it in place, is refused (the layer keeps the torch ops, logged);
    DISAGG_FUSED_KERNELS=0 turns it off; the real kernel passes."""
    out = _interpret(
        textwrap.dedent(
            """
            import os, torch
            from disagg.common.models import fused_rope_kv as fr

            cpu, real = torch.device("cpu"), fr.fused_rope_kv
            def ok():
                fr.fused_rope_kv_ok.cache_clear()
                return fr.fused_rope_kv_ok(cpu, torch.float32, 4, 2, 16, True)

            def gptj(*args, launch, rotate_k):  # the other pair layout
                return real(*args, is_neox=False, launch=launch, rotate_k=rotate_k)

            def stray(positions, q, k, v, kv, *rest, launch, rotate_k):
                out = real(positions, q, k, v, kv, *rest, launch=launch, rotate_k=rotate_k)
                kv.view(-1, 2, 16)[-1] += 1.0  # a slot no token owns
                return out

            assert ok()
            def unrotated_k(*args, launch, rotate_k):  # K left as projected where asked to rotate it
                return real(*args, launch=launch)

            for bad in (gptj, stray, unrotated_k):
                fr.fused_rope_kv = bad
                assert not ok(), bad.__name__
            fr.fused_rope_kv = real
            os.environ["DISAGG_FUSED_KERNELS"] = "0"
            assert not ok()
            print("refused")
            """
        )
    )
    assert "refused" in out
    assert out.count("fused_rope_kv disagrees with torch") == 3 and "failed its start-up check" not in out
