"""moe_kernels draws its table (µs per layer against tokens, beside the roofline) from a saved run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

DATA = Path(__file__).parent.parent / "docs" / "data" / "h200-s7" / "moe_kernels_no_tune.json"


def test_plot_from_a_saved_run(tmp_path):
    pytest.importorskip("matplotlib")
    # its first rows have no torch _grouped_mm time (not run there): left out of the plot, not drawn as 0
    assert json.loads(DATA.read_text())["rows"][0]["grouped_mm_us"] is None
    done = subprocess.run(
        [sys.executable, "-m", "disagg.common.bench.moe_kernels", "--plot-from", str(DATA), "--output-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    png = (tmp_path / "moe_kernels.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_path_crossovers_from_a_run_of_batches():
    from disagg.common.bench.moe_kernels import set_crossovers

    def row(tokens, gemv, grouped, mm=None):
        return dict(tokens=tokens, gemv_us=gemv, grouped_us=grouped, grouped_mm_us=mm)

    # the GEMV wins up to 4 tokens (not again at 32: only the first run counts); torch's grouped GEMM
    # from 1024 tokens to the last batch (not at 64, where a slower 256 follows)
    rows = [row(1, 10, 20), row(4, 15, 20, None), row(8, 30, 25), row(32, 20, 30), row(64, 90, 80, 70),
            row(256, 200, 150, 160), row(1024, 600, 500, 450), row(2048, 1100, 900, 800)]  # fmt: skip
    config = {}
    set_crossovers(config, rows, top_k=8)
    assert config == {"gemv_max_pairs": 32, "grouped_mm_min_tokens": 1024}
    set_crossovers(config, rows[:-1] + [row(2048, 1100, 900, None)], top_k=8)
    assert config["grouped_mm_min_tokens"] == 1 << 30  # not measured at the largest batch: never


def test_tune_saves_each_finished_step(monkeypatch):
    """A tune cut short by its time limit (gpu_runs.sh runs it under `timeout`) still leaves the steps it
    finished: the config is saved after each one, each step building on the one before."""
    import torch
    from disagg.common.bench import moe_kernels

    seen = []

    def fake_sweep(name, candidates, make_config, tokens, layers, k, ceil, graph):
        seen.append((name, tokens, len(candidates)))
        best = candidates[-1]  # stands in for the fastest
        return best, [dict(path=name, tokens=tokens, config=best, us=1.0, of_roofline=0.5)]

    monkeypatch.setattr(moe_kernels, "sweep", fake_sweep)
    saved = []
    layers = [(torch.empty(0), torch.empty(4, 16, 1408), None)]
    base = {"gemv": {"BLOCK_N": 16}, "grouped": {"1": {}}}
    config, log = moe_kernels.tune(
        layers, 6, {}, base, gemv_only=True, save=lambda c: saved.append(c["gemv"].copy())
    )
    assert [s[0] for s in seen] == ["gemv", "gemv-down", "gemv-down-ksplit", "gemv-down-k"]
    assert len(saved) == 4 and saved[-1] == config["gemv"] and len(log) == 4
    # the gate/up sweep tries unsplit K (no zeroed buffer, no atomics) as well as split; the down steps keep it
    assert seen[0][2] == 78 and saved[0]["SPLIT_K"] == 16 and saved[-1]["SPLIT_K"] == 16
    assert saved[1]["DOWN_SPLIT"] == 8 and saved[-1]["DOWN_BLOCK_K"] == 2048  # the last candidates won here
    config, _ = moe_kernels.tune(layers, 6, {}, base, save=lambda c: saved.append(c))
    assert [s[1] for s in seen[4:]] == [1, 1, 1, 1, 16, 32, 64, 2048] and len(saved) == 4 + 8
    assert set(config["grouped"]) == {"1", "16", "32", "64", "2048"}


def test_grouped_tune_at_prefill_sizes_keeps_the_rest(monkeypatch):
    """--tune-grouped-at: only the prefill tiles at the given sizes (eager), the GEMV layout and the
    other sizes' tiles kept; saved after each size."""
    import torch
    from disagg.common.bench import moe_kernels

    seen = []

    def fake_sweep(name, candidates, make_config, tokens, layers, k, ceil, graph):
        seen.append((name, tokens, graph))
        return candidates[0], [dict(path=name, tokens=tokens, config=candidates[0], us=1.0, of_roofline=0.5)]

    monkeypatch.setattr(moe_kernels, "sweep", fake_sweep)
    saved = []
    layers = [(torch.empty(0), torch.empty(4, 16, 1408), None)]
    base = {"gemv": {"BLOCK_N": 16}, "grouped": {"1": {"BLOCK_SIZE_M": 16}, "1024": {"BLOCK_SIZE_M": 64}}}
    config, _ = moe_kernels.tune_grouped(layers, 6, {}, base, [2048, 4096], save=lambda c: saved.append(c))
    assert seen == [("grouped", 2048, False), ("grouped", 4096, False)] and len(saved) == 2
    assert config["gemv"] == base["gemv"] and config["grouped"]["1024"] == {"BLOCK_SIZE_M": 64}
    assert (
        set(config["grouped"]) == {"1", "1024", "2048", "4096"}
        and config["grouped"]["4096"]["BLOCK_SIZE_M"] >= 64
    )
    # decode batches: the 16-row tiles, timed in a CUDA graph
    config, _ = moe_kernels.tune_grouped(layers, 6, {}, config, [32], save=lambda c: saved.append(c))
    assert seen[-1] == ("grouped", 32, True) and config["grouped"]["32"]["BLOCK_SIZE_M"] == 16
    assert set(config["grouped"]) == {"1", "32", "1024", "2048", "4096"}


def test_fp8_gemv_sweep_tries_tiles_within_a_scale_block_and_across(monkeypatch):
    """FP8 experts: the gate/up GEMV layouts keep K tiles within one 128-wide scale block (one scale a
    tile row) as well as FP8_WIDE_K tiles across blocks; both kinds are candidates."""
    import torch
    from disagg.common.bench import moe_kernels

    seen = {}

    def fake_sweep(name, candidates, make_config, tokens, layers, k, ceil, graph):
        seen.setdefault(name, candidates)
        return candidates[0], []

    monkeypatch.setattr(moe_kernels, "sweep", fake_sweep)
    scales = object()  # FP8: any scales
    layers = [(torch.empty(0), torch.empty(4, 16, 256), scales)]
    moe_kernels.tune(layers, 8, {}, {"gemv": {}, "grouped": {"1": {}}}, gemv_only=True)
    plain = [c for c in seen["gemv"] if not c.get("FP8_WIDE_K")]
    wide = [c for c in seen["gemv"] if c.get("FP8_WIDE_K")]
    assert plain and all(c["BLOCK_K"] <= 128 for c in plain) and {c["SPLIT_K"] for c in plain} >= {1, 8}
    assert wide and all(c["BLOCK_K"] > 128 for c in wide)
