"""What greedy sampling's numerical-fault check costs a decode step (issues 19, 20, 24): per vocabulary
and batch, the argmax alone (the eighteenth session's sampler), the argmax + gather + isfinite (the
nineteenth's), and the argmax whose second launch writes the flag (argmax_finite, now), each timed
eagerly (as the sampler runs, after the graph's replay) and as one CUDA graph, beside the time the
logits' bytes take at this process's copy rate. `python3 -m disagg.common.bench.sampling`."""

from __future__ import annotations

import argparse
import json

import torch
from disagg.common.bench.offline import graph_us_per_layer, measure_ceilings, queued_us
from disagg.common.models.argmax import argmax_finite, check_argmax, greedy_argmax


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--vocabs", default="49152,129280,151936,128256")
    parser.add_argument("--batches", default="1,16,64")
    parser.add_argument("--output-json", default=None)
    args = parser.parse_args()
    dev = torch.device("cuda")
    rate = measure_ceilings(dev, torch.bfloat16)["copy_gb_s"] * 1e9
    print(f"{torch.cuda.get_device_name()}; copy {rate / 1e9:.0f} GB/s")
    paths = {
        "argmax": lambda x: greedy_argmax(x),
        "argmax+gather+isfinite": lambda x: (
            t := greedy_argmax(x),
            torch.isfinite(x.gather(1, t[:, None]).squeeze(1)),
        ),
        "argmax_finite": lambda x: argmax_finite(x),
    }
    rows = []
    header = f"{'vocab':>7} {'batch':>5} {'path':<24} {'eager µs':>9} {'graph µs':>9} {'bytes µs':>9}"
    print(header)
    for vocab in map(int, args.vocabs.split(",")):
        for batch in map(int, args.batches.split(",")):
            x = torch.randn(batch, vocab, device=dev)
            if not check_argmax(x[:1]):
                raise SystemExit("the Triton argmax is off on this device (start-up check failed)")
            bytes_us = x.numel() * x.element_size() / rate * 1e6
            for name, fn in paths.items():
                eager, graph = queued_us(lambda fn=fn, x=x: fn(x)), graph_us_per_layer(fn, [x], iters=200)
                rows.append(
                    dict(
                        vocab=vocab, batch=batch, path=name, eager_us=eager, graph_us=graph, bytes_us=bytes_us
                    )
                )
                print(f"{vocab:>7} {batch:>5} {name:<24} {eager:>9.1f} {graph:>9.1f} {bytes_us:>9.1f}")
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), copy_gbps=rate / 1e9, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
