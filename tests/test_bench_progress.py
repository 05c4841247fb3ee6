"""The progress plot of issues 19/20 (common/bench/progress.py) reads the checked-in CSV and draws it."""

import pytest
from disagg.common.bench import progress


def test_checked_in_series_and_table(tmp_path):
    series = progress.load()
    assert set(series) == set(progress.FIGURES)
    for points in series.values():
        assert points and [s for s, _, _ in points] == sorted(s for s, _, _ in points)
        assert {d for _, d, _ in points} <= {"H100", "H200"}
    text = progress.table(series)
    assert "| Qwen3-30B-A3B decode, batch 1 | ≥ 65 |" in text
    assert "| DeepSeek-V2-Lite decode, batch 1 | ≤ 1.5 |" in text
    out = tmp_path / "p.png"
    progress.plot(series, out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_unknown_figure_is_refused(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("# a comment\nsession,device,figure,value\n3,H200,qwen3_b2_share,40\n")
    with pytest.raises(ValueError, match="qwen3_b2_share"):
        progress.load(bad)
