"""The L2 weight prefetch (common/models/l2_prefetch.py): its kernel compiles for sm_90 with the
prefetch instruction after the PDL wait, it is off unless asked for, and on a Hopper a product that
reads the prefetched weight right after it is bit-equal, eagerly and in a CUDA graph."""

import pytest
import torch
from disagg.common.models import l2_prefetch

from tests.conftest import compile_for_hopper

triton = pytest.importorskip("triton")


def test_kernel_compiles_for_hopper_with_one_prefetch_per_chunk():
    kernel = compile_for_hopper(
        l2_prefetch._prefetch_l2_kernel,
        {"base": "*u8", "nbytes": "i64"},
        {"CHUNK": l2_prefetch.CHUNK, "BLOCK": l2_prefetch.BLOCK},
    )  # PDL=True: compile_for_hopper also checks the wait comes before the first global access
    ptx = kernel.asm["ptx"]
    assert ptx.count("cp.async.bulk.prefetch.L2.global") == 1  # one a thread: BLOCK chunks a program
    assert "st.global" not in ptx and "ld.global" not in ptx  # a hint only: it reads and writes nothing


def test_off_by_default_and_on_cpu(monkeypatch):
    monkeypatch.delenv("DISAGG_L2_PREFETCH", raising=False)
    l2_prefetch.prefetch_enabled.cache_clear()
    assert not l2_prefetch.prefetch_enabled(torch.device("cpu"))
    monkeypatch.setenv("DISAGG_L2_PREFETCH", "1")
    l2_prefetch.prefetch_enabled.cache_clear()
    assert not l2_prefetch.prefetch_enabled(torch.device("cpu"))  # no L2 to fill on the CPU
    monkeypatch.setenv("DISAGG_L2_PREFETCH", "yes")
    l2_prefetch.prefetch_enabled.cache_clear()
    with pytest.raises(ValueError, match="DISAGG_L2_PREFETCH"):
        l2_prefetch.prefetch_enabled(torch.device("cpu"))
    l2_prefetch.prefetch_enabled.cache_clear()


@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0), reason="Hopper"
)
def test_prefetch_changes_no_value_and_runs_in_a_graph():
    w = torch.randn(2048, 4096, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)
    want = x @ w.t()
    l2_prefetch.prefetch_l2(w)
    torch.testing.assert_close(x @ w.t(), want, rtol=0, atol=0)
    l2_prefetch.prefetch_l2(w[:7].contiguous())  # a tail shorter than a chunk
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        l2_prefetch.prefetch_l2(w)
        out = x @ w.t()
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, want, rtol=0, atol=0)
