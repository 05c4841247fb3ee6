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
    report = json.loads(DATA.read_text())
    report["rows"][0]["grouped_mm_us"] = None  # a path the run did not time is left out, not plotted as 0
    saved = tmp_path / "moe_kernels.json"
    saved.write_text(json.dumps(report))
    done = subprocess.run(
        [sys.executable, "-m", "disagg.common.bench.moe_kernels", "--plot-from", str(saved), "--output-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    png = (tmp_path / "moe_kernels.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
