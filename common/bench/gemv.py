"""The dense GEMV of decode batches (common/models/gemv.py) against cuBLAS (F.linear), for every dense
linear shape of the given models, at 1 and 4 tokens, each timed in a CUDA graph over enough weight
copies that L2 holds none of them between calls; each figure beside its bytes' time at the copy rate
measured in the same process. `--tune` sweeps the GEMV's block sizes and writes this device's winners
(at least 3% faster than cuBLAS, and equal to F.linear) into common/models/gemv_configs.json.

    python -m disagg.common.bench.gemv --models Qwen3-30B-A3B,DeepSeek-V2-Lite,Llama-3.1-8B --tune
"""

from __future__ import annotations

import argparse
import itertools
import json
import math

import torch
import torch.nn.functional as F
from disagg.common.bench.offline import graph_us_per_layer, measure_ceilings
from disagg.common.models import gemv as G
from disagg.common.models.fused_moe import device_name

CANDIDATES = [
    {"BLOCK_N": n, "BLOCK_K": k, "num_warps": w}
    for n, k, w in itertools.product((2, 4, 8, 16, 32), (256, 512, 1024, 2048), (4, 8))
]
L2_FREE_BYTES = 512 << 20  # weight copies a graph cycles through: well past the H200's 60 MB of L2


def linear_shapes(model: str) -> list[tuple[int, int]]:
    """The (N, K) of every linear of `model` that takes a GEMV plan (layers.py), from a 2-layer copy
    built on the CPU (DeepSeek: its first layer dense, its second MoE)."""
    from disagg.common.models.decoder import CausalLM
    from disagg.common.models.deepseek import fuse_shared_experts
    from disagg.common.models.weights import load_config

    config = load_config(model, json.dumps({"num_hidden_layers": 2}))
    if getattr(config, "first_k_dense_replace", None):
        config.first_k_dense_replace = 1
    with torch.device("cpu"):
        built = CausalLM(config, max_positions=64)
    fuse_shared_experts(built)  # the default: no shared MLP of its own
    skip = ("kv_b_proj",)  # MLA's absorbed decode reads its parts in bmm's, not as a linear
    return sorted(
        {
            tuple(m.weight.shape)
            for name, m in built.named_modules()
            if hasattr(m, "gemv_plan") and m.weight_scale_inv is None and not name.endswith(skip)
        }
    )


def time_shape(n: int, k: int, tokens: int, dtype, device, candidates) -> dict:
    copies = max(4, min(64, math.ceil(L2_FREE_BYTES / (n * k * dtype.itemsize))))
    weights = [torch.randn(n, k, device=device, dtype=dtype) / k**0.5 for _ in range(copies)]
    x = torch.randn(tokens, k, device=device, dtype=dtype)
    row = {"cublas_us": graph_us_per_layer(lambda w: F.linear(x, w), weights), "best": None, "best_us": None}
    for cfg in candidates:
        if cfg["BLOCK_N"] * cfg["BLOCK_K"] * (1 << (tokens - 1).bit_length()) > 32768:
            continue  # the product tile alone would spill
        try:
            us = graph_us_per_layer(lambda w, c=cfg: G.gemv(x, w, None, c), weights)
        except Exception as e:  # noqa: BLE001 - a layout that fails to compile or launch: skipped
            print(f"  {cfg}: {type(e).__name__}")
            continue
        if row["best_us"] is None or us < row["best_us"]:
            row["best"], row["best_us"] = cfg, us
    del weights
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="Qwen3-30B-A3B,DeepSeek-V2-Lite,Llama-3.1-8B")
    p.add_argument("--tune", action="store_true", help="sweep and write this device's winners")
    p.add_argument("--output", default=str(G.CONFIGS))
    args = p.parse_args()
    device, dtype = torch.device("cuda", 0), torch.bfloat16
    ceil = measure_ceilings(device, dtype)
    dev = device_name()
    print(f"{dev}: copy {ceil['copy_gb_s']:.0f} GB/s", flush=True)
    tuned = G.tuned_configs()
    shapes = {s: m for m in args.models.split(",") for s in linear_shapes(m)}
    table = json.loads(open(args.output).read()) if args.tune and G.CONFIGS.exists() else {}
    print(f"{'model':<18} {'N':>6} {'K':>6} {'T':>2} {'MB':>6} {'roof us':>8} {'cuBLAS us':>10} {'share':>6}"
          f" {'GEMV us':>8} {'share':>6}  config")  # fmt: skip
    for (n, k), model in shapes.items():
        for tokens, bucket in ((1, "1"), (4, "4")):
            entry = tuned.get(G.config_key(n, k, dev), {}).get(bucket)
            cands = CANDIDATES if args.tune else [entry] if entry else []
            r = time_shape(n, k, tokens, dtype, device, cands)
            mb = n * k * dtype.itemsize / 1e6
            roof = mb / ceil["copy_gb_s"] * 1e3
            gemv_txt = (
                f"{r['best_us']:8.2f} {roof / r['best_us']:6.1%}" if r["best"] else f"{'-':>8} {'-':>6}"
            )
            print(f"{model:<18} {n:>6} {k:>6} {tokens:>2} {mb:6.1f} {roof:8.2f} {r['cublas_us']:10.2f}"
                  f" {roof / r['cublas_us']:6.1%} {gemv_txt}  {r['best'] or ''}", flush=True)  # fmt: skip
            if not args.tune:
                continue
            key = G.config_key(n, k, dev)
            table.get(key, {}).pop(bucket, None)  # an earlier tune's winner that no longer wins goes
            wins = r["best"] and r["best_us"] < 0.97 * r["cublas_us"]
            if wins and G._config_ok(device, n, k, dtype, False, **r["best"]):
                table.setdefault(key, {})[bucket] = r["best"]
    if args.tune:
        table = {key: entry for key, entry in table.items() if entry}
        with open(args.output, "w") as f:
            json.dump(table, f, indent=1, sort_keys=True)
        print(f"wrote {len(table)} shapes to {args.output}")


if __name__ == "__main__":
    main()
