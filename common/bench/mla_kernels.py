"""FlashInfer's MLA decode kernels on the GPU, one layer at DeepSeek's widths (kv_lora_rank 512,
rope 64): each backend FlashInfer offers on this device (Hopper: FA3, what `auto` picks, and FA2)
as the engine runs it (CUDA-graph wrapper, latent pages read in place), beside the bytes roofline
(every latent of the batch read once, at the copy rate measured in the same process).

    python -m disagg.common.bench.mla_kernels --heads 16,128 --batches 1,8,64 --ctx 1024

16 heads: DeepSeek-V2-Lite (and V3 at TP 8); 128: V3 at TP 1. Prints µs per layer per backend and
the largest difference between backends' outputs (same inputs).
"""

from __future__ import annotations

import argparse
import json

import torch
from disagg.common.bench.offline import measure_ceilings
from disagg.common.engine.attention_flashinfer import flashinfer_mla_api, mla_metadata, plan_mla

RANK, ROPE = 512, 64


def run_backend(backend: str, heads: int, batch: int, ctx: int, page_size: int, reps: int = 50):
    """(µs per run, output) of one backend in a captured CUDA graph of `reps` runs."""
    api, dev = flashinfer_mla_api(), torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    n_pages = (ctx + page_size - 1) // page_size
    pages = torch.randn(batch * n_pages, page_size, RANK + ROPE, generator=g, device=dev).bfloat16()
    q_nope = torch.randn(batch, heads, RANK, generator=g, device=dev).bfloat16()
    q_pe = torch.randn(batch, heads, ROPE, generator=g, device=dev).bfloat16()
    tables = [list(range(b * n_pages, (b + 1) * n_pages)) for b in range(batch)]
    bufs = dict(
        qo_indptr=torch.arange(batch + 1, dtype=torch.int32, device=dev),
        kv_indptr=torch.zeros(batch + 1, dtype=torch.int32, device=dev),
        kv_indices=torch.zeros(batch * n_pages, dtype=torch.int32, device=dev),
        kv_len_arr=torch.zeros(batch, dtype=torch.int32, device=dev),
    )
    workspace = torch.empty(128 << 20, dtype=torch.uint8, device=dev)
    wrapper = api.BatchMLAPagedAttentionWrapper(workspace, use_cuda_graph=True, backend=backend, **bufs)
    metadata = mla_metadata([1] * batch, [ctx] * batch, tables, page_size, dev)
    plan_mla(api, wrapper, metadata, heads, (RANK, ROPE), page_size, False, RANK**-0.5, torch.bfloat16)

    def run():
        return wrapper.run(query=(q_nope, q_pe), kv_cache=(pages[..., :RANK], pages[..., RANK:]))

    out = run()  # builds the kernel outside the capture
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--heads", default="16,128")
    p.add_argument("--batches", default="1,8,64")
    p.add_argument("--ctx", type=int, default=1024)
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--backends", default="fa3,fa2")
    p.add_argument("--output-json", default=None)
    args = p.parse_args()
    ceil = measure_ceilings(torch.device("cuda"), torch.bfloat16)
    backends = args.backends.split(",")
    print(
        f"{torch.cuda.get_device_name()}: copy {ceil['copy_gb_s']:.0f} GB/s; ctx {args.ctx}, page {args.page_size}"
    )
    print(
        f"{'heads':>5} {'batch':>5} {'roofline us':>11} "
        + " ".join(f"{b + ' us':>10}" for b in backends)
        + "  max diff"
    )
    rows = []
    for heads in (int(h) for h in args.heads.split(",")):
        for batch in (int(b) for b in args.batches.split(",")):
            # bytes: every latent once, the queries and the output (bf16)
            nbytes = 2 * (batch * args.ctx * (RANK + ROPE) + batch * heads * (2 * RANK + ROPE))
            roof = nbytes / (ceil["copy_gb_s"] * 1e9) * 1e6
            times, outs = {}, {}
            for backend in backends:
                try:
                    times[backend], outs[backend] = run_backend(
                        backend, heads, batch, args.ctx, args.page_size
                    )
                except Exception as e:  # noqa: BLE001 - a backend this device or shape lacks: reported
                    print(f"  {backend}: {type(e).__name__}: {str(e)[:200]}")
            ref = next(iter(outs.values()), None)
            diff = max(((o - ref).abs().max().item() for o in outs.values()), default=float("nan"))
            cells = " ".join(f"{times[b]:>10.1f}" if b in times else f"{'-':>10}" for b in backends)
            print(f"{heads:>5} {batch:>5} {roof:>11.1f} {cells}  {diff:.2e}", flush=True)
            rows.append(dict(heads=heads, batch=batch, roofline_us=roof, us=times, max_diff=diff))
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(dict(ceilings=ceil, ctx=args.ctx, page_size=args.page_size, rows=rows), f, indent=2)


if __name__ == "__main__":
    main()
