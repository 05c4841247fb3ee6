"""Decode attention kernels on the GPU, one layer as the engine's CUDA graphs run it: FlashInfer's
(GQA: its paged decode wrapper; MLA: each family it offers here, FA3 and FA2 on Hopper) against the
Triton split-KV kernels (common/models/decode_attention.py), beside the bytes roofline (every K/V or
latent of the batch read once, at the copy rate measured in the same process).

    python -m disagg.common.bench.decode_attention --batches 1,8,64 --ctx 1024
    python -m disagg.common.bench.decode_attention --mla v2lite --batches 1,8 --sweep-triton  # ~3 min
    python -m disagg.common.bench.decode_attention --mla v2lite,v3 --batches 1,2,4,8 --sweep-triton --tune

--tune: at the engine's chunk count (its graphs size it for the model's longest context), times
every launch of the MLA kernel (tokens an iteration x warps x stages) a batch bucket at several
context lengths (--tune-lengths) and writes the one fastest on average against the default launch
that matches the torch reference to common/models/decode_attention_configs.json
(and --output-dir), keyed by this device: what the engine launches (decode_attention.mla_launch).

Shapes: GQA 32 q / 4 kv heads (Qwen3-30B-A3B) and 32 / 8 (Llama-3.1-8B), head dim 128; MLA 16 heads
(DeepSeek-V2-Lite; V3 at TP 8) and 128 (V3 at TP 1), latent 512 + rope 64. Prints µs per layer per
kernel and the largest difference from the first kernel's output (same inputs).
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import torch
from disagg.common.bench.offline import measure_ceilings
from disagg.common.engine.attention_flashinfer import (
    flashinfer_mla_api,
    mla_metadata,
    paged_kv_layout,
    plan_mla,
)
from disagg.common.models import decode_attention as triton_attn

RANK, ROPE, HEAD_DIM = 512, 64, 128
GQA_SHAPES = {"qwen3": (32, 4), "llama8b": (32, 8)}
MLA_HEADS = {"v2lite": 16, "v3": 128}


def graph_time(run, reps: int = 50) -> tuple[float, torch.Tensor]:
    """(µs per run, output) of `run` in a captured CUDA graph of `reps` runs."""
    out = run()  # builds / autotunes outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            out = run()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / (5 * reps), out.float()


def tables_for(batch: int, ctx: int, page_size: int, dev) -> tuple[list[list[int]], torch.Tensor]:
    """Each request's pages (shuffled, as a long-running pool hands them out) as lists and as the
    Triton kernels' [batch, pages] int32 table."""
    n_pages = (ctx + page_size - 1) // page_size
    order = torch.randperm(batch * n_pages, generator=torch.Generator().manual_seed(1))
    table = order.view(batch, n_pages).to(torch.int32)
    return table.tolist(), table.to(dev)


def gqa_kernels(hq: int, hkv: int, batch: int, ctx: int, page_size: int, kernels: list[str]) -> dict:
    import flashinfer

    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    n_pages = (ctx + page_size - 1) // page_size
    kv = torch.randn(batch * n_pages, 2, page_size, hkv, HEAD_DIM, generator=g, device=dev).bfloat16()
    q = torch.randn(batch, hq, HEAD_DIM, generator=g, device=dev).bfloat16()
    tables, table = tables_for(batch, ctx, page_size, dev)
    kv_lens = torch.full((batch,), ctx, dtype=torch.int32, device=dev)
    results = {}
    for name in kernels:
        if name == "flashinfer":
            indptr, indices, last = paged_kv_layout([ctx] * batch, tables, page_size, dev)
            bufs = dict(
                paged_kv_indptr_buffer=torch.zeros(batch + 1, dtype=torch.int32, device=dev),
                paged_kv_indices_buffer=torch.zeros(batch * n_pages, dtype=torch.int32, device=dev),
                paged_kv_last_page_len_buffer=torch.zeros(batch, dtype=torch.int32, device=dev),
            )
            workspace = torch.empty(128 << 20, dtype=torch.uint8, device=dev)
            wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
                workspace, "NHD", use_cuda_graph=True, use_tensor_cores=hq // hkv >= 4, **bufs
            )
            wrapper.plan(indptr, indices, last, hq, hkv, HEAD_DIM, page_size, q_data_type=torch.bfloat16)
            results[name] = graph_time(lambda w=wrapper: w.run(q, kv))
        elif name == "triton":
            splits = triton_attn.model_splits(batch, hq, ctx, hkv)
            results[name] = graph_time(
                lambda s=splits: triton_attn.gqa_decode(q, kv, table, kv_lens, HEAD_DIM**-0.5, s)
            )
    nbytes = 2 * (batch * ctx * 2 * hkv * HEAD_DIM + 2 * batch * hq * HEAD_DIM)
    return dict(nbytes=nbytes, results=results)


def mla_inputs(heads: int, batch: int, ctx: int, page_size: int) -> tuple:
    """(pages, q_nope, q_pe, page tables as lists, as a tensor, kv_lens, scale) of a batch at `ctx`."""
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    n_pages = (ctx + page_size - 1) // page_size
    pages = torch.randn(batch * n_pages, page_size, RANK + ROPE, generator=g, device=dev).bfloat16()
    q_nope = torch.randn(batch, heads, RANK, generator=g, device=dev).bfloat16()
    q_pe = torch.randn(batch, heads, ROPE, generator=g, device=dev).bfloat16()
    tables, table = tables_for(batch, ctx, page_size, dev)
    kv_lens = torch.full((batch,), ctx, dtype=torch.int32, device=dev)
    return pages, q_nope, q_pe, tables, table, kv_lens, (RANK + ROPE) ** -0.5


def mla_kernels(heads: int, batch: int, ctx: int, page_size: int, kernels: list[str]) -> dict:
    api, dev = flashinfer_mla_api(), torch.device("cuda")
    n_pages = (ctx + page_size - 1) // page_size
    pages, q_nope, q_pe, tables, table, kv_lens, scale = mla_inputs(heads, batch, ctx, page_size)
    results = {}
    for name in kernels:
        if name in ("fa3", "fa2"):
            bufs = dict(
                qo_indptr=torch.arange(batch + 1, dtype=torch.int32, device=dev),
                kv_indptr=torch.zeros(batch + 1, dtype=torch.int32, device=dev),
                kv_indices=torch.zeros(batch * n_pages, dtype=torch.int32, device=dev),
                kv_len_arr=torch.zeros(batch, dtype=torch.int32, device=dev),
            )
            workspace = torch.empty(128 << 20, dtype=torch.uint8, device=dev)
            wrapper = api.BatchMLAPagedAttentionWrapper(workspace, use_cuda_graph=True, backend=name, **bufs)
            metadata = mla_metadata([1] * batch, [ctx] * batch, tables, page_size, dev)
            plan_mla(api, wrapper, metadata, heads, (RANK, ROPE), page_size, False, scale, torch.bfloat16)

            def run(w=wrapper):
                return w.run(query=(q_nope, q_pe), kv_cache=(pages[..., :RANK], pages[..., RANK:]))

            results[name] = graph_time(run)
        elif name == "triton":
            splits = triton_attn.model_splits(batch, heads, ctx)
            results[name] = graph_time(
                lambda s=splits: triton_attn.mla_decode(q_nope, q_pe, pages, table, kv_lens, scale, s)
            )
    # every latent once, the queries and the output (bf16)
    nbytes = 2 * (batch * ctx * (RANK + ROPE) + batch * heads * (2 * RANK + ROPE))
    return dict(nbytes=nbytes, results=results)


def time_mla_launches(heads: int, batch: int, ctx: int, page_size: int, cases) -> list[tuple]:
    """(µs, max difference from the torch reference, splits, launch keywords) of the Triton MLA kernel
    for each (splits, launch) of `cases`, each in a CUDA graph, fastest first; a launch that does not
    fit (shared memory) is reported and left out."""
    pages, q_nope, q_pe, _, table, kv_lens, scale = mla_inputs(heads, batch, ctx, page_size)
    want = triton_attn.mla_decode_reference(q_nope, q_pe, pages, table, kv_lens, scale)
    rows = []
    for splits, launch in cases:

        def run(s=splits, k=launch):
            return triton_attn.mla_decode(q_nope, q_pe, pages, table, kv_lens, scale, s, **k)

        try:
            us, out = graph_time(run)
        except Exception as e:  # noqa: BLE001 - a launch that does not fit: reported, next one
            print(f"  {splits} chunks, {launch}: {type(e).__name__}")
            continue
        rows.append((us, (out - want).abs().max().item(), splits, launch))
    return sorted(rows, key=lambda r: r[0])


def print_rows(title: str, rows: list[tuple], label) -> None:
    """The labelled rows (label(row) -> a name or ""), then the fastest five."""
    print(f"\n{title}")
    for row in [r for r in rows if label(r)] + rows[:5]:
        us, diff, splits, launch = row
        print(f"  {us:6.1f}  {splits} chunks, {launch}  max diff {diff:.1e}  {label(row)}", flush=True)


def launch_grid() -> list[dict]:
    """mla_decode's launch keywords: tokens an iteration x warps x pipeline stages."""
    return [
        dict(block_n=n, num_warps=w, num_stages=st)
        for n, w, st in itertools.product((16, 32, 64), (4, 8), (1, 2))
    ]


def sweep_triton_mla(heads: int, batch: int, ctx: int, page_size: int, max_context: int) -> None:
    """The Triton MLA kernel's launch parameters at one shape: chunk count x launch_grid; prints the
    row the bench runs (splits for `ctx`), the engine's (its graphs size the chunks for the model's
    longest context, `max_context`) and the fastest five."""
    default = triton_attn.MLA_DEFAULT_LAUNCH
    bench = (triton_attn.model_splits(batch, heads, ctx), default)
    engine = (triton_attn.model_splits(batch, heads, max_context), default)
    cases = [(s, k) for s in (8, 16, 32, 64) for k in launch_grid()]
    cases += [c for c in (bench, engine) if c not in cases]
    rows = time_mla_launches(heads, batch, ctx, page_size, cases)
    names = {bench[0]: "the bench's", engine[0]: "the engine's"}  # the same splits: one name

    def label(row) -> str:
        return names.get(row[2], "") if row[3] == default else ""

    print_rows(f"mla {heads} heads, batch {batch}, ctx {ctx}: µs per layer", rows, label)


def tune_triton_mla(heads: int, batch: int, lengths: list[int], page_size: int, max_context: int) -> dict:
    """The launch (launch_grid) of the Triton MLA kernel at the engine's chunk count for this batch
    with the lowest mean time relative to the default launch over `lengths` (each launch within
    bf16 rounding of the torch reference at every length); prints the default's row and the best five.

    NOTE: one length is not enough. At exactly ctx 1024 and 64 chunks, 16 tokens an iteration is one
    16-token iteration a chunk; the engine's decode steps after a 1024-token prompt run at 1028-1059
    tokens, where ceil(len / 64) = 17 rounds each chunk up to 32 tokens: 33 chunks of two 16-token
    iterations, while the default's 32 stays one iteration. The twenty-ninth and thirtieth sessions'
    tunes, at 1024 alone, picked 16 and lost 1-3 µs a layer in the engine (docs/benchmarks.md): this
    arithmetic is the likely reason, to be confirmed by a tune over these lengths."""
    splits = triton_attn.model_splits(batch, heads, max_context)
    default = triton_attn.MLA_DEFAULT_LAUNCH
    grid = launch_grid()
    times: dict[int, list[float]] = {i: [] for i in range(len(grid))}
    for ctx in lengths:
        rows = time_mla_launches(heads, batch, ctx, page_size, [(splits, k) for k in grid])
        base = next(us for us, _, _, k in rows if k == default)
        for us, diff, _, k in rows:
            times[grid.index(k)].append(us / base if diff < 2e-2 else float("inf"))  # bf16 of f32: ~1e-3
    ranked = sorted(
        (
            (sum(t) / len(t), grid[i])
            for i, t in times.items()
            if len(t) == len(lengths) and max(t) < float("inf")
        ),
        key=lambda r: r[0],
    )
    print(
        f"\nmla {heads} heads, batch {batch}, {splits} chunks, lengths {lengths}: mean time / the default's"
    )
    for ratio, launch in [r for r in ranked if r[1] == default] + ranked[:5]:
        print(f"  {ratio:6.3f}  {launch}  {'the default' if launch == default else ''}", flush=True)
    return ranked[0][1]


def write_tune(found: dict[str, dict[str, dict]], output_dir: str | None) -> None:
    """Merges this run's entries into the checked-in table (other devices' and shapes' kept)."""
    path = triton_attn.CONFIGS
    table = json.loads(path.read_text()) if path.exists() else {}
    for key, entries in found.items():
        table[key] = {**table.get(key, {}), **entries}
    text = json.dumps(dict(sorted(table.items())), indent=1) + "\n"
    path.write_text(text)
    if output_dir:
        Path(output_dir, path.name).write_text(text)
    print(f"wrote {len(found)} shapes to {path}" + (f" and {output_dir}" if output_dir else ""))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gqa", default="qwen3,llama8b", help=f"GQA shapes of {sorted(GQA_SHAPES)} ('' none)")
    p.add_argument("--mla", default="v2lite,v3", help=f"MLA shapes of {sorted(MLA_HEADS)} ('' none)")
    p.add_argument("--batches", default="1,8,64")
    p.add_argument("--ctx", type=int, default=1024)
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--mla-kernels", default="fa3,fa2,triton")
    p.add_argument("--gqa-kernels", default="flashinfer,triton")
    p.add_argument("--output-json", default=None)
    p.add_argument(
        "--sweep-triton",
        action="store_true",
        help="the MLA shapes' Triton launch parameters (sweep_triton_mla)",
    )
    p.add_argument(
        "--max-context",
        type=int,
        default=163840,
        help="the engine's longest context (--sweep-triton; V2/V3: 163840)",
    )
    p.add_argument("--tune", action="store_true", help="with --sweep-triton: tune_triton_mla, written")
    p.add_argument(
        "--tune-lengths",
        default="1040,1500,3000",
        help="--tune: the context lengths it times each launch at (1040: where offline.py's decode steps after "
        "a 1024-token prompt run)",
    )
    p.add_argument("--output-dir", default=None, help="--tune: a copy of the table here too")
    args = p.parse_args()
    if args.sweep_triton:
        found = {}
        for shape in (s for s in args.mla.split(",") if s):
            heads = MLA_HEADS[shape]
            key = triton_attn.mla_config_key(heads, RANK, ROPE, args.page_size, torch.cuda.get_device_name())
            for batch in (int(b) for b in args.batches.split(",")):
                if args.tune:
                    lengths = [int(n) for n in args.tune_lengths.split(",")]
                    best = tune_triton_mla(heads, batch, lengths, args.page_size, args.max_context)
                    found.setdefault(key, {})[triton_attn.launch_bucket(batch)] = best
                else:
                    sweep_triton_mla(heads, batch, args.ctx, args.page_size, args.max_context)
        if found:
            write_tune(found, args.output_dir)
        return
    ceil = measure_ceilings(torch.device("cuda"), torch.bfloat16)
    print(
        f"{torch.cuda.get_device_name()}: copy {ceil['copy_gb_s']:.0f} GB/s; ctx {args.ctx}, page {args.page_size}"
    )
    cases = [("gqa", s) for s in args.gqa.split(",") if s] + [("mla", s) for s in args.mla.split(",") if s]
    rows = []
    for kind, shape in cases:
        kernels = (args.gqa_kernels if kind == "gqa" else args.mla_kernels).split(",")
        print(f"\n{kind} {shape}: µs per layer")
        print(f"{'batch':>5} {'roofline':>9} " + " ".join(f"{k:>10}" for k in kernels) + "  max diff")
        for batch in (int(b) for b in args.batches.split(",")):
            try:
                if kind == "gqa":
                    r = gqa_kernels(*GQA_SHAPES[shape], batch, args.ctx, args.page_size, kernels)
                else:
                    r = mla_kernels(MLA_HEADS[shape], batch, args.ctx, args.page_size, kernels)
            except Exception as e:  # noqa: BLE001 - a kernel this device or shape lacks: reported, next row
                print(f"  {batch}: {type(e).__name__}: {str(e)[:300]}")
                continue
            roof = r["nbytes"] / (ceil["copy_gb_s"] * 1e9) * 1e6
            times = {k: t for k, (t, _) in r["results"].items()}
            outs = [o for _, o in r["results"].values()]
            diff = max(((o - outs[0]).abs().max().item() for o in outs), default=float("nan"))
            cells = " ".join(f"{times[k]:>10.1f}" if k in times else f"{'-':>10}" for k in kernels)
            print(f"{batch:>5} {roof:>9.1f} {cells}  {diff:.2e}", flush=True)
            rows.append(dict(kind=kind, shape=shape, batch=batch, roofline_us=roof, us=times, max_diff=diff))
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(dict(ceilings=ceil, ctx=args.ctx, page_size=args.page_size, rows=rows), f, indent=2)


if __name__ == "__main__":
    main()
