"""Greedy sampling's argmax (common/models/argmax.py) gives torch.argmax's indices: the first index of
each row's maximum, ties inside a piece and across pieces, rows of -inf, NaN, float32 and bf16 — in
Triton's CPU interpreter with small pieces, compiled for sm_90, and on a GPU at real vocabularies."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

CHECK = textwrap.dedent(
    """
    import torch
    from disagg.common.models.argmax import argmax_finite, greedy_argmax

    def check(device, rows, vocab, chunk, dtype):
        g = torch.Generator().manual_seed(rows * 31 + vocab)
        x = torch.randn(rows, vocab, generator=g).to(dtype)
        x[0, vocab // 7] = x[0, vocab - 3] = 50  # equal maxima in different pieces: the first wins
        if rows > 1:
            x[1, vocab // 2] = x[1, vocab // 2 + 1] = 60  # equal maxima inside one piece
        if rows > 2:
            x[2] = float("-inf")  # torch: index 0
        if rows > 3:
            x[3, vocab // 3] = float("nan")  # torch ranks NaN first
        x = x.to(device)
        got, want = greedy_argmax(x, chunk), x.argmax(dim=-1)
        assert got.dtype == torch.int64 and torch.equal(got, want), (rows, vocab, chunk, dtype, got, want)
        # the sampler's numerical-fault flag: the chosen logit finite (rows 2 and 3: -inf and NaN are not)
        tokens, finite = argmax_finite(x, chunk)
        want_finite = torch.isfinite(x.gather(1, want[:, None]).squeeze(1))
        assert torch.equal(tokens, want) and finite.dtype == torch.bool, (tokens, finite)
        assert torch.equal(finite, want_finite), (rows, vocab, chunk, dtype, finite, want_finite)
        if rows > 4:
            x[4, vocab - 1] = float("inf")  # +inf: chosen, flagged
            assert argmax_finite(x, chunk)[0][4] == vocab - 1 and not argmax_finite(x, chunk)[1][4]
    """
)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU test checks the compiled kernels")
def test_interpreted_argmax_equals_torch():
    pytest.importorskip("triton")
    code = CHECK + textwrap.dedent(
        """
        for rows, vocab, chunk in ((1, 1000, 64), (5, 777, 128), (4, 64, 64), (2, 100, 256), (6, 4097, 512)):
            for dtype in (torch.float32, torch.bfloat16):
                check("cpu", rows, vocab, chunk, dtype)
        # the start-up check passes the kernels, and turns the Triton path off when they disagree
        from disagg.common.models import argmax
        assert argmax.check_argmax(torch.randn(1, 5000)) and argmax._ENABLED
        right = argmax.argmax_finite
        argmax.argmax_finite = lambda x, chunk=argmax.CHUNK: (right(x, chunk)[0] * 0, right(x, chunk)[1])  # a broken kernel
        assert not argmax.check_argmax(torch.randn(1, 5000)) and not argmax._ENABLED
        argmax._ENABLED = True
        argmax.argmax_finite = lambda x, chunk=argmax.CHUNK: (right(x, chunk)[0], right(x, chunk)[1] | True)  # a broken flag
        assert not argmax.check_argmax(torch.randn(1, 5000)) and not argmax._ENABLED
        x = torch.randn(2, 300)
        argmax.argmax_finite = right
        assert torch.equal(argmax.greedy_argmax(x), x.argmax(dim=-1))
        """
    )
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def test_argmax_kernels_compile_for_hopper():
    pytest.importorskip("triton")
    from disagg.common.models.argmax import CHUNK, _chunk_max_kernel, _pick_kernel

    from tests.conftest import compile_for_hopper

    for dtype in ("*bf16", "*fp32"):
        compile_for_hopper(
            _chunk_max_kernel,
            {"x": dtype, "part_v": "*fp32", "part_i": "*i32", "stride": "i64"},
            dict(CHUNK=CHUNK),
        )
    compile_for_hopper(
        _pick_kernel, {"part_v": "*fp32", "part_i": "*i32", "out": "*i64", "finite": "*i8"}, dict(PARTS=64)
    )


def test_cpu_tensors_take_torch_argmax():
    """Without the interpreter a CPU tensor never reaches Triton (the CPU install has none)."""
    from disagg.common.models.argmax import greedy_argmax

    x = torch.randn(3, 50)
    assert torch.equal(greedy_argmax(x), x.argmax(dim=-1))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_argmax_equals_torch_at_real_vocabularies():
    pytest.importorskip("triton")
    exec(CHECK, scope := {})
    from disagg.common.models.argmax import CHUNK

    for vocab in (49152, 129280, 151936):  # SmolLM2, DeepSeek-V3, Qwen3
        for rows in (1, 4, 64):
            for dtype in (torch.float32, torch.bfloat16):
                scope["check"]("cuda", rows, vocab, CHUNK, dtype)
