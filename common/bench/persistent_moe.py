"""One token's post-attention norm and MoE block on the GPU: the engine's chain (FlashInfer's fused
add-RMSNorm, router GEMV, fused top-k, gate/up and down GEMVs: common/models/fused_moe.py, PDL as the
engine launches them) against the one persistent launch
(common/models/persistent_moe.py) at several grids and block sizes, each as a CUDA graph of `--layers`
blocks with distinct weights (L2 holds none between blocks), as a decode step runs them. Prints µs a
block, kernels a block, and each figure's share of the block's bytes at the copy rate measured in the
same process (the router's rows and the k + shared experts' gate/up and down rows).

    python -m disagg.common.bench.persistent_moe                       # Qwen3-30B-A3B and DeepSeek-V2-Lite
    python -m disagg.common.bench.persistent_moe --shapes qwen3-30b-a3b --programs 132,264 --layers 8
    python -m disagg.common.bench.persistent_moe --variants '[{"BLOCK_N": 64, "DOWN_N": 16}]' --programs 1
"""

from __future__ import annotations

import argparse
import functools
import json

import torch
from disagg.common.bench.offline import graph_us_per_layer, kernels_per_call, measure_ceilings
from disagg.common.models.fused_moe import fused_experts, fused_topk, moe_config, router_logits
from disagg.common.models.kernels import add_rms_norm
from disagg.common.models.persistent_moe import new_scratch, num_tasks, persistent_moe, reference

EPS = 1e-6  # the norm's epsilon (Qwen3-30B-A3B's rms_norm_eps)
# name: (routed experts, hidden, expert intermediate, top-k, renormalize, scaling, shared slots)
SHAPES = {
    "qwen3-30b-a3b": (128, 2048, 768, 8, True, 1.0, 0),
    # V2-Lite: its 2 shared experts' MLP (2 x 1408) fused as 2 more slots, as the engine runs it
    "deepseek-v2-lite": (64, 2048, 1408, 6, False, 1.0, 2),
}
# the persistent launch's block sizes tried (each with every grid of --programs)
VARIANTS = [
    {},
    {"BLOCK_N": 8, "DOWN_N": 4, "num_warps": 4},
    {"BLOCK_N": 32, "BLOCK_K": 256, "DOWN_N": 16},
    {"BLOCK_E": 16, "DOWN_K": 256, "num_warps": 4},
    {"dynamic": False},  # tasks pid, pid + P, ...: only at grids every program of which is resident
]


def make_layer(shape: tuple, gen: torch.Generator) -> dict:
    """One layer's token and weights (bf16, random). The router's rows make the logits a permutation of
    0.1-spaced values times x's scale (at x and at multiples of it): no two within bf16 rounding of each
    other, so every implementation routes alike and an error column measures the experts' sums."""
    num_experts, hidden, inter, _, _, _, shared = shape

    def rand(*size):
        return (torch.randn(*size, generator=gen, device="cuda") / size[-1] ** 0.5).bfloat16()

    x = rand(1, hidden) * hidden**0.5
    x32 = x.float()[0]
    spaced = (torch.randperm(num_experts, generator=gen, device="cuda") - num_experts / 2).float() * 0.1
    return dict(
        x=x,  # the attention's output (the norm's input; FlashInfer's fused norm overwrites it)
        residual=torch.zeros_like(x),  # NOTE: zero residual and unit weights: the normed input keeps x's
        norm_w=torch.ones(hidden, device="cuda", dtype=torch.bfloat16),  # direction, its logits apart
        router_w=(spaced[:, None] * x32[None, :] / x32.dot(x32)).bfloat16(),
        w13=rand(num_experts + shared, 2 * inter, hidden),
        w2=rand(num_experts + shared, hidden, inter),
    )


def chain(shape: tuple, layer: dict) -> torch.Tensor:
    """The decoder layer's post-attention add-RMSNorm (FlashInfer's, in place), then SparseMoE /
    DeepseekMoE's decode path at one token: three Triton launches and the GEMVs'."""
    num_experts, hidden, inter, top_k, renormalize, scaling, shared = shape
    x, _ = add_rms_norm(layer["x"], layer["residual"], layer["norm_w"], EPS)
    logits = router_logits(x, layer["router_w"])
    weights, ids = fused_topk(logits, top_k, renormalize, scaling, shared)
    config = moe_config(num_experts, inter, hidden)
    return fused_experts(x, layer["w13"], layer["w2"], weights, ids, config, foreign=False)


def persistent(
    shape: tuple, programs: int, blocks: dict, scratch: dict, layer: dict, trace: torch.Tensor | None = None
) -> torch.Tensor:
    """The norm and the block as one launch, as the engine runs it; `blocks` may hold "dynamic": False
    (static task assignment)."""
    _, _, _, top_k, renormalize, scaling, shared = shape
    sizes = {k: v for k, v in blocks.items() if k != "dynamic"}
    return persistent_moe(
        layer["x"], layer["router_w"], layer["w13"], layer["w2"], top_k, renormalize, scaling, shared,
        programs=programs, dynamic=blocks.get("dynamic", True), blocks=sizes, scratch=scratch, trace=trace,
        residual=layer["residual"], norm_weight=layer["norm_w"], eps=EPS,
    )  # fmt: skip


def block_bytes(shape: tuple) -> int:
    """The bytes one token's norm and block must read: the norm's weight, the router's rows, each
    slot's gate/up and down rows (bf16)."""
    num_experts, hidden, inter, top_k, _, _, shared = shape
    return 2 * (hidden + num_experts * hidden + (top_k + shared) * 3 * inter * hidden)


def check(shape: tuple, layer: dict, fn) -> float:
    """The largest difference from the float32 reference, over its largest value."""
    _, _, _, top_k, renormalize, scaling, shared = shape
    want, _ = reference(
        layer["x"], layer["router_w"], layer["w13"], layer["w2"], top_k, renormalize, scaling, shared,
        residual=layer["residual"], norm_weight=layer["norm_w"], eps=EPS,
    )  # fmt: skip
    got = fn(layer)
    return ((got.float() - want.float()).abs().max() / want.float().abs().max()).item()


def trace_report(shape: tuple, layer: dict, programs: int, blocks: dict) -> None:
    """Where one launch's time goes: each stage's tasks from the launch's first claim (µs): the first
    claimed, the last whose wait ended, the last done; the median task's work and wait."""
    num_experts, hidden, inter, top_k, _, _, shared = shape
    stages = num_tasks(num_experts, hidden, inter, top_k + shared, blocks)
    trace = torch.zeros(sum(stages), 4, dtype=torch.int64, device="cuda")
    scratch = new_scratch(num_experts, top_k + shared, inter, torch.device("cuda"))
    persistent(shape, programs, blocks, scratch, layer, trace)  # the traced variant built
    persistent(shape, programs, blocks, scratch, layer, trace)
    torch.cuda.synchronize()
    t = (trace[:, :3] - trace[:, 0].min()).float() / 1e3  # µs from the first claim
    print(f"  trace ({programs} programs, {blocks or 'default'}): stage | tasks | first claim | last wait over "
          "| last done | median work | median wait (µs)")  # fmt: skip
    start = 0
    for label, n in zip(("router", "gate/up", "down"), stages, strict=True):
        rows = t[start : start + n]
        start += n
        work, wait = (rows[:, 2] - rows[:, 1]).median(), (rows[:, 1] - rows[:, 0]).median()
        print(f"  {label} | {n} | {rows[:, 0].min():.2f} | {rows[:, 1].max():.2f} | {rows[:, 2].max():.2f} "
              f"| {work:.2f} | {wait:.2f}")  # fmt: skip


def run_shape(name: str, args, copy_gb_s: float, gen: torch.Generator) -> None:
    shape = SHAPES[name]
    layers = [make_layer(shape, gen) for _ in range(args.layers)]
    floor_us = block_bytes(shape) / copy_gb_s / 1e3
    print(f"\n{name}: {block_bytes(shape) / 1e6:.1f} MB a block, {floor_us:.2f} µs at the copy rate")
    print("variant | programs | µs a block | kernels | share of the bytes' time | error vs float32")
    fns = [("chain (engine)", 0, None, functools.partial(chain, shape))]
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for blocks in args.variants:
        grids = args.grids
        if not blocks.get("dynamic", True):  # static tasks: a program not resident would hold a task others
            grids = [sms, -1]  # wait on; -1: as many programs as the GPU holds at once (resident_programs)
        for programs in grids:
            scratch = new_scratch(shape[0], shape[3] + shape[6], shape[2], torch.device("cuda"))
            fns.append((f"persistent {blocks or 'default'}", programs, blocks,
                        functools.partial(persistent, shape, programs, blocks, scratch)))  # fmt: skip
    fastest = {}  # the fastest dynamic variant at each grid: the one traced there
    for label, programs, blocks, fn in fns:
        grid = {0: "-", -1: "resident"}.get(programs, programs)
        try:  # NOTE: one variant's failure (a launch that does not build, say) is a row, not the end
            err = check(shape, layers[0], fn)
            us = graph_us_per_layer(fn, layers)
            kernels = kernels_per_call(functools.partial(fn, layers[0]))
        except Exception as e:  # noqa: BLE001 - reported in the table
            print(f"{label} | {grid} | failed: {type(e).__name__}: {str(e)[:200]}")
            continue
        print(f"{label} | {grid} | {us:.2f} | {kernels} | {100 * floor_us / us:.1f}% | {err:.1e}")
        if blocks is not None and blocks.get("dynamic", True) and us < fastest.get(programs, (1e9,))[0]:
            fastest[programs] = (us, blocks)
    for programs, (_, blocks) in fastest.items():
        try:
            trace_report(shape, layers[0], programs, blocks)
        except Exception as e:  # noqa: BLE001 - reported
            print(f"  trace ({programs} programs) failed: {type(e).__name__}: {str(e)[:200]}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shapes", default=",".join(SHAPES), help=f"of {', '.join(SHAPES)}")
    parser.add_argument(
        "--programs", default="1,2,4", help="persistent grids (0: the SM count; n < 8: n x SMs)"
    )
    parser.add_argument("--layers", type=int, default=8, help="blocks a graph (distinct weights)")
    parser.add_argument(
        "--variants", type=json.loads, default=VARIANTS,
        help='the block sizes tried, a JSON list (e.g. \'[{"BLOCK_N": 64, "DOWN_N": 16}]\'; default: VARIANTS)',
    )  # fmt: skip
    args = parser.parse_args()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    # the grids: 0 the SM count, n < 8 that many programs an SM, else n programs
    args.grids = [sms if p == 0 else p * sms if p < 8 else p for p in map(int, args.programs.split(","))]
    ceilings = measure_ceilings(torch.device("cuda"), torch.bfloat16)
    print(f"{torch.cuda.get_device_name()} ({sms} SMs); copy {ceilings['copy_gb_s']:.0f} GB/s")
    gen = torch.Generator(device="cuda").manual_seed(0)
    for name in args.shapes.split(","):
        run_shape(name, args, ceilings["copy_gb_s"], gen)


if __name__ == "__main__":
    main()
