"""What a step's host lists (token ids, positions, pages, offsets, page-table rows) cost to become the
tensors a forward copies to the device: torch.tensor over the list (before the twentieth session) against
numpy's conversion (device_wait.host_tensor now), µs a list on this host (median of --iters calls), beside the bytes' size.
`python3 -m disagg.common.bench.host_lists` (CPU only; pinning is the same in both and left out)."""

from __future__ import annotations

import argparse

import numpy as np
import torch
from disagg.common.bench.offline import timed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--sizes", default="16,256,2048,8192", help="list lengths (a 2048-token prefill: 2048)"
    )
    parser.add_argument("--iters", type=int, default=500)
    args = parser.parse_args()
    print(f"{'length':>7} {'KB (int64)':>10} {'torch.tensor us':>16} {'numpy us':>9} {'speed-up':>9}")
    cpu = torch.device("cpu")
    for n in map(int, args.sizes.split(",")):
        values = list(range(n))
        slow, fast = (
            timed(lambda convert=convert, values=values: convert(values), cpu, args.iters) * 1e6
            for convert in (
                lambda v: torch.tensor(v, dtype=torch.long),
                lambda v: torch.from_numpy(np.asarray(v, dtype=np.int64)),
            )
        )
        print(f"{n:>7} {8 * n / 1024:>10.1f} {slow:>16.1f} {fast:>9.1f} {slow / fast:>8.1f}x")


if __name__ == "__main__":
    main()
