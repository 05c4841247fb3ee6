"""Generation throughput of the engine against transformers `generate` on an MoE model (issue 19's
"throughput vs transformers generate, batch 32" row): the same batch of random prompts, greedy, the
same number of new tokens, prefill included on both sides, output tokens per second.

    python -m disagg.common.bench.moe_vs_hf --model-path Qwen3-30B-A3B --load-format dummy \\
        --batch 32 --context-len 1024 --new-tokens 64 --output-json $OUT/moe_vs_hf.json

The engine runs in a child process (its weights, KV pool and CUDA graphs go with it), then
transformers in this one: both copies of a 30B model would not fit one GPU together. Each side
runs a warm-up generate of the timed shapes first (kernel builds, graph capture, autotuning are
not timed); the engine also times the batch's prefill alone, printed beside its total, and its
timed generate's steps by kind (prefill chunks, decode-only steps by batch size: count, host ms).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import time

import torch


def ours_tok_s(args: argparse.Namespace) -> dict:
    """The engine's output tokens/s (child process)."""
    from disagg.common.bench.offline import ours_generate
    from disagg.common.engine.offline import Engine

    t0 = time.perf_counter()
    engine = Engine(model_path=args.model_path, load_format=args.load_format, disable_radix_cache=True,
                    max_total_tokens=args.batch * (args.context_len + args.new_tokens + 64) + 8192,
                    max_running_requests=args.batch + 8, chunked_prefill_size=8192, max_prefill_tokens=1 << 20,
                    cuda_graph_max_bs=max(args.batch, 1))  # fmt: skip
    start = time.perf_counter() - t0
    sched = engine.scheduler
    # NOTE: the warm-up has the timed run's shapes: the Triton MoE kernels compile per tile config,
    # and a prefill of 32 x 1024 tokens picks configs a small warm-up never builds
    ours_generate(sched, args.batch, args.context_len, 2)
    # the batch's prefill alone (one new token each), then the whole generate
    prefill_s = args.batch / ours_generate(sched, args.batch, args.context_len, 1)
    steps: list[tuple[int, int, float]] = []
    tok_s = ours_generate(sched, args.batch, args.context_len, args.new_tokens, steps)
    out = dict(tok_s=tok_s, start_s=start, prefill_s=prefill_s, total_s=args.batch * args.new_tokens / tok_s,
               dtype=str(sched.runner.dtype), device=str(sched.runner.device), steps=step_summary(steps))  # fmt: skip
    engine.shutdown()
    return out


def step_summary(steps: list[tuple[int, int, float]]) -> dict:
    """The generate's steps by kind: with prefill tokens (a chunk, maybe with decode rows beside it),
    decode-only (by batch size), and the overlap's last read-back; count and host ms of each."""
    kinds: dict[str, list[float]] = {}
    for prefill, decode, seconds in steps:
        kind = f"prefill+{decode} decode" if prefill else f"decode {decode}" if decode else "read-back"
        kinds.setdefault(kind, []).append(1e3 * seconds)
    return {
        kind: dict(steps=len(ms), total_ms=sum(ms), mean_ms=sum(ms) / len(ms), max_ms=max(ms))
        for kind, ms in kinds.items()
    }


def _child(args: argparse.Namespace, conn) -> None:
    try:
        conn.send(ours_tok_s(args))
    except BaseException as e:  # the parent waits on the pipe: it hears of the failure, not silence
        conn.send({"error": f"{type(e).__name__}: {e}"})
        raise


def hf_tok_s(args: argparse.Namespace, dtype: torch.dtype) -> float:
    from disagg.common.bench.offline import bench_hf_generate

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return bench_hf_generate(args.model_path, args.load_format, device, dtype, args.batch, args.context_len,
                             args.new_tokens)  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-path", default="Qwen3-30B-A3B")
    p.add_argument("--load-format", default="dummy")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--context-len", type=int, default=1024)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--output-json", default=None)
    p.add_argument(
        "--no-hf", action="store_true", help="the engine's side only (e.g. before and after a tune)"
    )
    args = p.parse_args()
    parent, child = mp.get_context("spawn").Pipe()
    proc = mp.get_context("spawn").Process(target=_child, args=(args, child))
    proc.start()
    child.close()  # the child's end, held only by the child now: its death ends recv() (EOFError)
    ours = parent.recv()
    proc.join()
    if "error" in ours:
        raise SystemExit(f"the engine's run failed: {ours['error']}")
    print(f"ours: {ours['tok_s']:.1f} output tok/s ({ours['dtype']}, {ours['device']}, start {ours['start_s']:.0f} s); "
          f"{ours['total_s']:.2f} s, of which the batch's prefill {ours['prefill_s']:.2f} s", flush=True)  # fmt: skip
    for kind, row in ours["steps"].items():  # where the generate's time goes, step by step
        print(f"  {kind:>22}: {row['steps']:3} steps, {row['total_ms']:8.1f} ms "
              f"(mean {row['mean_ms']:6.2f}, max {row['max_ms']:6.2f})", flush=True)  # fmt: skip
    if args.no_hf:
        return
    dtype = getattr(torch, ours["dtype"].removeprefix("torch."))
    hf = hf_tok_s(args, dtype)
    row = dict(batch=args.batch, context_len=args.context_len, new_tokens=args.new_tokens, ours_tok_s=ours["tok_s"],
               hf_tok_s=hf, speedup=ours["tok_s"] / hf, model=args.model_path, dtype=ours["dtype"],
               ours_total_s=ours["total_s"], ours_prefill_s=ours["prefill_s"], ours_steps=ours["steps"])  # fmt: skip
    print(f"transformers: {hf:.1f} output tok/s; ours / transformers = {row['speedup']:.2f}x", flush=True)
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(row, f, indent=2)


if __name__ == "__main__":
    main()
