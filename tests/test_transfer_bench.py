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


@pytest.mark.slow
def test_a_busy_thread_beside_the_sender_does_not_stall_its_rooms(capsys) -> None:
    """A Python thread holding the GIL beside the transfer engine (as a prefill's scheduler thread
    launching a forward's kernels does): a 64 KiB room still lands in a few ms (1.6-2.0 ms on a 2-core
    CI machine). With Python's default 5 ms switch interval the loop thread waited for the GIL at each
    of its turns: 21-23 ms a room there (transfer/ucx.py, GIL_SWITCH_INTERVAL_S)."""
    import sys

    from disagg.transfer.ucx import GIL_SWITCH_INTERVAL_S

    bench.main(["--sizes", "64K", "--skip-8b", "--iters", "3", "--transport", "direct", "--busy-thread"])
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.strip().startswith("message")]
    assert len(rows) == 1 and float(rows[0][2]) < 8.0, out  # decode ms
    assert sys.getswitchinterval() <= GIL_SWITCH_INTERVAL_S
