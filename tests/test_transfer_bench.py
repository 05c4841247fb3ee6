"""The transfer benchmark: the sizes it sweeps and one real (tiny) run on the CPU."""

from __future__ import annotations

import argparse

import pytest
from disagg.transfer import bench

MiB = 1 << 20


def _args(**kw) -> argparse.Namespace:
    return argparse.Namespace(**{"sizes": "", "quick": False, "max_size_mib": 1024, **kw})


def test_sizes_quick_and_full_sweep() -> None:
    assert bench.sweep_sizes(_args(quick=True)) == [64 << 10, 64 * MiB, 256 * MiB, 1024 * MiB]
    assert bench.sweep_sizes(_args(quick=True, max_size_mib=256)) == [64 << 10, 64 * MiB, 256 * MiB]
    full = bench.sweep_sizes(_args())
    assert full[0] == 64 << 10 and full[-1] == 1024 * MiB and len(full) == 8
    assert bench.sweep_sizes(_args(sizes="64K,1M,0.5G")) == [64 << 10, MiB, 512 * MiB]
    assert bench.parse_size("256MiB") == 256 * MiB and bench.parse_size("4096") == 4096


@pytest.mark.slow
def test_bench_prints_engine_beside_raw(capsys) -> None:
    bench.main(["--sizes", "64K,256K", "--skip-8b", "--iters", "1"])
    out = capsys.readouterr().out
    assert "% of raw" in out
    rows = [line.split() for line in out.splitlines() if line.strip().startswith("message")]
    assert [r[1] for r in rows] == ["0.06", "0.25"]
    assert all(r[-1].endswith("%") and float(r[2]) > 0 for r in rows)
    assert "failures" not in out
