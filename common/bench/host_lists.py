"""What a step's host lists (token ids, positions, pages, offsets, page-table rows) cost to become the
tensors a forward copies to the device: torch.tensor over the list (before the twentieth session) against
numpy's conversion (device_wait.host_tensor now), µs a list on this host, beside the bytes' size.
`python3 -m disagg.common.bench.host_lists` (CPU only; pinning is the same in both and left out)."""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch


def per_call_us(fn, iters: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - start) / iters * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--sizes", default="16,256,2048,8192", help="list lengths (a 2048-token prefill: 2048)"
    )
    parser.add_argument("--iters", type=int, default=500)
    args = parser.parse_args()
    print(f"{'length':>7} {'KB (int64)':>10} {'torch.tensor us':>16} {'numpy us':>9} {'speed-up':>9}")
    for n in map(int, args.sizes.split(",")):
        values = list(range(n))
        slow = per_call_us(lambda values=values: torch.tensor(values, dtype=torch.long), args.iters)
        fast = per_call_us(
            lambda values=values: torch.from_numpy(np.asarray(values, dtype=np.int64)), args.iters
        )
        print(f"{n:>7} {8 * n / 1024:>10.1f} {slow:>16.1f} {fast:>9.1f} {slow / fast:>8.1f}x")


if __name__ == "__main__":
    main()
