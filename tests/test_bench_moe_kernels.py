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
