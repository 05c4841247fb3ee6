"""The MLA launch tune's choice (common/bench/decode_attention.py), its GPU timing replaced by a table."""

from __future__ import annotations

import pytest

bench = pytest.importorskip("disagg.common.bench.decode_attention")
DEFAULT = bench.triton_attn.MLA_DEFAULT_LAUNCH
NARROW = dict(block_n=16, num_warps=4, num_stages=2)
WIDE = dict(block_n=64, num_warps=8, num_stages=1)


def fake_timing(monkeypatch, table: dict[int, dict[str, float]], wrong: tuple = ()) -> None:
    """time_mla_launches answers from table[ctx] (µs by launch; every other launch 2x the default's);
    a launch named in `wrong` differs from the reference by 0.5."""

    def time_mla_launches(heads, batch, ctx, page_size, cases):
        rows = []
        for splits, launch in cases:
            name = {str(DEFAULT): "default", str(NARROW): "narrow", str(WIDE): "wide"}.get(str(launch))
            us = table[ctx].get(name, 2 * table[ctx]["default"])
            rows.append((us, 0.5 if name in wrong else 1e-3, splits, launch))
        return sorted(rows, key=lambda r: r[0])

    monkeypatch.setattr(bench, "time_mla_launches", time_mla_launches)


def test_a_launch_fastest_at_one_length_only_is_not_chosen(monkeypatch):
    """16 tokens an iteration: faster at exactly 1024 (one iteration a 16-token chunk), slower just past
    it (two): over both lengths the default wins, as it did in the engine on the H100 and the H200."""
    fake_timing(monkeypatch, {1024: dict(default=7.5, narrow=6.7), 1040: dict(default=7.6, narrow=9.4)})
    assert bench.tune_triton_mla(16, 1, [1024], 16, 163840) == NARROW
    assert bench.tune_triton_mla(16, 1, [1024, 1040], 16, 163840) == DEFAULT


def test_the_tune_takes_the_launch_faster_at_every_length_and_never_a_wrong_one(monkeypatch):
    table = {
        1040: dict(default=43.6, wide=28.5, narrow=20.0),
        3000: dict(default=90.0, wide=60.0, narrow=40.0),
    }
    fake_timing(monkeypatch, table, wrong=("narrow",))
    assert bench.tune_triton_mla(128, 8, [1040, 3000], 16, 163840) == WIDE
