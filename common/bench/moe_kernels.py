"""The MoE layer alone on the GPU: the Triton kernels (common/models/fused_moe.py) against the torch
path, each beside its roofline (the routed experts' bytes over the copy bandwidth, or their FLOPs
over the matmul rate, both measured in this run), a small block-size sweep, and the bf16 closeness
of the kernels to a float64 reference. Writes the best block sizes as a fused_moe_configs.json entry.

    python -m disagg.common.bench.moe_kernels --output-dir $OUT        # Qwen3-30B-A3B's expert shape
    python -m disagg.common.bench.moe_kernels --fp8 --experts 256 --hidden 7168 --inter 256 \
        --batches 1,8,64,256,2048 --output-dir $OUT     # DeepSeek-V3's FP8 experts at tp 8 (ep 1)

--fp8: the experts in FP8 with 128x128 block scales (fused_moe.py's w8a16 GEMV / w8a8 grouped
paths); the roofline counts one byte a weight (plus the scales) and the device's FP8 matmul rate,
the closeness is to the float64 product of the dequantized weights, and the tuned entry is
written under the key `...,dtype=fp8_w8a8` (fused_moe.moe_config's FP8 lookup).

Timing: small batches replay a CUDA graph of `--layers` MoE layers (distinct weights, so the L2
holds none of the next layer's experts), as a decode step runs them; large ones run eagerly.
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import torch
from disagg.common.bench.offline import measure_ceilings
from disagg.common.models import fused_moe
from disagg.common.models.fp8 import quantize_weight_blocks
from disagg.common.models.moe_align import (
    ExpertScales,
    dequantize_experts,
    grouped_experts,
    grouped_mm_experts,
    moe_align_block_size,
)

FP8_BLOCK = (128, 128)  # DeepSeek-V3's weight_block_size
MAX_REL_ERR = 0.1  # a tuning candidate vs the float64 product (bf16 rounding ~3e-3; a wrong tile index ~1)


def make_layers(n: int, experts: int, hidden: int, inter: int, fp8: bool = False) -> list[tuple]:
    """n layers of (w13, w2, scales): bf16 weights and no scales, or FP8 blocks and their scales."""
    gen = torch.Generator(device="cuda").manual_seed(0)

    def rand(*shape):
        return (
            torch.randn(*shape, device="cuda", dtype=torch.bfloat16, generator=gen) / shape[-1] ** 0.5
        ).contiguous()

    def quantize(w):
        qs = [quantize_weight_blocks(w[e], FP8_BLOCK) for e in range(w.shape[0])]
        return torch.stack([q for q, _ in qs]), torch.stack([s for _, s in qs])

    layers = []
    for _ in range(n):
        w13, w2 = rand(experts, 2 * inter, hidden), rand(experts, hidden, inter)
        if not fp8:
            layers.append((w13, w2, None))
            continue
        (q13, s13), (q2, s2) = quantize(w13), quantize(w2)
        layers.append((q13, q2, ExpertScales(s13, s2, FP8_BLOCK)))
    return layers


def reference(x, layer, weights, ids, block: int) -> torch.Tensor:
    """The float64 product of the (dequantized) weights, of the routed experts only (all 256 of
    DeepSeek-V3's in float64 would be 56 GiB: the H200 ran out of memory)."""
    w13, w2, scales = layer
    used = ids.unique()
    local = torch.full((w13.shape[0],), -1, dtype=ids.dtype, device=ids.device)
    local[used] = torch.arange(len(used), dtype=ids.dtype, device=ids.device)
    w13, w2 = w13[used], w2[used]
    if scales is not None:
        w13 = dequantize_experts(w13, scales.w13[used], scales.block, torch.float64)
        w2 = dequantize_experts(w2, scales.w2[used], scales.block, torch.float64)
    return grouped_experts(x.double(), w13.double(), w2.double(), weights.double(), local[ids], block)


def routing(tokens: int, experts: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    probs = torch.softmax(torch.randn(tokens, experts, device="cuda"), dim=-1)
    weights, ids = probs.topk(k, dim=-1)
    return weights / weights.sum(-1, keepdim=True), ids


def time_layers(fn, layers, x, graph: bool, reps: int = 20) -> float:
    """Median seconds per layer of fn(x, w13, w2, scales) over all layers."""

    def run():
        for w13, w2, scales in layers:
            fn(x, w13, w2, scales)

    run()
    torch.cuda.synchronize()
    if graph:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            run()
        run = g.replay
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / len(layers))
    return sorted(times)[len(times) // 2]


def roofline(
    tokens: int, ids: torch.Tensor, hidden: int, inter: int, ceil: dict, fp8: bool = False
) -> tuple[float, int]:
    """The routed experts' bytes over the copy bandwidth or their FLOPs over the matmul rate (FP8:
    one byte a weight plus a float32 scale per 128x128 block, the FP8 matmul rate)."""
    touched = int(torch.unique(ids).numel())
    weight_bytes = 1 + 4 / (FP8_BLOCK[0] * FP8_BLOCK[1]) if fp8 else 2
    nbytes = touched * 3 * hidden * inter * weight_bytes + 2 * tokens * hidden * 2
    flops = 2 * ids.numel() * 3 * hidden * inter
    rate = ceil["fp8_matmul_tflops"] if fp8 else ceil["matmul_tflops"]
    return max(nbytes / (ceil["copy_gb_s"] * 1e9), flops / (rate * 1e12)), touched


def sweep(name, candidates, make_config, tokens, layers, k, ceil, graph) -> tuple[dict, list[dict]]:
    experts, hidden, inter = layers[0][1].shape
    x = torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16)
    weights, ids = routing(tokens, experts, k)
    roof, _ = roofline(tokens, ids, hidden, inter, ceil, fp8=layers[0][2] is not None)
    # each candidate's output against the float64 product once: a fast layout that computes the wrong
    # thing (a tile or split the kernel's indexing gets wrong) is dropped, not picked
    ref = reference(x, layers[0], weights, ids, 256 if tokens >= 256 else 16)
    rows = []
    for cand in candidates:
        config = make_config(cand)
        try:
            t = time_layers(
                lambda x, a, b, s, c=config: fused_moe.fused_experts(x, a, b, weights, ids, c, scales=s),
                layers,
                x,
                graph,
            )
            w13, w2, scales = layers[0]
            got = fused_moe.fused_experts(x, w13, w2, weights, ids, config, scales=scales).double()
        except Exception as e:  # noqa: BLE001 - a config the compiler rejects (shared memory) is skipped
            print(f"  {name} {cand}: {type(e).__name__}", flush=True)
            continue
        err = ((got - ref).norm() / ref.norm()).item()
        if not err < MAX_REL_ERR:  # (NaN too)
            print(f"  {name} {cand}: WRONG (rel err {err:.2e}), dropped", flush=True)
            continue
        rows.append(dict(path=name, tokens=tokens, config=cand, us=t * 1e6, of_roofline=roof / t))
    rows.sort(key=lambda r: r["us"])
    for r in rows[:3]:
        print(
            f"  {name} T={tokens}: {r['us']:.1f} us ({100 * r['of_roofline']:.0f}% of roofline) {r['config']}"
        )
    return rows[0]["config"], rows


def grouped_candidates(fp8: bool) -> tuple[list[dict], list[dict]]:
    """The grouped GEMM's tiles to try: for decode batches (16-row M tiles) and for prefill chunks."""
    # SPLIT_ACT: gate|up as one GEMM, silu * up in the down kernel's loads (one accumulator a tile)
    grouped_small = [
        dict(BLOCK_SIZE_M=16, BLOCK_SIZE_N=bn, BLOCK_SIZE_K=bk, num_warps=w, num_stages=s, SPLIT_ACT=sa)
        for bn, bk, w, s, sa in itertools.product((32, 64, 128), (64, 128, 256), (4,), (3, 4), (False, True))
    ]
    grouped_large = [
        dict(BLOCK_SIZE_M=bm, BLOCK_SIZE_N=bn, BLOCK_SIZE_K=bk, num_warps=w, num_stages=s, SPLIT_ACT=sa)
        for bm, bn, bk, w, s, sa in itertools.product(
            (64, 128), (64, 128), (64,), (4, 8), (3, 4), (False, True)
        )
    ] + [
        dict(BLOCK_SIZE_M=128, BLOCK_SIZE_N=bn, BLOCK_SIZE_K=128, num_warps=8, num_stages=s, SPLIT_ACT=True)
        for bn, s in itertools.product((128, 256), (2, 3))
    ]
    if fp8:  # FP8: fused_moe.fp8_config fixes BLOCK_K = 128 and SPLIT_ACT
        grouped_small = [c for c in grouped_small if c["BLOCK_SIZE_K"] == FP8_BLOCK[1] and c["SPLIT_ACT"]]
        grouped_large = [
            dict(
                BLOCK_SIZE_M=bm,
                BLOCK_SIZE_N=bn,
                BLOCK_SIZE_K=FP8_BLOCK[1],
                num_warps=w,
                num_stages=s,
                SPLIT_ACT=True,
            )
            for bm, bn, w, s in itertools.product((64, 128), (64, 128, 256), (4, 8), (2, 3, 4))
        ]
    return grouped_small, grouped_large


def grouped_steps(config: dict, log: list, plan, layers, k: int, ceil: dict, save) -> None:
    """For each (tokens, candidates) of `plan`, the fastest tile becomes config["grouped"][tokens]:
    decode batches (<= 64 tokens) timed in a CUDA graph, prefill sizes eagerly, as each runs."""
    for tokens, cands in plan:
        best, rows = sweep(
            "grouped", cands, lambda c: {**config, "gemv_max_pairs": 0, "grouped": {"1": c}}, tokens, layers, k,
            ceil, tokens <= 64,
        )  # fmt: skip
        config["grouped"][str(tokens)] = best
        log += rows
        save(config)


def tune_grouped(layers, k: int, ceil: dict, base: dict, sizes: list[int], save=lambda config: None):
    """Only the grouped GEMM's tiles, at each of `sizes` tokens: e.g. a model's prefill length where
    the nearest tuned size is far from it, or decode batches of up to 64 tokens (16-row tiles)."""
    config, log = json.loads(json.dumps(base)), []
    small, large = grouped_candidates(layers[0][2] is not None)
    grouped_steps(config, log, [(t, small if t <= 64 else large) for t in sizes], layers, k, ceil, save)
    return config, log


def tune(
    layers, k: int, ceil: dict, base: dict, gemv_only: bool = False, save=lambda config: None
) -> tuple[dict, list[dict]]:
    """Each path's block sizes in turn (`save(config)` after each step: a run cut short by its
    time limit still leaves the steps it finished)."""
    config, log = json.loads(json.dumps(base)), []
    fp8 = layers[0][2] is not None
    gemv = [
        dict(BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=s, num_warps=w)
        # (the checked-in best for Qwen3-30B-A3B, 16/256/8/4, sat at the sweep's smallest tile and largest split,
        # and streamed gate/up at ~67% of bandwidth: so narrower tiles, deeper splits, other warp counts)
        # (SPLIT_K 1-2: fewer, longer programs and no zeroed buffer or atomics: at one token DeepSeek-V2-Lite's 6
        # experts x 1408 rows still make 528 programs of 16 rows)
        # FP8: a gate/up K tile within one scale block (64 or 128 wide; the twelfth session's 256/512-only
        # sweep left FP8 none of these) ...
        for bn, bk, s, w in itertools.product(
            (8, 16, 32), (64, FP8_BLOCK[1]) if fp8 else (256, 512), (1, 2, 4, 8, 16), (2, 4, 8)
        )
        if s >= 4 or w >= 4
    ]
    if fp8:  # ... or (FP8_WIDE_K) tiles across blocks, each weight element scaled by its block's scale
        gemv += [
            dict(BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=s, num_warps=4, FP8_WIDE_K=True)
            for bn, bk, s in itertools.product((16, 32), (256, 512), (1, 2, 4, 8))
        ]

    def gemv_step(name: str, candidates: list[dict]) -> dict:
        """The fastest of `candidates` becomes the batch-1 GEMV layout (config["gemv"])."""
        best, rows = sweep(
            name,
            candidates,
            lambda c: {**config, "gemv_max_pairs": 1 << 30, "gemv": c},
            1,
            layers,
            k,
            ceil,
            True,
        )
        config["gemv"] = best
        log.extend(rows)
        save(config)
        return best

    best = gemv_step("gemv", gemv)
    # the down GEMV has one program per (token, N tile[, slot group]): at batch 1 its tile width and
    # DOWN_SPLIT set how many programs stream the experts' rows (16 rows: 128 programs for H=2048)
    best = gemv_step(
        "gemv-down",
        [
            {**best, "DOWN_BLOCK_N": bn, "DOWN_WARPS": w, "DOWN_SPLIT": s}
            for bn, w, s in itertools.product((4, 8, 16, 32), (2, 4, 8), (1, 2, 4, 8))
        ],
    )
    # then wider down tiles with the intermediate split over programs (DOWN_SPLIT_K): each program
    # re-reads a slot's activations (two float32 rows of the intermediate) for its rows of weights, so
    # 4-8-row tiles spend about as many bytes on activations as on weights; the best layout above stays
    # a candidate (DOWN_SPLIT_K 1)
    best = gemv_step(
        "gemv-down-ksplit",
        [best]
        + [
            {**best, "DOWN_BLOCK_N": bn, "DOWN_WARPS": w, "DOWN_SPLIT_K": ks, "DOWN_BLOCK_K": bk}
            for bn, w, ks, bk in itertools.product((16, 32, 64), (4, 8), (2, 4, 8), (128, 256))
        ],
    )
    # then its K tile: the default 512 for inter > 1024 (DeepSeek-V2-Lite's 1408: three tiles, the last
    # one 3/4 full), or one tile up to 1024; a power of 2
    inter = layers[0][1].shape[2]
    gemv_step(
        "gemv-down-k", [{**best, "DOWN_BLOCK_K": bk} for bk in (128, 256, 512, 1024, 2048) if bk < 2 * inter]
    )
    if gemv_only:  # the batch-1 layouts only (a few dozen candidates, not a hundred)
        return config, log
    grouped_small, grouped_large = grouped_candidates(fp8)
    # 16 and 32 tokens: the nearest tuned size picks a decode batch's tiles (grouped_config), and a
    # batch of 32 took the 1-token entry (moe_vs_hf's batch-32 steps ran slower than offline.py's 64)
    decode = [c for c in grouped_small if c["BLOCK_SIZE_N"] > 32 and c["BLOCK_SIZE_K"] > 64]  # fewer there
    plan = ((16, decode), (32, decode), (64, grouped_small), (2048, grouped_large))
    grouped_steps(config, log, plan, layers, k, ceil, save)
    return config, log


def time_align(ids: torch.Tensor, experts: int) -> tuple[float, float]:
    """Microseconds of the one-program Triton alignment and of the torch one (eager, block 64)."""
    out = []

    def triton_align(ids, experts, block):
        return fused_moe.align_blocks(ids, experts, block, max_triton_pairs=1 << 30)

    for fn in (triton_align, moe_align_block_size):
        fn(ids, experts, 64)
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(10):
            fn(ids, experts, 64)
        end.record()
        end.synchronize()
        out.append(start.elapsed_time(end) * 100)  # ms per 10 calls -> us per call
    return out[0], out[1]


def compare(layers, k: int, ceil: dict, config: dict, batches: list[int]) -> list[dict]:
    """Per batch: the Triton path (and its GEMV/grouped choice), the torch path, their rooflines."""
    experts, hidden, inter = layers[0][1].shape
    fp8 = layers[0][2] is not None
    rows = []
    for tokens in batches:
        x = torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16)
        weights, ids = routing(tokens, experts, k)
        roof, touched = roofline(tokens, ids, hidden, inter, ceil, fp8)
        graph = tokens <= 256
        row = dict(tokens=tokens, touched_experts=touched, roofline_us=roof * 1e6)
        for path, pairs in (("gemv", 1 << 30), ("grouped", 0)):
            c = {**config, "gemv_max_pairs": pairs}
            t = time_layers(
                lambda x, a, b, s, c=c, w=weights, i=ids: fused_moe.fused_experts(x, a, b, w, i, c, scales=s),
                layers,
                x,
                graph,
            )
            row[f"{path}_us"] = t * 1e6
        t = time_layers(
            lambda x, a, b, s, w=weights, i=ids, g=graph: grouped_experts(
                x, a, b, w.to(x.dtype), i, trim=not g, scales=s
            ),
            layers,
            x,
            graph,
        )
        row["torch_us"] = t * 1e6
        # torch._grouped_mm (bf16, Hopper): the prefill path from grouped_mm_min_tokens on
        row["grouped_mm_us"] = None
        if not fp8 and tokens >= 256 and fused_moe.grouped_mm_ok(x.device, x.dtype):
            t = time_layers(
                lambda x, a, b, s, w=weights, i=ids: grouped_mm_experts(x, a, b, w, i), layers, x, graph=False
            )
            row["grouped_mm_us"] = t * 1e6
        row["align_triton_us"], row["align_torch_us"] = time_align(ids, experts)
        ref = reference(x, layers[0], weights, ids, 256 if tokens >= 256 else 16)
        w13, w2, scales = layers[0]
        got = fused_moe.fused_experts(x, w13, w2, weights, ids, config, scales=scales).double()
        # bf16 experts: bf16 rounding; FP8: also the activations' FP8 rounding (the grouped path)
        row["rel_err_bf16"] = ((got - ref).norm() / ref.norm()).item()
        rows.append(row)
        best = min(t for t in (row["gemv_us"], row["grouped_us"], row["grouped_mm_us"]) if t is not None)
        mm = f"{row['grouped_mm_us']:8.1f}" if row["grouped_mm_us"] is not None else "       -"
        print(
            f"T={tokens:5} experts {touched:3}  roofline {row['roofline_us']:8.1f} us  gemv {row['gemv_us']:8.1f}  "
            f"grouped {row['grouped_us']:8.1f}  grouped_mm {mm}  torch {row['torch_us']:8.1f}  "
            f"best {100 * roof * 1e6 / best:5.1f}% "
            f"of roofline  rel err {row['rel_err_bf16']:.2e}  align triton {row['align_triton_us']:.0f} "
            f"torch {row['align_torch_us']:.0f} us",
            flush=True,
        )
    return rows


def plot(report: dict, path: Path) -> None:
    """Each path's µs per layer against the tokens of the batch, beside the roofline (log-log)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["rows"]
    tokens = [r["tokens"] for r in rows]
    fig, (time_ax, share_ax) = plt.subplots(1, 2, figsize=(11, 4))
    paths = [("roofline_us", "roofline", "k--"), ("gemv_us", "Triton GEMV", "o-"),
             ("grouped_us", "Triton grouped (+ alignment)", "s-"), ("grouped_mm_us", "torch _grouped_mm", "^-"),
             ("torch_us", "torch path", "x-")]  # fmt: skip
    for key, label, style in paths:
        pts = [(t, r[key]) for t, r in zip(tokens, rows, strict=True) if r.get(key)]
        if pts:
            time_ax.plot(*zip(*pts, strict=True), style, label=label)
    best = [min(r[k] for k in ("gemv_us", "grouped_us", "grouped_mm_us") if r.get(k)) for r in rows]
    share_ax.plot(tokens, [100 * r["roofline_us"] / b for r, b in zip(rows, best, strict=True)], "o-")
    ceil = report.get("ceilings", {})
    time_ax.set(xscale="log", yscale="log", xlabel="tokens in the batch", ylabel="µs per MoE layer",
                title="the MoE layer alone")  # fmt: skip
    share_ax.set(xscale="log", xlabel="tokens in the batch", ylabel="best path, % of roofline", ylim=(0, 105),
                 title=f"roofline: bytes at {ceil.get('copy_gb_s', 0):.0f} GB/s or FLOPs at "
                 f"{ceil.get('matmul_tflops', 0):.0f} TF/s")  # fmt: skip
    for ax in (time_ax, share_ax):
        ax.grid(alpha=0.3, which="both")
    time_ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def set_crossovers(config: dict, rows: list[dict], top_k: int) -> None:
    """The paths' thresholds from a run of batches: the GEMV up to the last batch of the run where it
    beats the grouped GEMM; torch's grouped GEMM from the first batch of the run (to the last) where
    it beats the Triton one."""
    gemv_max = 0
    for r in rows:
        if r["gemv_us"] >= r["grouped_us"]:
            break
        gemv_max = r["tokens"]
    config["gemv_max_pairs"] = gemv_max * top_k
    mm_min = None
    for r in reversed(rows):
        if r["grouped_mm_us"] is None or r["grouped_mm_us"] >= r["grouped_us"]:
            break
        mm_min = r["tokens"]
    config["grouped_mm_min_tokens"] = mm_min if mm_min is not None else 1 << 30


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experts", type=int, default=128)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--inter", type=int, default=768)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--batches", default="1,2,4,8,16,32,64,256,2048")
    p.add_argument("--no-tune", action="store_true")
    p.add_argument(
        "--tune-gemv-only", action="store_true", help="tune the batch-1 GEMV layouts, keep the grouped"
    )
    p.add_argument(
        "--tune-grouped-at",
        default=None,
        help="tune only the grouped tiles at these token counts (prefill: e.g. 2048,4096; decode: <= 64), keep the rest",
    )
    p.add_argument("--fp8", action="store_true", help="FP8 experts with 128x128 block scales (DeepSeek-V3's)")
    p.add_argument("--output-dir", default=".")
    p.add_argument("--plot-from", default=None, help="only draw moe_kernels.png from this moe_kernels.json")
    args = p.parse_args()
    out = Path(args.output_dir)
    if args.plot_from:
        plot(json.loads(Path(args.plot_from).read_text()), out / "moe_kernels.png")
        return
    ceil = measure_ceilings(torch.device("cuda"), torch.bfloat16)
    print(f"{torch.cuda.get_device_name()}: ceilings {ceil}", flush=True)
    layers = make_layers(args.layers, args.experts, args.hidden, args.inter, args.fp8)
    # this device's own entry (moe_config prefers it on this device; the plain key's were tuned on an H200)
    key = fused_moe.config_key(args.experts, args.inter, args.hidden, args.fp8, fused_moe.device_name())
    config = dict(fused_moe.moe_config(args.experts, args.inter, args.hidden, args.fp8))
    config["grouped_mm_min_tokens"] = 1 << 30  # the sweep and the gemv/grouped columns time Triton's kernels
    log = []

    def save(config: dict) -> None:
        """The checked-in table with this shape's entry replaced (gpu_runs.sh copies it over the repo's)."""
        table = json.loads(fused_moe._CONFIGS.read_text()) if fused_moe._CONFIGS.exists() else {}
        table[key] = dict(config, device=torch.cuda.get_device_name())
        (out / "fused_moe_configs.json").write_text(json.dumps(table, indent=2) + "\n")

    if args.tune_grouped_at:
        sizes = [int(t) for t in args.tune_grouped_at.split(",")]
        config, log = tune_grouped(layers, args.top_k, ceil, config, sizes, save)
    elif not args.no_tune:
        config, log = tune(layers, args.top_k, ceil, config, args.tune_gemv_only, save)
    rows = compare(layers, args.top_k, ceil, config, [int(b) for b in args.batches.split(",")])
    if len(rows) > 1:  # the crossovers need a run of batches (`--batches 1` keeps the entry's)
        set_crossovers(config, rows, args.top_k)
    config["device"] = torch.cuda.get_device_name()
    save(config)
    report = dict(ceilings=ceil, rows=rows, sweep=log)
    (out / "moe_kernels.json").write_text(json.dumps(report, indent=2))
    try:
        plot(report, out / "moe_kernels.png")
    except ImportError as e:
        print(f"no plot: {e}", flush=True)
    print(json.dumps({key: config}))


if __name__ == "__main__":
    main()
