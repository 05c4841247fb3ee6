"""Offline engine benchmark: decode step time and prefill throughput beside the hardware's
ceilings (copy bandwidth, matmul rate) measured in the same run, and beside Hugging Face `generate`.

    python -m disagg.common.bench.offline                                   # CPU, default model
    python -m disagg.common.bench.offline --model-path Llama-3.1-8B --load-format dummy \
        --batch-sizes 1,16,64 --context-len 1024 --prefill-len 4096 --hf   # GPU
"""

from __future__ import annotations

import argparse
import json
import random
import time

import torch
from disagg.common.parallel.ranks import broadcast_plan
from disagg.common.engine.offline import Engine, to_sampling_params
from disagg.common.models.decoder import head_dim_of
from disagg.common.parallel.state import get_parallel
from disagg.common.engine.request import Req
from disagg.common.engine.scheduler import Scheduler


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, repeat: int = 5) -> float:
    """Median seconds of fn() over `repeat` runs, after one warm-up."""
    fn()
    times = []
    for _ in range(repeat):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def measure_ceilings(device: torch.device, dtype: torch.dtype) -> dict:
    """Device copy bandwidth (bytes read + written) and dense matmul rate, measured now."""
    n = (1 << 30) if device.type == "cuda" else (1 << 27)
    src = torch.empty(n, dtype=torch.uint8, device=device).random_(0, 255)
    dst = torch.empty_like(src)
    bw = 2 * n / timed(lambda: dst.copy_(src), device)
    m = 8192 if device.type == "cuda" else 1024
    a = torch.randn(m, m, device=device, dtype=dtype)
    b = torch.randn(m, m, device=device, dtype=dtype)
    flops = 2 * m**3 / timed(lambda: a @ b, device)
    return {"copy_gb_s": bw / 1e9, "matmul_tflops": flops / 1e12}


def _make_req(rid: str, length: int, vocab: int, new_tokens: int) -> Req:
    ids = [random.randrange(100, vocab - 100) for _ in range(length)]
    return Req(
        rid, ids, to_sampling_params({"max_new_tokens": new_tokens, "temperature": 0, "ignore_eos": True})
    )


def bench_decode(
    sched: Scheduler, batch: int, context: int, steps: int, profile: bool = False
) -> tuple[float, float]:
    """Seconds per decode step of `batch` requests at `context` tokens each, and of its forward alone."""
    vocab = sched.runner.hf_config.vocab_size
    for i in range(batch):
        sched.add_request(_make_req(f"d{batch}-{i}", context, vocab, steps + 8))
    for _ in range(100 * batch + 1000):
        if not (sched.waiting or any(r.num_computed_tokens < r.seq_len - 1 for r in sched.running)):
            break
        sched.step()
    else:
        raise RuntimeError(f"batch {batch} never got admitted: {sched.pool.num_free_pages} pages free")
    device = sched.runner.device
    sched.step()
    sync(device)
    t = time.perf_counter()
    for _ in range(steps):
        sched.step()
    sync(device)
    per_step = (time.perf_counter() - t) / steps
    forward = time_forward_only(sched, steps)
    if profile:
        profile_steps(sched)
    for r in list(sched.running):
        sched.abort_request(r.rid)
    sched.step()
    sched.cache.reset()
    return per_step, forward


def time_forward_only(sched: Scheduler, steps: int) -> float:
    """Seconds of the model forward alone (graph replay or eager) on the batch of the next step:
    the rest of a step is host work (scheduling, planning, sampling, the token read-back)."""
    runner, plans = sched.runner, []
    forward_plan = runner.forward_plan
    runner.forward_plan = lambda plan: plans.append(plan) or forward_plan(plan)
    try:
        sched.step()
    finally:
        runner.forward_plan = forward_plan

    def forward() -> None:
        if get_parallel().tp_size > 1:  # NOTE: the other ranks run a forward only for a broadcast plan
            broadcast_plan(plans[-1])
        forward_plan(plans[-1])

    return timed(forward, runner.device, repeat=steps)


def profile_steps(sched: Scheduler, steps: int = 3) -> None:
    """Print the top kernels of a few decode steps (torch profiler)."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if sched.runner.device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(steps):
            sched.step()
        sync(sched.runner.device)
    key = "cuda_time_total" if sched.runner.device.type == "cuda" else "cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=18, max_name_column_width=60), flush=True)


def bench_prefill(sched: Scheduler, length: int) -> float:
    """Seconds to prefill one request of `length` tokens (one chunk), median of 3."""
    vocab = sched.runner.hf_config.vocab_size
    times = []
    for i in range(4):
        sched.add_request(_make_req(f"p{i}", length, vocab, 1))
        sync(sched.runner.device)
        t = time.perf_counter()
        while sched.has_work():
            sched.step()
        sync(sched.runner.device)
        times.append(time.perf_counter() - t)
        sched.cache.reset()
    return sorted(times[1:])[1]


def model_bytes_and_flops(sched: Scheduler) -> tuple[int, int]:
    model = sched.runner.model
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    matmul_params = sum(
        p.numel() for n, p in model.named_parameters() if p.dim() == 2 and "embed_tokens" not in n
    )
    if sched.runner.model.tie_word_embeddings:
        matmul_params += model.embed_tokens.weight.numel()
    return nbytes, matmul_params


def kv_bytes_per_token(sched: Scheduler) -> int:
    pool = sched.pool
    return pool.num_layers * 2 * pool.num_kv_heads * pool.head_dim * pool.kv_buffer.element_size()


def bench_hf_generate(
    model_path: str, load_format: str, device, dtype, batch: int, context: int, new: int
) -> float:
    """Output tokens/s of transformers `generate` at the same shapes (padded batch, greedy)."""
    from disagg.common.models.weights import PRESETS, load_config
    from transformers import AutoModelForCausalLM

    config = load_config(model_path)
    if load_format == "dummy" or model_path in PRESETS:
        with torch.device(device):  # random init on the GPU (minutes on the CPU for 8B)
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).to(device)
    model.eval()
    ids = torch.randint(100, config.vocab_size - 100, (batch, context), device=device)
    kwargs = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        model.generate(
            ids[:, :16], attention_mask=torch.ones_like(ids[:, :16]), max_new_tokens=2, pad_token_id=0
        )
        sync(device)
        t = time.perf_counter()
        model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
        sync(device)
    elapsed = time.perf_counter() - t
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return batch * new / elapsed


def ours_generate(sched: Scheduler, batch: int, context: int, new: int) -> float:
    vocab = sched.runner.hf_config.vocab_size
    for i in range(batch):
        sched.add_request(_make_req(f"g{batch}-{i}", context, vocab, new))
    sync(sched.runner.device)
    t = time.perf_counter()
    while sched.has_work():
        sched.step()
    sync(sched.runner.device)
    elapsed = time.perf_counter() - t
    sched.cache.reset()
    return batch * new / elapsed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-path", default=None)
    p.add_argument("--load-format", default="auto")
    p.add_argument("--attention-backend", default="auto")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--ep", type=int, default=1)
    p.add_argument("--profile-batch-sizes", default="", help="print the top kernels of these decode batches")
    p.add_argument("--disable-cuda-graph", action="store_true")
    p.add_argument("--batch-sizes", default="1,16,64")
    p.add_argument("--context-len", type=int, default=1024)
    p.add_argument("--prefill-len", type=int, default=4096)
    p.add_argument("--decode-steps", type=int, default=32)
    p.add_argument(
        "--hf", action="store_true", help="also run transformers generate (batch 1 and the largest)"
    )
    p.add_argument("--hf-new-tokens", type=int, default=32)
    p.add_argument("--output-json", default=None)
    args = p.parse_args()
    batches = [int(b) for b in args.batch_sizes.split(",")]
    profile_at = {int(b) for b in args.profile_batch_sizes.split(",") if b}
    max_tokens = max(batches) * (args.context_len + args.decode_steps + 64) + args.prefill_len + 4096
    t0 = time.perf_counter()
    print(f"loading {args.model_path or 'default model'} (tp {args.tp}) ...", flush=True)
    engine = Engine(
        model_path=args.model_path,
        load_format=args.load_format,
        attention_backend=args.attention_backend,
        max_total_tokens=max_tokens,
        chunked_prefill_size=max(args.prefill_len, 8192),
        max_prefill_tokens=1 << 20,
        max_running_requests=max(batches) + 8,
        disable_radix_cache=True,
        tp=args.tp,
        ep=args.ep,
        disable_cuda_graph=args.disable_cuda_graph,
    )
    sched = engine.scheduler
    device, dtype = sched.runner.device, sched.runner.dtype
    print(
        f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}), {dtype}, "
        f"attention {type(sched.runner.backend).__name__}",
        flush=True,
    )
    ceil = measure_ceilings(device, dtype)
    print(f"  ceilings {ceil}", flush=True)
    weight_bytes, matmul_params = model_bytes_and_flops(sched)
    kv_tok = kv_bytes_per_token(sched)
    c = sched.runner.hf_config
    rows = []
    for b in batches:
        print(f"[{time.perf_counter() - t0:.0f} s] decode batch {b} ...", flush=True)
        step, fwd = bench_decode(sched, b, args.context_len, args.decode_steps, b in profile_at)
        roof = (weight_bytes + b * args.context_len * kv_tok) / (ceil["copy_gb_s"] * 1e9)
        rows.append(
            dict(
                kind="decode",
                batch=b,
                context=args.context_len,
                ms=step * 1e3,
                forward_ms=fwd * 1e3,
                roofline_ms=roof * 1e3,
                of_roofline=roof / step,
                tok_s=b / step,
            )
        )
        print(f"  {rows[-1]}", flush=True)
    print(f"[{time.perf_counter() - t0:.0f} s] prefill {args.prefill_len} tokens ...", flush=True)
    t = bench_prefill(sched, args.prefill_len)
    n = args.prefill_len
    attn_flops = 2 * 2 * c.num_hidden_layers * c.num_attention_heads * head_dim_of(c) * n * n / 2
    flops = 2 * matmul_params * n + attn_flops
    rows.append(
        dict(
            kind="prefill",
            batch=1,
            context=n,
            ms=t * 1e3,
            tok_s=n / t,
            tflops=flops / t / 1e12,
            of_matmul=flops / t / 1e12 / ceil["matmul_tflops"],
        )
    )
    print(f"  {rows[-1]}", flush=True)
    gen = []
    if args.hf and args.tp == 1:
        for b in sorted({batches[0], batches[-1]}):
            print(f"generate batch {b}: ours, then transformers ...", flush=True)
            ours = ours_generate(sched, b, args.context_len, args.hf_new_tokens)
            hf = bench_hf_generate(
                sched.runner.model_path,
                args.load_format,
                device,
                dtype,
                b,
                args.context_len,
                args.hf_new_tokens,
            )
            gen.append(dict(batch=b, ours_tok_s=ours, hf_tok_s=hf, speedup=ours / hf))
            print(f"  {gen[-1]}", flush=True)
    if args.hf and args.tp > 1:
        gen = []  # transformers runs on one GPU only
    print_report(ceil, weight_bytes, kv_tok, rows, gen)
    if args.output_json:  # NOTE: before the shutdown, which waits for the other ranks to leave
        with open(args.output_json, "w") as f:
            json.dump(
                dict(ceilings=ceil, weight_bytes=weight_bytes, rows=rows, generate=gen, device=str(device)),
                f,
                indent=2,
            )
    engine.shutdown()


def print_report(ceil: dict, weight_bytes: int, kv_tok: int, rows: list[dict], gen: list[dict]) -> None:
    print(
        f"\nceilings: copy {ceil['copy_gb_s']:.0f} GB/s, matmul {ceil['matmul_tflops']:.1f} TFLOP/s; "
        f"weights {weight_bytes / 1e9:.2f} GB, KV {kv_tok / 1024:.0f} KiB/token"
    )
    print(
        f"{'kind':8} {'batch':>5} {'ctx':>6} {'ms':>9} {'fwd ms':>8} {'tok/s':>10} {'roofline ms':>12} "
        f"{'% of ceiling':>13}"
    )
    for r in rows:
        if r["kind"] == "decode":
            print(
                f"{'decode':8} {r['batch']:>5} {r['context']:>6} {r['ms']:>9.2f} {r['forward_ms']:>8.2f} "
                f"{r['tok_s']:>10.1f} {r['roofline_ms']:>12.2f} {100 * r['of_roofline']:>12.1f}%"
            )
        else:
            print(
                f"{'prefill':8} {r['batch']:>5} {r['context']:>6} {r['ms']:>9.2f} {'':>8} {r['tok_s']:>10.1f} "
                f"{r['tflops']:>9.1f} TF {100 * r['of_matmul']:>12.1f}%"
            )
    if gen:
        print(f"\n{'generate':8} {'batch':>5} {'ours tok/s':>11} {'HF tok/s':>10} {'speed-up':>9}")
        for g in gen:
            print(
                f"{'':8} {g['batch']:>5} {g['ours_tok_s']:>11.1f} {g['hf_tok_s']:>10.1f} {g['speedup']:>8.2f}x"
            )


if __name__ == "__main__":
    main()
