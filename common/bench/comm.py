"""Communication benchmark of a TP group: the all-reduce bus bandwidth (the ceiling) and the exact
collectives one TP forward of a model shape issues per step, eagerly and replayed in a CUDA graph.

    python -m disagg.common.bench.comm --tp 2                                   # CPU (gloo), default model
    python -m disagg.common.bench.comm --tp 2 --model-path Llama-3.1-8B \
        --batch-sizes 1,16,64 --prefill-len 4096 --output-json comm.json  # GPU (NCCL)

Per step the model (common/models/layers.py, common/models/moe.py) issues, on [tokens, hidden] in the model dtype:
one all-reduce after the vocab-parallel embedding, two per layer (attention o_proj; MLP down_proj
or the MoE combine), then one all-gather of the LM head's [logit rows, vocab/tp] (one row per
decode request, one per prefilled request). The same functions of common/parallel/state.py run here on
zero-filled buffers, back to back: the time of that communication alone (TP has no overlap, so
all of it is exposed in a step). Also timed: rank 0's per-step plan broadcast over gloo.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from disagg.common.net import free_port
from disagg.common.parallel.ranks import broadcast_plan
from disagg.common.parallel.state import ParallelState, all_gather_last_dim, all_reduce, set_parallel

logger = logging.getLogger(__name__)
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def bus_factor(n: int) -> float:
    """busbw = algbw * 2(n-1)/n for an all-reduce (nccl-tests convention)."""
    return 2 * (n - 1) / n


def model_shape(model_path: str | None) -> dict:
    from disagg.common.models.model_files import resolve_model_path
    from disagg.common.models.weights import PRESETS, load_config

    path = model_path if model_path in PRESETS else resolve_model_path(model_path)
    c = load_config(path)
    return dict(
        name=model_path or "default",
        hidden=c.hidden_size,
        layers=c.num_hidden_layers,
        vocab=c.vocab_size,
        heads=c.num_attention_heads,
    )


def step_collectives(shape: dict) -> tuple[int, int]:
    """(all-reduces, all-gathers) of one forward step."""
    return 2 * shape["layers"] + 1, 1


def step_bytes(shape: dict, tp: int, tokens: int, logit_rows: int, itemsize: int) -> int:
    """Message bytes of one step: each all-reduce's [tokens, hidden], plus the all-gather's output."""
    reduces, _ = step_collectives(shape)
    vocab_per_rank = (shape["vocab"] + tp - 1) // tp
    return reduces * tokens * shape["hidden"] * itemsize + logit_rows * vocab_per_rank * tp * itemsize


# ---- one rank ------------------------------------------------------------------------------------


class Timer:
    """Median seconds of fn() over `iters` runs after `warmup`, each run started with the ranks aligned;
    the slowest rank's median (every rank waits for the slowest in a collective anyway)."""

    def __init__(self, device: torch.device, cpu_group, iters: int, warmup: int):
        self.device, self.cpu_group, self.iters, self.warmup = device, cpu_group, iters, warmup
        self._align = torch.zeros(1, device=device)

    def _sync_ranks(self) -> None:
        dist.all_reduce(self._align)  # the activation group: aligns the ranks to one collective's latency
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def __call__(self, fn) -> float:
        for _ in range(self.warmup):
            fn()
        times = []
        for _ in range(self.iters):
            self._sync_ranks()
            if self.device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            else:
                t = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t)
        median = torch.tensor([sorted(times)[len(times) // 2]], dtype=torch.float64)
        dist.all_reduce(median, op=dist.ReduceOp.MAX, group=self.cpu_group)
        return float(median.item())


def sweep_bandwidth(timer: Timer, tp: int, dtype, sizes_mib: list[float]) -> list[dict]:
    rows = []
    for mib in sizes_mib:
        n = max(1, int(mib * 2**20) // dtype.itemsize)
        x = torch.zeros(n, dtype=dtype, device=timer.device)
        seconds = timer(lambda x=x: all_reduce(x))
        algbw = n * dtype.itemsize / seconds
        rows.append(
            dict(
                size_bytes=n * dtype.itemsize,
                us=seconds * 1e6,
                algbw_gb_s=algbw / 1e9,
                busbw_gb_s=algbw * bus_factor(tp) / 1e9,
            )
        )
        del x
    return rows


def make_step(shape: dict, tokens: int, logit_rows: int, dtype, device):
    """The collectives of one forward, in order, on zero-filled buffers (values stay zero)."""
    reduces, _ = step_collectives(shape)
    x = torch.zeros(tokens, shape["hidden"], dtype=dtype, device=device)
    tp = dist.get_world_size()
    logits = torch.zeros(logit_rows, (shape["vocab"] + tp - 1) // tp, dtype=dtype, device=device)

    def step():
        for _ in range(reduces):
            all_reduce(x)
        return all_gather_last_dim(logits)

    return step


def capture(step):
    """A CUDA graph of step(), captured as the engine's CudaGraphRunner does (warm-up on a side stream)."""
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    torch.cuda.synchronize()
    return graph


def synthetic_plan(tokens: int, requests: int, context: int, page_size: int = 16):
    """A batch plan of the engine's shape (model_runner.build_plan): what rank 0 broadcasts per step."""
    from disagg.common.engine.model_runner import BatchPlan

    per = tokens // requests
    ids = list(range(100, 100 + tokens))
    kv = [context + per] * requests
    return BatchPlan(
        ids=ids,
        positions=[context + i % per for i in range(tokens)],
        pages=[(context + i % per) // page_size for i in range(tokens)],
        offsets=[(context + i % per) % page_size for i in range(tokens)],
        logits_index=[(r + 1) * per - 1 for r in range(requests)],
        q_lens=[per] * requests,
        kv_lens=kv,
        tables=[list(range(r * 1000, r * 1000 + (n + page_size - 1) // page_size)) for r, n in enumerate(kv)],
    )


def bench_steps(timer: Timer, args, shape: dict, dtype, graphs: bool) -> list[dict]:
    tp = dist.get_world_size()
    cases = [("decode", b, b, b, args.context_len) for b in args.batch_sizes]
    if args.prefill_len:
        cases.append(("prefill", args.prefill_len, 1, 1, 0))
    reduces, gathers = step_collectives(shape)
    rows = []
    for kind, tokens, logit_rows, requests, context in cases:
        step = make_step(shape, tokens, logit_rows, dtype, timer.device)
        eager = timer(step)
        graph_s = None
        if graphs:
            graph = capture(step)
            graph_s = timer(graph.replay)
            del graph
        plan = synthetic_plan(tokens, requests, context)
        plan_s = timer(lambda plan=plan: broadcast_plan(plan if dist.get_rank() == 0 else None))
        rows.append(
            dict(
                kind=kind,
                tokens=tokens,
                all_reduces=reduces,
                all_gathers=gathers,
                collectives=reduces + gathers,
                bytes=step_bytes(shape, tp, tokens, logit_rows, dtype.itemsize),
                eager_ms=eager * 1e3,
                graph_ms=None if graph_s is None else graph_s * 1e3,
                plan_broadcast_ms=plan_s * 1e3,
            )
        )
    return rows


def rank_main(rank: int, args, init_addr: str, result_path: str) -> None:
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda", rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(max(1, (torch.get_num_threads()) // args.tp))
    kwargs = dict(device_id=device) if use_cuda else {}  # NOTE: eager NCCL init, never inside a capture
    dist.init_process_group(
        "nccl" if use_cuda else "gloo",
        init_method=f"tcp://{init_addr}",
        rank=rank,
        world_size=args.tp,
        timeout=datetime.timedelta(seconds=args.timeout),
        **kwargs,
    )
    try:
        cpu_group = dist.new_group(backend="gloo")
        set_parallel(
            ParallelState(tp_rank=rank, tp_size=args.tp, group=dist.group.WORLD, cpu_group=cpu_group)
        )
        dtype = _DTYPES.get(args.dtype) or (torch.bfloat16 if use_cuda else torch.float32)
        shape = model_shape(args.model_path)
        timer = Timer(device, cpu_group, args.iters, args.warmup)
        timer(lambda: None)  # first collectives: communicator set-up off the clock
        bandwidth = sweep_bandwidth(timer, args.tp, dtype, sizes_mib(args.min_size_mib, args.max_size_mib))
        steps = bench_steps(timer, args, shape, dtype, graphs=use_cuda and not args.no_graph)
        if rank == 0:
            name = torch.cuda.get_device_name(device) if use_cuda else "cpu"
            result = dict(
                tp=args.tp,
                backend=dist.get_backend(),
                device=name,
                dtype=str(dtype).removeprefix("torch."),
                model=shape,
                bandwidth=bandwidth,
                steps=steps,
            )
            with open(result_path + ".tmp", "w") as f:
                json.dump(result, f)
            os.replace(result_path + ".tmp", result_path)  # complete or absent
        dist.barrier(group=cpu_group)  # tear down together
    finally:
        dist.destroy_process_group()


# ---- entry point -----------------------------------------------------------------------------------


def sizes_mib(lo: float, hi: float) -> list[float]:
    sizes, s = [], lo
    while s <= hi:
        sizes.append(s)
        s *= 2
    return sizes


def run(args) -> dict:
    """Spawn the tp ranks, return rank 0's results (raises if any rank fails)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "rank0.json")
        try:
            mp.spawn(rank_main, args=(args, f"127.0.0.1:{free_port()}", path), nprocs=args.tp, join=True)
        except Exception as e:  # noqa: BLE001 - a crash after rank 0 wrote every result is teardown noise
            if not os.path.exists(path):
                raise
            logger.warning("a rank failed after the measurements finished (%s); results kept", e)
        with open(path) as f:
            return json.load(f)


def print_report(r: dict) -> None:
    print(f"\n{r['backend']} on {r['device']}, tp {r['tp']}, {r['dtype']}")
    print(f"{'all-reduce size':>16} {'us':>10} {'algbw GB/s':>11} {'busbw GB/s':>11}")
    for b in r["bandwidth"]:
        print(
            f"{b['size_bytes'] / 2**20:>12.2f} MiB {b['us']:>10.1f} {b['algbw_gb_s']:>11.2f} {b['busbw_gb_s']:>11.2f}"
        )
    peak = max(r["bandwidth"], key=lambda b: b["busbw_gb_s"])
    print(f"peak all-reduce busbw {peak['busbw_gb_s']:.1f} GB/s at {peak['size_bytes'] / 2**20:.0f} MiB")
    m = r["model"]
    print(
        f"\nper-step collectives of {m['name']} ({m['layers']} layers, hidden {m['hidden']}, vocab {m['vocab']})"
    )
    print(
        f"{'kind':8} {'tokens':>7} {'collectives':>12} {'MiB/step':>9} {'eager ms':>9} {'graph ms':>9} {'plan bcast ms':>14}"
    )
    for s in r["steps"]:
        graph = "-" if s["graph_ms"] is None else f"{s['graph_ms']:.3f}"
        print(
            f"{s['kind']:8} {s['tokens']:>7} {s['collectives']:>12} {s['bytes'] / 2**20:>9.2f} "
            f"{s['eager_ms']:>9.3f} {graph:>9} {s['plan_broadcast_ms']:>14.3f}"
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tp", "--tp-size", dest="tp", type=int, default=2)
    p.add_argument("--model-path", default=None, help="HF folder or preset (default: the embedded model)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtype", default="auto", choices=["auto", *_DTYPES])
    p.add_argument("--batch-sizes", default="1,16,64", help="decode batch sizes (tokens per step)")
    p.add_argument("--context-len", type=int, default=1024, help="decode context (sizes the plan only)")
    p.add_argument("--prefill-len", type=int, default=4096, help="prefill tokens of one request; 0: none")
    p.add_argument("--min-size-mib", type=float, default=1.0)
    p.add_argument("--max-size-mib", type=float, default=1024.0)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--no-graph", action="store_true", help="skip the CUDA-graph replays")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds for the group to form")
    p.add_argument("--output-json", default=None)
    args = p.parse_args()
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b]
    if args.tp < 2:
        p.error("--tp must be >= 2 (a single rank communicates nothing)")
    if args.min_size_mib <= 0 or args.max_size_mib < args.min_size_mib:
        p.error("need 0 < --min-size-mib <= --max-size-mib")
    if any(b < 1 for b in args.batch_sizes) or args.prefill_len < 0:
        p.error("batch sizes must be >= 1 and --prefill-len >= 0")
    if args.device != "cpu" and torch.cuda.is_available() and torch.cuda.device_count() < args.tp:
        p.error(f"--tp {args.tp} needs {args.tp} GPUs, {torch.cuda.device_count()} visible")
    result = run(args)
    print_report(result)
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
