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
