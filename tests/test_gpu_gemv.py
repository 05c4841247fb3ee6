"""On a GPU: the dense GEMV (common/models/gemv.py) at each tuned entry of this device, eager and
replayed in a CUDA graph on new inputs, within bf16 rounding of F.linear; a layer given its plan by
prepare_gemv computes what F.linear does."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
pytest.importorskip("triton")

BF16 = torch.bfloat16


def _entries():
    from disagg.common.models import gemv as G
    from disagg.common.models.fused_moe import device_name

    dev = device_name()
    out = []
    for key, entry in G.tuned_configs().items():
        fields = dict(part.split("=", 1) for part in key.split(","))
        if fields["device"] == dev:
            heads = int(fields.get("H", 1))
            out += [(heads, int(fields["N"]), int(fields["K"]), b, c) for b, c in entry.items()]
    # the kernel at a made-up layout too, so that a device without entries still runs it
    return out + [(1, 1000, 3000, "1", {"BLOCK_N": 8, "BLOCK_K": 512, "num_warps": 4})]


def test_every_tuned_entry_passes_its_load_check():
    """The check each plan passes at load (gemv._config_ok: 1, 3 and 4 tokens against torch), for
    both weight layouts of a batched entry (MLA's W_UK is read transposed)."""
    from disagg.common.models import gemv as G

    for heads, n, k, _, cfg in _entries():
        for transposed in (False, True) if heads > 1 else (False,):
            assert G._config_ok(torch.device("cuda", 0), heads, n, k, transposed, BF16, False, **cfg), (
                heads,
                n,
                k,
            )


def test_tuned_gemvs_match_f_linear_eager_and_in_a_graph():
    from disagg.common.models.gemv import gemv

    gen = torch.Generator(device="cuda").manual_seed(0)
    for heads, n, k, bucket, cfg in _entries():
        if heads > 1:
            continue
        w = (torch.randn(n, k, device="cuda", generator=gen) / k**0.5).to(BF16)
        tokens = 1 if bucket == "1" else 3
        x = torch.randn(tokens, k, device="cuda", generator=gen).to(BF16)
        torch.testing.assert_close(gemv(x, w, None, cfg), F.linear(x, w), rtol=2e-2, atol=2e-2)
        static = x.clone()
        gemv(static, w, None, cfg)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = gemv(static, w, None, cfg)
        for _ in range(3):
            new = torch.randn(tokens, k, device="cuda", generator=gen).to(BF16)
            static.copy_(new)
            graph.replay()
            torch.testing.assert_close(out, F.linear(new, w), rtol=2e-2, atol=2e-2)


def test_a_planned_layer_computes_f_linear(monkeypatch):
    from disagg.common.models import gemv as G
    from disagg.common.models.fused_moe import device_name
    from disagg.common.models.layers import ColumnParallelLinear

    layer = ColumnParallelLinear(3000, [1000], bias=True).cuda().to(BF16)
    with torch.no_grad():
        layer.weight.normal_(0, 3000**-0.5)
        layer.bias.normal_()
    cfg = {"BLOCK_N": 8, "BLOCK_K": 512, "num_warps": 4}
    monkeypatch.setattr(G, "tuned_configs", lambda: {G.config_key(1000, 3000, device_name()): {"1": cfg}})
    assert G.prepare_gemv(torch.nn.Sequential(layer)) == 1 and layer.gemv_plan == {"1": cfg}
    x = torch.randn(1, 3000, device="cuda").to(BF16)
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), rtol=2e-2, atol=2e-2)
