"""The dense GEMV of decode batches (common/models/gemv.py): its kernel equals F.linear under Triton's
interpreter on this CPU (1 to 4 tokens, with and without bias, shapes that leave partial tiles) and
compiles for sm_90 with its PDL wait first; the batch buckets; the CPU (and any shape without a tuned
entry for this device) keeps F.linear; the checked-in tuned entries are well formed."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from disagg.common.models import gemv as G

from tests.conftest import compile_for_hopper

CHECK = textwrap.dedent(
    """
    import torch, torch.nn.functional as F
    from disagg.common.models.gemv import bmm, gemv, linear
    torch.manual_seed(0)
    for n, k, cfg in ((37, 300, dict(BLOCK_N=8, BLOCK_K=128, num_warps=4)),
                      (64, 512, dict(BLOCK_N=16, BLOCK_K=256, num_warps=4))):
        w = torch.randn(n, k)
        b = torch.randn(n)
        for tokens in (1, 2, 3, 4):
            x = torch.randn(tokens, k)
            for bias in (None, b):
                got, want = gemv(x, w, bias, cfg), F.linear(x, w, bias)
                assert got.shape == want.shape and got.dtype == want.dtype
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
            # the layers' entry point: the plan's bucket ("1" or "4"), or F.linear without one
            plan = {"1": cfg} if tokens == 1 else {"4": cfg}
            torch.testing.assert_close(linear(x, w, None, plan), F.linear(x, w), rtol=1e-5, atol=1e-4)
    # MLA's absorbed products: per head, W_UK read transposed (rows along K) and W_UV as it is, the
    # queries a strided slice of their projection; against torch.bmm over the heads (bmm's fallback)
    heads, nope, rank = 3, 40, 96
    cfg = dict(BLOCK_N=16, BLOCK_K=32, num_warps=4)
    w_uk, w_uv = torch.randn(heads, nope, rank), torch.randn(heads, nope, rank)
    for tokens in (1, 3, 4):
        q_nope = torch.randn(tokens, heads, nope + 24)[..., :nope]
        for x, w in ((q_nope, w_uk.transpose(1, 2)), (torch.randn(tokens, heads, rank), w_uv)):
            want = bmm(x, w, torch.empty(tokens, heads, w.shape[1]), None)
            torch.testing.assert_close(want, torch.einsum("thk,hnk->thn", x, w), rtol=1e-5, atol=1e-4)
            plan = {"1": cfg} if tokens == 1 else {"4": cfg}
            got = bmm(x, w, torch.empty(tokens, heads, w.shape[1]), plan)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    print("ok")
    """
)


def test_kernel_equals_f_linear_under_the_interpreter():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-3000:]


@pytest.mark.parametrize("t_pow2, has_bias", [(1, False), (4, True)])
def test_kernel_compiles_for_hopper(t_pow2, has_bias):
    pytest.importorskip("triton")
    compile_for_hopper(
        G._gemv_kernel,
        {"x": "*bf16", "w": "*bf16", "bias": "*bf16", "out": "*bf16"},
        dict(T_POW2=t_pow2, BLOCK_N=8, BLOCK_K=1024 // t_pow2, HAS_BIAS=has_bias),
    )


def test_batch_buckets():
    assert [G.bucket(t) for t in range(1, 7)] == ["1", "4", "4", "4", None, None]


def test_the_cpu_and_untuned_shapes_keep_f_linear(monkeypatch):
    """No plan on the CPU; a plan only from this device's tuned entries (none for a made-up shape)."""
    layer = torch.nn.Linear(64, 32, bias=False)
    assert G.gemv_plan(layer.weight) is None
    calls = []
    monkeypatch.setattr(G, "gemv", lambda *a: calls.append(a))
    x = torch.randn(1, 64)
    torch.testing.assert_close(G.linear(x, layer.weight, None, None), layer(x))
    torch.testing.assert_close(G.linear(torch.randn(8, 64), layer.weight, None, {"1": {}, "4": {}}).shape,
                               torch.Size([8, 32]))  # fmt: skip
    assert not calls  # 8 tokens: above GEMV_MAX_TOKENS
    model = torch.nn.Sequential(layer)
    layer.gemv_plan = None
    assert G.prepare_gemv(model) == 0 and layer.gemv_plan is None


def test_tuned_entries_are_well_formed():
    """Each entry: `N=…,K=…,device=…` (a batched one `H=…,` first), buckets "1"/"4", power-of-two
    blocks the bench's candidates allow (the product tile at most 32k values)."""
    for key, entry in G.tuned_configs().items():
        fields = dict(part.split("=", 1) for part in key.split(","))
        assert (
            set(fields) - {"H"} == {"N", "K", "device"} and int(fields["N"]) > 0 and int(fields["K"]) > 0
        ), key
        assert entry and set(entry) <= {"1", "4"}, key
        for bucket, cfg in entry.items():
            assert set(cfg) == {"BLOCK_N", "BLOCK_K", "num_warps"}, key
            assert all(v & (v - 1) == 0 for v in cfg.values()), (key, cfg)
            assert cfg["BLOCK_N"] * cfg["BLOCK_K"] * int(bucket) <= 32768, (key, cfg)


def test_the_bench_lists_each_models_decode_products():
    """bench.gemv tunes what the engine would plan: the dense linears (not MLA's kv_b_proj, read per
    head) and MLA's W_UK (transposed) and W_UV; an FP8 checkpoint's linears (FP8 block GEMMs) left out."""
    from disagg.common.bench.gemv import linear_shapes

    assert linear_shapes("Qwen3-30B-A3B") == [(1, 2048, 4096, False), (1, 5120, 2048, False)]
    v2 = linear_shapes("DeepSeek-V2-Lite")
    assert (16, 512, 128, True) in v2 and (16, 128, 512, False) in v2 and (1, 3648, 2048, False) in v2
    assert (1, 4096, 512, False) not in v2  # kv_b_proj
    assert all(s[0] > 1 for s in linear_shapes("DeepSeek-V3"))


def test_the_bench_redraws_a_saved_run(tmp_path):
    """--plot-from: the H100 tune's printed table (fifteenth session, no H column) read back row by
    row, and drawn."""
    from pathlib import Path

    from disagg.common.bench.gemv import plot, rows_from_log

    log = Path(__file__).parents[1] / "docs/data/h100-s15/gemv_tune.log"
    rows = rows_from_log(log.read_text())
    assert len(rows) == 20 and {r["tokens"] for r in rows} == {1, 4}
    first = rows[0]
    assert (first["model"], first["heads"], first["n"], first["k"], first["tokens"]) == (
        "Qwen3-30B-A3B",
        1,
        2048,
        4096,
        1,
    )
    assert (first["roof_us"], first["torch_us"], first["gemv_us"]) == (5.67, 10.16, 7.55)
    plot(rows, str(tmp_path / "gemv.png"))
    assert (tmp_path / "gemv.png").stat().st_size > 10_000
