"""The GEMV of decode batches (common/models/gemv.py) against torch's product (cuBLAS: F.linear, or
torch.bmm for MLA's absorbed per-head products), for every such shape of the given models, at 1 and
4 tokens, each timed in a CUDA graph over enough weight copies that L2 holds none of them between
calls; each figure beside its bytes' time at the copy rate measured in the same process. `--tune`
sweeps the GEMV's block sizes and writes this device's winners (at least 3% faster than torch's,
and equal to it) into common/models/gemv_configs.json.

    python -m disagg.common.bench.gemv --models Qwen3-30B-A3B,DeepSeek-V2-Lite,Llama-3.1-8B --tune
    python -m disagg.common.bench.gemv --models DeepSeek-V2-Lite,DeepSeek-V3 --tune   # adds to the file
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from disagg.common.bench.offline import graph_us_per_layer, measure_ceilings
from disagg.common.models import gemv as G
from disagg.common.models.fused_moe import device_name

CANDIDATES = [
    {"BLOCK_N": n, "BLOCK_K": k, "num_warps": w}
    for n, k, w in itertools.product((2, 4, 8, 16, 32, 64), (128, 256, 512, 1024, 2048), (4, 8))
]


def candidates(k: int) -> list[dict]:
    """The sweep for a product of inner size k: no K block wider than k's power of two (half its lanes
    would be masked: MLA's W_UV has K = 128), and 64-row blocks only where K is that short."""
    k_pow2 = 1 << (k - 1).bit_length()
    return [c for c in CANDIDATES if c["BLOCK_K"] <= max(k_pow2, 256) and (c["BLOCK_N"] < 64 or k <= 256)
            and (c["BLOCK_K"] >= 256 or k <= 128)]  # fmt: skip


L2_FREE_BYTES = 512 << 20  # weight copies a graph cycles through: well past the H200's 60 MB of L2


def linear_shapes(model: str) -> list[tuple[int, int, int, bool]]:
    """(heads, N, K, transposed) of every product of `model` that takes a GEMV plan: its linears
    (layers.py; heads 1) and MLA's absorbed W_UK (transposed) and W_UV, from a 2-layer copy built on
    the CPU (DeepSeek: its first layer dense, its second MoE)."""
    from disagg.common.models.decoder import CausalLM
    from disagg.common.models.deepseek import fuse_shared_experts
    from disagg.common.models.weights import load_config

    config = load_config(model, json.dumps({"num_hidden_layers": 2}))
    if getattr(config, "first_k_dense_replace", None):
        config.first_k_dense_replace = 1
    for experts in ("n_routed_experts", "num_experts", "num_local_experts"):  # no linear's shape
        if getattr(config, experts, None):
            setattr(config, experts, 8)
    # an FP8 checkpoint's linears run FP8 block GEMMs on Hopper (fp8.py), all but kv_b_proj
    fp8 = "fp8" in str(getattr(config, "quantization_config", None) or "")
    with torch.device("cpu"):
        built = CausalLM(config, max_positions=64)
    fuse_shared_experts(built)  # the default: no shared MLP of its own
    shapes = set()
    for name, m in built.named_modules():
        # kv_b_proj: MLA's absorbed decode reads its parts per head (below), not as a linear
        if hasattr(m, "gemv_plan") and not fp8 and not name.endswith("kv_b_proj"):
            shapes.add((1, *m.weight.shape, False))
        if hasattr(m, "absorb_plans"):
            w_uk, w_uv = m._kv_b_weights()
            shapes |= {(w_uk.shape[0], w_uk.shape[2], w_uk.shape[1], True), (*w_uv.shape, False)}
    return sorted(shapes)


def time_shape(heads: int, n: int, k: int, transposed: bool, tokens: int, dtype, device, candidates) -> dict:
    """µs of torch's product (F.linear, or torch.bmm over the heads) and of the best candidate."""
    nbytes = heads * n * k * dtype.itemsize
    copies = max(4, min(64, math.ceil(L2_FREE_BYTES / nbytes)))
    shape = (heads, k, n) if transposed else (heads, n, k)
    weights = [torch.randn(shape, device=device, dtype=dtype) / k**0.5 for _ in range(copies)]
    weights = [w.transpose(1, 2) if transposed else w for w in weights]
    x = torch.randn(tokens, heads, k, device=device, dtype=dtype)
    out = torch.empty(tokens, heads, n, device=device, dtype=dtype)
    if heads == 1:
        ref, run = (lambda w: F.linear(x[:, 0], w[0])), (lambda w, c: G.gemv(x[:, 0], w[0], None, c))
    else:
        ref, run = (lambda w: G.bmm(x, w, out, None)), (lambda w, c: G.batched_gemv(x, w, out, c))
    row = {"torch_us": graph_us_per_layer(ref, weights), "best": None, "best_us": None}
    for cfg in candidates:
        if cfg["BLOCK_N"] * cfg["BLOCK_K"] * (1 << (tokens - 1).bit_length()) > 32768:
            continue  # the product tile alone would spill
        try:
            us = graph_us_per_layer(lambda w, c=cfg: run(w, c), weights)
        except Exception as e:  # noqa: BLE001 - a layout that fails to compile or launch: skipped
            print(f"  {cfg}: {type(e).__name__}")
            continue
        if row["best_us"] is None or us < row["best_us"]:
            row["best"], row["best_us"] = cfg, us
    del weights
    return row


def rows_from_log(text: str) -> list[dict]:
    """The table rows of a printed run (older runs printed no H column: one head)."""
    rows, has_h = [], False
    for line in text.splitlines():
        parts = line.split()
        if parts[:1] == ["model"]:
            has_h = parts[1] == "H"
            continue
        if len(parts) < 10 or not parts[1].isdigit():
            continue
        if not has_h:
            parts.insert(1, "1")
        heads, n, k, tokens = (int(v) for v in parts[1:5])
        gemv_us = None if parts[9] == "-" else float(parts[9])
        rows.append({"model": parts[0], "heads": heads, "n": n, "k": k, "tokens": tokens,
                     "roof_us": float(parts[6]), "torch_us": float(parts[7]), "gemv_us": gemv_us})  # fmt: skip
    return rows


def plot(rows: list[dict], path: str) -> None:
    """Each product's share of its bytes' time, torch's and the GEMV's, at 1 and 4 tokens."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = sorted(
        {(r["model"], r["heads"], r["n"], r["k"]) for r in rows}, key=lambda s: (s[0], s[2] * s[3])
    )
    fig, ax = plt.subplots(figsize=(max(8, 1.1 * len(labels)), 4.5))
    width = 0.2
    for i, (tokens, kind, name) in enumerate(
        [(1, "torch_us", "cuBLAS, 1 token"), (1, "gemv_us", "GEMV, 1 token"),
         (4, "torch_us", "cuBLAS, 4 tokens"), (4, "gemv_us", "GEMV, 4 tokens")]
    ):  # fmt: skip
        by = {(r["model"], r["heads"], r["n"], r["k"]): r for r in rows if r["tokens"] == tokens}
        shares = [100 * by[s]["roof_us"] / by[s][kind] if s in by and by[s][kind] else 0 for s in labels]
        ax.bar([j + (i - 1.5) * width for j in range(len(labels))], shares, width, label=name)
    ax.axhline(100, color="k", lw=0.8, ls="--")
    ax.set_xticks(range(len(labels)))
    names = [f"{m}\n{f'{h} x ' if h > 1 else ''}{n} x {k}" for m, h, n, k in labels]
    ax.set_xticklabels(names, fontsize=7)
    ax.set_ylabel("% of the bytes' time at the copy rate")
    ax.set_title("decode products: cuBLAS / torch.bmm against the Triton GEMV")
    ax.set_ylim(0, 125)
    ax.legend(fontsize=8, ncol=4, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"plot: {path}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="Qwen3-30B-A3B,DeepSeek-V2-Lite,Llama-3.1-8B")
    p.add_argument("--tune", action="store_true", help="sweep and write this device's winners")
    p.add_argument(
        "--batched-only", action="store_true", help="only the per-head products (MLA's W_UK, W_UV)"
    )
    p.add_argument("--output", default=str(G.CONFIGS))
    p.add_argument("--plot", default=None, help="draw the run's table here (PNG)")
    p.add_argument("--plot-from", default=None, help="draw a saved run's printed table (its log) to --plot")
    args = p.parse_args()
    if args.plot_from:
        with open(args.plot_from) as f:
            plot(rows_from_log(f.read()), args.plot or args.plot_from.rsplit(".", 1)[0] + ".png")
        return
    device, dtype = torch.device("cuda", 0), torch.bfloat16
    ceil = measure_ceilings(device, dtype)
    dev = device_name()
    print(f"{dev}: copy {ceil['copy_gb_s']:.0f} GB/s", flush=True)
    tuned = G.tuned_configs()
    shapes = {
        s: m for m in args.models.split(",") for s in linear_shapes(m) if s[0] > 1 or not args.batched_only
    }
    output = Path(args.output)
    table = json.loads(output.read_text()) if args.tune and output.exists() else {}
    rows = []
    print(f"{'model':<18} {'H':>3} {'N':>6} {'K':>6} {'T':>2} {'MB':>6} {'roof us':>8} {'torch us':>9} {'share':>6}"
          f" {'GEMV us':>8} {'share':>6}  config")  # fmt: skip
    for (heads, n, k, transposed), model in shapes.items():
        key = G.config_key(n, k, dev, heads)
        for tokens, bucket in ((1, "1"), (4, "4")):
            entry = tuned.get(key, {}).get(bucket)
            cands = candidates(k) if args.tune else [entry] if entry else []
            r = time_shape(heads, n, k, transposed, tokens, dtype, device, cands)
            mb = heads * n * k * dtype.itemsize / 1e6
            roof = mb / ceil["copy_gb_s"] * 1e3
            gemv_txt = (
                f"{r['best_us']:8.2f} {roof / r['best_us']:6.1%}" if r["best"] else f"{'-':>8} {'-':>6}"
            )
            print(f"{model:<18} {heads:>3} {n:>6} {k:>6} {tokens:>2} {mb:6.1f} {roof:8.2f} {r['torch_us']:9.2f}"
                  f" {roof / r['torch_us']:6.1%} {gemv_txt}  {r['best'] or ''}", flush=True)  # fmt: skip
            rows.append({"model": model, "heads": heads, "n": n, "k": k, "tokens": tokens, "roof_us": roof,
                         "torch_us": r["torch_us"], "gemv_us": r["best_us"]})  # fmt: skip
            if not args.tune:
                continue
            table.get(key, {}).pop(bucket, None)  # an earlier tune's winner that no longer wins goes
            wins = r["best"] and r["best_us"] < 0.97 * r["torch_us"]
            if wins and G._config_ok(device, heads, n, k, transposed, dtype, False, **r["best"]):
                table.setdefault(key, {})[bucket] = r["best"]
            # written after every shape: a tune cut short by its caller's time limit keeps what it found
            output.write_text(
                json.dumps({key_: e for key_, e in table.items() if e}, indent=1, sort_keys=True)
            )
    if args.tune:
        print(f"wrote {sum(1 for e in table.values() if e)} shapes to {args.output}")
    if args.plot:
        plot(rows, args.plot)


if __name__ == "__main__":
    main()
