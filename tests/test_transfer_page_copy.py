"""The direct hand-off's one-pass page copy (transfer/page_copy.py): the same pages land as through
torch's gather + index_copy_ (transfer/direct.py), into a whole pool and into a pipeline stage's layer
slice of one, in Triton's CPU interpreter; the kernel compiles for sm_90; a CPU install without the
interpreter and a head slice keep the torch path."""

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
    from disagg.transfer import page_copy
    from disagg.transfer.direct import copy_pages

    def pools(g, layers, pages, page_size, heads, head_dim):
        shape = (layers, pages, 2, page_size, heads, head_dim)
        return torch.randn(shape, generator=g).to(torch.bfloat16)

    g = torch.Generator().manual_seed(1)
    # 8 KV heads of 64 (bf16), page size 4: a page's layer row is 2 * 4 * 8 * 64 * 2 B = 1024 words,
    # one block; with 128-wide heads two blocks
    for head_dim in (64, 128):
        src, dst = pools(g, 3, 12, 4, 8, head_dim), pools(g, 5, 20, 4, 8, head_dim)
        src_pages, dst_pages = torch.tensor([11, 0, 4, 7, 2]), torch.tensor([3, 19, 0, 8, 12])
        want = dst.clone()
        want[1:4, dst_pages] = src[:, src_pages]
        stage = dst[1:4]  # a pipeline stage's layers of the decode's pool
        assert page_copy.usable(stage.view(3, 20, -1).view(torch.int64), src.view(3, 12, -1).view(torch.int64))
        copy_pages(src, src_pages, (0, 8), stage, dst_pages, (0, 8))
        assert torch.equal(dst, want), head_dim
    # a head slice (heterogeneous TP: the decode rank holds 4 of the 8 heads) takes the torch path
    src, dst = pools(g, 2, 6, 4, 8, 64), pools(g, 2, 6, 4, 4, 64)
    want = dst.clone()
    want[:, torch.tensor([5, 1])] = src[:, torch.tensor([0, 3]), :, :, 4:8]
    copy_pages(src, torch.tensor([0, 3]), (4, 8), dst, torch.tensor([5, 1]), (0, 4))
    assert torch.equal(dst, want)
    print("checked", page_copy._state)
    """
)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU test checks the compiled kernel")
def test_interpreted_page_copy_lands_the_pages_torch_would():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    # the start-up check ran (once) and left the kernel on
    assert "'enabled': True" in done.stdout and "device(type='cpu')" in done.stdout, done.stdout


def test_page_copy_kernel_compiles_for_hopper():
    pytest.importorskip("triton")
    from disagg.transfer.page_copy import BLOCK, _copy_pages_kernel

    from tests.conftest import compile_for_hopper

    types = {"src": "*i64", "dst": "*i64", "src_pages": "*i64", "dst_pages": "*i64"}
    compile_for_hopper(_copy_pages_kernel, types, dict(BLOCK=BLOCK))


def test_cpu_pools_take_the_torch_path():
    """Without the interpreter a CPU pool never reaches Triton (the CPU install has none)."""
    from disagg.transfer import page_copy

    rows = torch.zeros(2, 3, 8, dtype=torch.int64)
    if os.environ.get("TRITON_INTERPRET") != "1":
        assert not page_copy.usable(rows, rows.clone())
