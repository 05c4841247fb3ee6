"""The decode step's L2 prefetch of o_proj (common/models/l2_prefetch.py): its kernel compiles for sm_90
with Hopper's bulk L2 prefetch after the PDL wait; off the GPU it is never taken; on a GPU it runs
inside a CUDA graph beside the weight's reader, which reads what it read without it."""

from __future__ import annotations

import pytest
import torch


def test_kernel_compiles_to_bulk_l2_prefetches_for_hopper():
    pytest.importorskip("triton")
    from disagg.common.models import l2_prefetch

    from tests.conftest import compile_for_hopper

    compiled = compile_for_hopper(
        l2_prefetch._prefetch_kernel, {"data": "*u8", "nbytes": "i64"}, dict(CHUNK=32768, PER_PROGRAM=128)
    )
    ptx = compiled.asm["ptx"]
    assert "cp.async.bulk.prefetch.L2.global" in ptx
    # the prefetch waits for its predecessor (PDL): it runs in the window after the QKV projection
    assert ptx.find("griddepcontrol.wait") < ptx.find("cp.async.bulk.prefetch")


def test_not_taken_off_cuda():
    from disagg.common.models.l2_prefetch import prefetch_ok

    assert not prefetch_ok(torch.device("cpu"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_prefetch_in_a_cuda_graph_leaves_the_product_alone():
    from disagg.common.models.l2_prefetch import prefetch_l2, prefetch_ok

    device = torch.device("cuda", torch.cuda.current_device())
    if torch.cuda.get_device_capability(device) < (9, 0):
        pytest.skip("the bulk L2 prefetch is Hopper's")
    assert prefetch_ok(device)
    g = torch.Generator(device=device).manual_seed(0)
    w = torch.randn(2048, 4096, generator=g, device=device).to(torch.bfloat16)  # Qwen3-30B-A3B's o_proj
    x = torch.randn(1, 4096, generator=g, device=device).to(torch.bfloat16)
    want = torch.nn.functional.linear(x, w)
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        prefetch_l2(w)  # warm-up (compile) outside the capture
        with torch.cuda.graph(graph, stream=stream):
            prefetch_l2(w)
            out = torch.nn.functional.linear(x, w)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, want)
