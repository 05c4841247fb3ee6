"""The FP8 block-scaled GEMM (common/models/fp8_kernels.py) on DeepSeek-V3's linear shapes, beside the
device's ceilings measured in the same run: torch._scaled_mm's FP8 rate (per-tensor scales, cuBLAS)
and the bf16 matmul rate, both on a large square and on the same shape.

    python -m disagg.common.bench.fp8_gemm                      # V3 shapes at tp 1, M = 1, 64, 4096
    python -m disagg.common.bench.fp8_gemm --tp 8 --tokens 1,128 --sweep   # per-rank shapes, tile sweep

Per row: our kernel's GPU time (activation quantization included, and the GEMM alone; replayed from
a CUDA graph, so no host launch cost), its TFLOP/s, its weight read in GB/s (the decode ceiling is
the copy bandwidth), the error against the bf16 product of the dequantized operands, and the two
reference rates at that shape.
"""

from __future__ import annotations

import argparse
import itertools
import json

import torch
from disagg.common.models import fp8

# DeepSeek-V3's linear layers, (name, N, K) at tp 1; column-parallel ones split N, row-parallel K
V3_SHAPES = [
    ("q_a_proj", 1536, 7168, None),
    ("q_b_proj", 24576, 1536, "n"),
    ("kv_a_proj_with_mqa", 576, 7168, None),
    ("o_proj", 7168, 16384, "k"),
    ("mlp.gate_up_proj", 36864, 7168, "n"),
    ("mlp.down_proj", 7168, 18432, "k"),
    ("shared_experts.gate_up_proj", 4096, 7168, "n"),
    ("shared_experts.down_proj", 7168, 2048, "k"),
]


def bench_ms(fn, repeat: int = 20, calls: int = 10) -> float:
    """Median GPU milliseconds of one fn(): `calls` calls replayed from a CUDA graph (no host launch
    cost, as in a captured decode step), timed with CUDA events, after a warm-up."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / calls)
    return sorted(times)[len(times) // 2]


def eager_ms(fn, repeat: int = 20) -> float:
    """Median milliseconds of fn() launched eagerly (long kernels: the launch cost is noise)."""
    fn()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def weight_copies(nbytes: int) -> int:
    """How many copies of a weight the timed calls rotate through, so that a small weight is read
    from HBM each call and not from the L2 cache (50 MB on an H200)."""
    return max(1, min(10, -(-(128 << 20) // nbytes)))


def rotating(fn, weights: list):
    """fn(weight) over the copies in turn (each captured call reads the next copy)."""
    turn = itertools.cycle(weights)
    return lambda: fn(next(turn))


def scaled_mm_fp8(m: int, n: int, k: int):
    """torch._scaled_mm with per-tensor scales (cuBLAS FP8): the device's FP8 GEMM rate at this shape."""
    a = torch.randn(m, k, device="cuda").to(torch.float8_e4m3fn)
    bs = [torch.randn(n, k, device="cuda").to(torch.float8_e4m3fn) for _ in range(weight_copies(n * k))]
    one = torch.ones((), device="cuda")
    return rotating(
        lambda b: torch._scaled_mm(a, b.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16), bs
    )


def bf16_mm(m: int, n: int, k: int):
    a = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    bs = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(weight_copies(2 * n * k))]
    return rotating(lambda b: torch.nn.functional.linear(a, b), bs)


def ceilings(size: int = 8192) -> dict:
    tf = 2 * size**3 / 1e9
    n = 1 << 30
    src = torch.empty(n, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return dict(
        fp8_scaled_mm_tflops=tf / bench_ms(scaled_mm_fp8(size, size, size), 20),
        bf16_matmul_tflops=tf / bench_ms(bf16_mm(size, size, size), 20),
        copy_gb_s=2 * n / 1e6 / eager_ms(lambda: dst.copy_(src)),
    )


def one_shape(name: str, m: int, n: int, k: int, sweep: bool) -> dict:
    from disagg.common.models.fp8_kernels import (
        block_fp8_matmul,
        matmul_config,
        quantize_activation_groups_triton,
    )

    block = (128, 128)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    wq, ws = fp8.quantize_weight_blocks(torch.randn(n, k, device="cuda") * 0.02, block)
    xq, xs = quantize_activation_groups_triton(x, 128)
    deq_x = (xq.float() * xs.repeat_interleave(128, 1)[:, :k]).to(torch.bfloat16)
    deq_w = fp8.dequantize_weight_blocks(wq, ws, block, torch.bfloat16)
    ref = torch.nn.functional.linear(deq_x, deq_w).float()
    out = block_fp8_matmul(xq, xs, wq, ws, block, torch.bfloat16).float()
    err = ((out - ref).norm() / ref.norm()).item()
    weights = [(wq, ws)] + [(wq.clone(), ws.clone()) for _ in range(weight_copies(n * k) - 1)]
    gemm_ms = bench_ms(rotating(lambda w: block_fp8_matmul(xq, xs, *w, block, torch.bfloat16), weights))
    total_ms = bench_ms(
        rotating(
            lambda w: block_fp8_matmul(*quantize_activation_groups_triton(x, 128), *w, block, torch.bfloat16),
            weights,
        )
    )
    flop = 2 * m * n * k
    row = dict(name=name, m=m, n=n, k=k, ms=total_ms, gemm_ms=gemm_ms, tflops=flop / total_ms / 1e9,
               weight_gb_s=n * k / gemm_ms / 1e6, rel_err=err, config=matmul_config(m, n, k),
               scaled_mm_tflops=flop / bench_ms(scaled_mm_fp8(m, n, k)) / 1e9,
               bf16_tflops=flop / bench_ms(bf16_mm(m, n, k)) / 1e9)  # fmt: skip
    if sweep:
        row["sweep"] = sweep_configs(xq, xs, weights, block)
    return row


def sweep_configs(xq, xs, weights, block) -> list[tuple[dict, float]]:
    """Milliseconds of other tile configurations (the three fastest)."""
    from disagg.common.models.fp8_kernels import block_fp8_matmul

    results = []
    m = xq.shape[0]
    for bm, bn, warps, stages, split in itertools.product(
        (16, 32, 64, 128), (32, 64, 128, 256), (4, 8), (3, 4), (1, 2, 4, 8)
    ):
        if bm > max(16, 2 * m) or (m > 64 and (split > 1 or bm < 64)) or (warps == 8 and bm * bn < 128 * 64):
            continue
        cfg = dict(BLOCK_M=bm, BLOCK_N=bn, GROUP_M=8, num_warps=warps, num_stages=stages, SPLIT_K=split)
        try:
            ms = bench_ms(
                rotating(
                    lambda w, cfg=cfg: block_fp8_matmul(xq, xs, *w, block, torch.bfloat16, cfg), weights
                ),
                10,
            )
        except Exception as e:  # noqa: BLE001 - a config that does not fit the shared memory
            ms = float("inf")
            cfg["error"] = type(e).__name__
        results.append((cfg, ms))
    return sorted(results, key=lambda r: r[1])[:3]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tp", type=int, default=1, help="per-rank shapes of this TP size")
    p.add_argument("--tokens", default="1,64,4096", help="GEMM rows (tokens of the batch)")
    p.add_argument("--sweep", action="store_true", help="also time other tile configurations")
    p.add_argument("--output-json", default=None)
    args = p.parse_args()
    torch.manual_seed(0)
    ceil = ceilings()
    print(f"{torch.cuda.get_device_name()}: ceilings (this run) FP8 _scaled_mm {ceil['fp8_scaled_mm_tflops']:.0f} "
          f"TFLOP/s, bf16 matmul {ceil['bf16_matmul_tflops']:.0f} TFLOP/s (8192^3), copy {ceil['copy_gb_s']:.0f} GB/s")  # fmt: skip
    print(f"{'layer':28} {'M':>5} {'N':>6} {'K':>6} {'ms':>8} {'gemm ms':>8} {'TFLOP/s':>8} {'of fp8':>7} "
          f"{'w GB/s':>7} {'of copy':>7} {'_scaled_mm':>10} {'bf16':>7} {'rel err':>8}")  # fmt: skip
    rows = []
    for m in (int(t) for t in args.tokens.split(",")):
        for name, n, k, split in V3_SHAPES:
            n_r, k_r = (n // args.tp if split == "n" else n), (k // args.tp if split == "k" else k)
            r = one_shape(name, m, n_r, k_r, args.sweep)
            rows.append(r)
            print(f"{name:28} {m:>5} {n_r:>6} {k_r:>6} {r['ms']:>8.3f} {r['gemm_ms']:>8.3f} {r['tflops']:>8.1f} "
                  f"{r['tflops'] / ceil['fp8_scaled_mm_tflops']:>7.1%} {r['weight_gb_s']:>7.0f} "
                  f"{r['weight_gb_s'] / ceil['copy_gb_s']:>7.1%} {r['scaled_mm_tflops']:>10.1f} {r['bf16_tflops']:>7.1f} "
                  f"{r['rel_err']:>8.1e}", flush=True)  # fmt: skip
            if args.sweep:
                print("    best tiles: " + "; ".join(f"{c} {ms:.3f} ms" for c, ms in r["sweep"]), flush=True)
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(dict(ceilings=ceil, rows=rows, args=vars(args)), f, indent=2, default=str)


if __name__ == "__main__":
    main()
