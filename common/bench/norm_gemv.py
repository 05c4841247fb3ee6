"""A projection's input norm, or a dense MLP's activation, folded into its GEMV on the GPU at decode
sizes. Unfused as decoder.DecoderLayer and MLP run them: FlashInfer's fused add + RMSNorm then
F.linear (cuBLAS; at one token a split-K GEMV and its reduce), or FlashInfer's silu_and_mul then
down_proj's F.linear; fused: norm_gemv (common/models/norm_gemv.py: one Triton launch; at a MoE
router's or DeepSeekMoE's shared gate_up shape also writing the normalised input its experts read)
or silu_mul_gemv (common/models/act_gemv.py). Each as a CUDA graph of `--layers` layers with their
own weights (so L2 holds none of them), replayed as a decode step runs them. Prints µs per layer,
kernels per layer (torch profiler), the bytes roofline at the copy rate measured in the same
process, and the fastest of a handful of launch layouts per shape and batch.

    python -m disagg.common.bench.norm_gemv     # 8B qkv, gate_up, down; Qwen3-30B-A3B qkv, router; V2-Lite's
                                                #   q | kv_a, shared gate_up, dense down
    python -m disagg.common.bench.norm_gemv --tokens 1,8 --layers 32 --output-json norm_gemv.json
"""

from __future__ import annotations

import argparse
import functools
import json

import torch
import torch.nn.functional as F
from disagg.common.bench.offline import graph_us_per_layer, kernels_per_call, measure_ceilings
from disagg.common.models.act_gemv import silu_mul_gemv, silu_mul_gemv_reference
from disagg.common.models.fused_rope_kv import close_enough
from disagg.common.models.kernels import add_rms_norm, check_fused_kernels, silu_and_mul
from disagg.common.models.norm_gemv import launch_shape, norm_gemv, norm_gemv_reference

# name: (K, N, kind): the GEMV's input and output widths at TP 1; kind "norm": norm_gemv, "normed":
# norm_gemv returning the normalised input for the experts (a MoE router's, DeepSeekMoE's shared experts'
# gate_up), "down": silu_mul_gemv (K: the intermediate size)
SHAPES = {
    "llama-8b-qkv": (4096, 6144, "norm"),
    "llama-8b-gate_up": (4096, 28672, "norm"),
    "qwen3-30b-a3b-qkv": (2048, 5120, "norm"),
    "v2-lite-qkv_a": (2048, 3648, "norm"),  # DeepSeek-V2-Lite's MLA q_proj | kv_a_proj_with_mqa: 3072 + 576
    "v2-lite-shared-gate_up": (2048, 5632, "normed"),  # its two shared experts' gate_up (2 x 2816)
    "qwen3-30b-a3b-router": (2048, 128, "normed"),
    "llama-8b-down": (14336, 4096, "down"),
    "v2-lite-dense-down": (10944, 2048, "down"),  # DeepSeek-V2-Lite's dense first layer
}
# (BLOCK_N, BLOCK_K, warps, tensor-core dot): FMA reductions and dots of a few widths; the last five:
# narrow FMA tiles, more programs for a router's few rows
CANDIDATES = [
    (16, 256, 4, False), (16, 128, 4, False), (32, 128, 4, False), (32, 256, 8, False), (64, 128, 8, False),
    (16, 128, 4, True), (32, 128, 4, True), (64, 128, 4, True), (64, 64, 4, True), (64, 256, 8, True),
    (4, 256, 4, False), (4, 512, 4, False), (4, 256, 2, False), (8, 256, 4, False), (8, 128, 2, False),
]  # fmt: skip
EPS = 1e-6


def make_layers(tokens: int, k: int, n: int, count: int, gen, kind: str) -> list[dict]:
    """Each layer's own inputs and weights (bf16): activations, residual and norm weight, or a gate_up
    output [T, 2K]; the projection's weight [N, K]."""

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, device="cuda") * scale).bfloat16()

    def layer() -> dict:
        if kind == "down":
            return dict(kind=kind, gate_up=randn(tokens, 2 * k, scale=2.0), weight=randn(n, k, scale=k**-0.5))
        return dict(kind=kind, x=randn(tokens, k), residual=randn(tokens, k), norm=randn(k),
                    weight=randn(n, k, scale=k**-0.5))  # fmt: skip

    return [layer() for _ in range(count)]


def unfused(layer: dict) -> torch.Tensor:
    """decoder's unfused steps: FlashInfer's silu_and_mul then the linear; or FlashInfer's fused add
    + RMSNorm (in place; its output is the normalised input a MoE's experts read), then the linear."""
    if layer["kind"] == "down":
        return F.linear(silu_and_mul(layer["gate_up"]), layer["weight"])
    x, _ = add_rms_norm(layer["x"], layer["residual"], layer["norm"], EPS)
    return F.linear(x, layer["weight"])


def fused(layer: dict, launch=None) -> tuple[torch.Tensor, ...]:
    if layer["kind"] == "down":
        return (silu_mul_gemv(layer["gate_up"], layer["weight"], launch=launch),)
    args = (layer["x"], layer["residual"], layer["norm"], EPS, layer["weight"])
    return norm_gemv(*args, launch=launch, return_normed=layer["kind"] == "normed")


def reference(layer: dict) -> tuple[torch.Tensor, ...]:
    """The torch path's outputs (on copies: the unfused path works in place)."""
    if layer["kind"] == "down":
        return (silu_mul_gemv_reference(layer["gate_up"], layer["weight"]),)
    args = (layer["x"].clone(), layer["residual"].clone(), layer["norm"], EPS, layer["weight"])
    return norm_gemv_reference(*args, return_normed=layer["kind"] == "normed")


def bytes_moved(k: int, n: int, tokens: int, kind: str) -> int:
    """The launch's bytes in bf16: weights (and norm), inputs, outputs."""
    if kind == "down":
        return 2 * (n * k + tokens * 2 * k + tokens * n)
    # weights, norm, x + residual in, out + h (+ the normalised input)
    return 2 * (n * k + k + 2 * tokens * k + tokens * (n + k) + tokens * k * (kind == "normed"))


def agrees(layer: dict, launch) -> bool:
    """The layout's outputs against the torch reference's."""
    got = fused(layer, launch)
    return all(close_enough(a, b) for a, b in zip(got, reference(layer), strict=True))


def sweep(layers: list[dict], tokens: int) -> list[dict]:
    """Each candidate layout that fits the batch's registers and agrees with the reference, timed."""
    rows = []
    for launch in CANDIDATES:
        block_n, block_k, _, dot = launch
        if not dot and block_n * block_k * tokens > 16384:  # FMA products past ~128 registers a thread
            continue
        try:
            ok = agrees(layers[0], launch)
            us = graph_us_per_layer(lambda layer, launch=launch: fused(layer, launch), layers) if ok else None
        except Exception as e:  # noqa: BLE001 - a layout this device cannot build: reported, skipped
            print(f"    {launch}: {type(e).__name__}: {str(e)[:160]}")
            continue
        rows.append(dict(launch=list(launch), agrees=ok, us=us))
    return rows


def bench_shape(name: str, k: int, n: int, tokens: int, args, copy_gb_s: float, gen) -> dict:
    kind = SHAPES[name][2]
    layers = make_layers(tokens, k, n, args.layers, gen, kind)
    nbytes = bytes_moved(k, n, tokens, kind)
    row = dict(shape=name, k=k, n=n, tokens=tokens, roofline_us=nbytes / (copy_gb_s * 1e3))
    for label, fn in (("unfused", unfused), ("fused", fused)):
        row[f"{label}_us"] = graph_us_per_layer(fn, layers)
        row[f"{label}_kernels"] = kernels_per_call(functools.partial(fn, layers[0]))
    row["default_launch"] = list(launch_shape(tokens, n, k))
    row["agrees"] = agrees(layers[0], None)
    if args.sweep:
        row["sweep"] = sweep(layers, tokens)
        timed = [r for r in row["sweep"] if r["us"] is not None]
        best = min(timed, key=lambda r: r["us"], default=None)
        row["best_launch"], row["best_us"] = (best["launch"], best["us"]) if best else (None, None)
    del layers
    torch.cuda.empty_cache()
    return row


def print_row(row: dict) -> None:
    best = f"{row['best_us']:>8.2f} {tuple(row['best_launch'])}" if row.get("best_us") else ""
    print(
        f"{row['shape']:<24} {row['tokens']:>3} {row['roofline_us']:>8.2f} "
        f"{row['unfused_us']:>8.2f} ({row['unfused_kernels']}) {row['fused_us']:>8.2f} ({row['fused_kernels']})"
        f" {'ok' if row['agrees'] else 'DIFFERS':>7}  {best}",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shapes", default=",".join(SHAPES), help=f"of {', '.join(SHAPES)}")
    parser.add_argument("--tokens", default="1,2,4,8", help="decode batch sizes (tokens)")
    parser.add_argument("--layers", type=int, default=32, help="layers a graph replays (distinct weights)")
    parser.add_argument("--no-sweep", dest="sweep", action="store_false", help="the default layout only")
    parser.add_argument("--output-json", default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("norm_gemv bench: needs a CUDA GPU (none visible here), nothing measured")
    ceil = measure_ceilings(torch.device("cuda"), torch.bfloat16)
    flashinfer = check_fused_kernels(torch.device("cuda"), torch.bfloat16)
    print(
        f"{torch.cuda.get_device_name()}: copy {ceil['copy_gb_s']:.0f} GB/s; FlashInfer norm, silu_and_mul: {flashinfer}"
    )
    print(
        f"{'shape':<24} {'T':>3} {'roof us':>8} {'unfused us (kernels)':>20} {'fused us (kernels)':>22}"
        f" {'check':>7}  best of the sweep (BLOCK_N, BLOCK_K, warps, dot)"
    )
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for name in args.shapes.split(","):
        k, n, _ = SHAPES[name]
        for tokens in (int(t) for t in args.tokens.split(",")):
            rows.append(bench_shape(name, k, n, tokens, args, ceil["copy_gb_s"], gen))
            print_row(rows[-1])
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), ceilings=ceil, layers=args.layers, rows=rows), f,
                      indent=2)  # fmt: skip
        print(f"wrote {args.output_json}")


if __name__ == "__main__":
    main()
