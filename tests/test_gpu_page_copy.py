"""On a CUDA GPU: the direct hand-off's one-pass page copy (transfer/page_copy.py) compiled. At the 8B
shape (32 layers, page 16, 8 KV heads of 128, bf16) 64 scattered pages land as torch's indexing puts
them, into a whole pool and into a pipeline stage's layer slice, on a side stream after an event (as
the sender runs it); the start-up check passes and leaves the kernel on."""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_the_compiled_page_copy_lands_the_pages_torch_would():
    from disagg.transfer import page_copy
    from disagg.transfer.direct import copy_pages

    assert page_copy.check(torch.device("cuda", torch.cuda.current_device()))
    g = torch.Generator(device="cuda").manual_seed(0)
    shape = (32, 300, 2, 16, 8, 128)
    src = torch.randn(shape, generator=g, device="cuda").to(torch.bfloat16)
    dst = torch.randn((34, *shape[1:]), generator=g, device="cuda").to(torch.bfloat16)
    src_pages = torch.randperm(300, generator=g, device="cuda")[:64]
    dst_pages = torch.randperm(300, generator=g, device="cuda")[:64]
    for layers in (slice(0, 32), slice(2, 34)):  # the layer slice: a pipeline stage's share of the pool
        want = dst.clone()
        want[layers, dst_pages] = src[:, src_pages]
        ready, stream = torch.cuda.Event(), torch.cuda.Stream()
        ready.record()
        with torch.cuda.stream(stream):
            stream.wait_event(ready)
            copy_pages(src, src_pages, (0, 8), dst[layers], dst_pages, (0, 8))
        stream.synchronize()
        assert torch.equal(dst, want), layers
        dst.copy_(want)
    assert page_copy._state["enabled"]
