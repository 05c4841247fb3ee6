"""Offline engine benchmark: decode step time and prefill throughput beside the hardware's
ceilings (copy bandwidth, matmul rate) measured in the same run, and beside Hugging Face `generate`.

    python -m disagg.common.bench.offline                                   # CPU, default model
    python -m disagg.common.bench.offline --model-path Llama-3.1-8B --load-format dummy \
        --batch-sizes 1,16,64 --context-len 1024 --prefill-len 4096 --hf   # GPU
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import time

import torch
from disagg.common.engine.model_runner import BatchPlan
from disagg.common.engine.offline import Engine, to_sampling_params
from disagg.common.engine.request import Req
from disagg.common.engine.scheduler import Scheduler
from disagg.common.models import moe
from disagg.common.models.decoder import head_dim_of
from disagg.common.models.deepseek import is_mla
from disagg.common.models.moe import SparseMoE
from disagg.common.models.pdl import pdl_enabled
from disagg.common.parallel.ranks import broadcast_plan
from disagg.common.parallel.state import get_parallel


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


def queued_us(fn, iters: int = 200) -> float:
    """Mean µs of the device's timeline per fn() over `iters` calls launched eagerly back to back
    (CUDA events around them, after 3 warm-up calls): the kernels' time where the host launches
    faster than they run, the host's where it is the slower side (a synchronised call per run, as
    `timed`, counts every launch's latency)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3 / iters


def graph_us_per_layer(fn, layers: list, iters: int = 50) -> float:
    """µs per layer of fn(layer) over all `layers`, replayed as one CUDA graph (no host launch cost,
    as in a captured decode step), after each layer ran once outside the capture (Triton's JIT,
    cuBLAS's heuristics). Distinct weights per layer keep L2 from holding them between calls."""
    for layer in layers:
        fn(layer)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for layer in layers:
            fn(layer)
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1000 / iters / len(layers)


def kernels_per_call(fn) -> int:
    """The CUDA kernels one fn() launches (torch profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(e.count for e in prof.key_averages() if e.device_type.name == "CUDA")


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
    ceil = {"copy_gb_s": bw / 1e9, "matmul_tflops": flops / 1e12}
    if device.type == "cuda" and torch.cuda.get_device_capability(device) >= (9, 0):
        # the FP8 ceiling (cuBLAS, per-tensor scales) an FP8 checkpoint's GEMMs compare with
        one = torch.ones((), device=device)
        a8, b8 = a.to(torch.float8_e4m3fn), b.to(torch.float8_e4m3fn).t().contiguous().t()
        fp8_s = timed(lambda: torch._scaled_mm(a8, b8, scale_a=one, scale_b=one, out_dtype=dtype), device)
        ceil["fp8_matmul_tflops"] = 2 * m**3 / fp8_s / 1e12
    return ceil


def _make_req(rid: str, length: int, vocab: int, new_tokens: int) -> Req:
    ids = [random.randrange(100, vocab - 100) for _ in range(length)]
    return Req(
        rid, ids, to_sampling_params({"max_new_tokens": new_tokens, "temperature": 0, "ignore_eos": True})
    )


def bench_decode(
    sched: Scheduler, batch: int, context: int, steps: int, profile: bool = False
) -> tuple[float, float, float]:
    """Seconds per decode step of `batch` requests at `context` tokens each (the faster of two
    windows of `steps` steps after three warm-up steps), of its forward alone, and the mean number
    of this rank's experts the step touched per MoE layer. Each request lives for all of these
    steps and the profiled ones (2 * steps + 32 new tokens).

    NOTE: one window after one warm-up step swung by up to 40% on the H200 (tenth session: DeepSeek
    V3 4-layer batch 1 at 1.77 and 2.03 ms, same code and machine; a forward alone 2.92-3.17 ms):
    a one-time host stall (a kernel built or specialised on first use outside the CUDA graph, the
    allocator growing) inside the only window counts 1/steps of itself in every step."""
    vocab = sched.runner.hf_config.vocab_size
    for i in range(batch):
        sched.add_request(_make_req(f"d{batch}-{i}", context, vocab, 2 * steps + 32))
    for _ in range(100 * batch + 1000):
        if not (sched.waiting or any(r.num_computed_tokens < r.seq_len - 1 for r in sched.running)):
            break
        sched.step()
    else:
        raise RuntimeError(f"batch {batch} never got admitted: {sched.pool.num_free_pages} pages free")
    device = sched.runner.device
    for _ in range(3):
        sched.step()
    windows = []
    for _ in range(2):
        sync(device)
        t = time.perf_counter()
        for _ in range(steps):
            sched.step()
        sync(device)
        windows.append((time.perf_counter() - t) / steps)
    per_step = min(windows)
    forward, plan = time_forward_only(sched, steps)
    touched = touched_experts(sched, plan)
    if profile:
        profile_steps(sched)
    for r in list(sched.running):
        sched.abort_request(r.rid)
    sched.step()
    sched.cache.reset()
    return per_step, forward, touched


@contextlib.contextmanager
def captured_plans(runner, plans: list):
    """Inside: every plan the runner forwards is also appended to `plans` (its forward_plan patched,
    restored on the way out)."""
    forward_plan = runner.forward_plan
    runner.forward_plan = lambda plan: plans.append(plan) or forward_plan(plan)
    try:
        yield
    finally:
        runner.forward_plan = forward_plan


def time_forward_only(sched: Scheduler, steps: int) -> tuple[float, object]:
    """Seconds of the model forward alone (graph replay or eager) on the batch of the next step:
    the rest of a step is host work (scheduling, planning, sampling, the token read-back)."""
    runner, plans = sched.runner, []
    with captured_plans(runner, plans):
        sched.step()
    return time_plan(runner.forward_plan, plans[-1], runner.device, steps), plans[-1]


def time_plan(forward_plan, plan, device: torch.device, repeat: int) -> float:
    """Median seconds of `forward_plan(plan)` alone (the runner's, captured unpatched) over `repeat` runs."""

    def forward() -> None:
        if get_parallel().tp_size > 1:  # NOTE: the other ranks run a forward only for a broadcast plan
            broadcast_plan(plan)
        forward_plan(plan)

    return timed(forward, device, repeat=repeat)


def profile_steps(sched: Scheduler, steps: int = 3) -> None:
    """Print the top kernels of a few decode steps (torch profiler), then the host's Python functions
    over 16 steps (cProfile): where the host sets a step's pace (a small model, a slow host), the
    second table says what it spends the step on."""
    profile_run(sched, lambda: [sched.step() for _ in range(steps)])
    import cProfile
    import pstats

    prof = cProfile.Profile()
    prof.runcall(lambda: [sched.step() for _ in range(16)])
    sync(sched.runner.device)
    print("host functions over 16 decode steps (cProfile; its overhead inflates every figure):")
    pstats.Stats(prof).sort_stats("tottime").print_stats(22)


def profile_prefill(sched: Scheduler, length: int) -> None:
    """Print the top kernels of one prefill of `length` tokens (after bench_prefill's warm-up), then
    the host's Python functions over two more (cProfile): where the host launches a forward no faster
    than the device runs it (prefill_host_split's launch close to the device's layers), what it spends
    that time on."""

    def run():
        sched.add_request(_make_req("profiled", length, sched.runner.hf_config.vocab_size, 1))
        while sched.has_work():
            sched.step()

    profile_run(sched, run)
    sched.cache.reset()
    import cProfile
    import pstats

    prof = cProfile.Profile()
    for _ in range(2):
        prof.runcall(run)
        sync(sched.runner.device)
        sched.cache.reset()
    print(f"host functions over two {length}-token prefills (cProfile; its overhead inflates every figure):")
    pstats.Stats(prof).sort_stats("tottime").print_stats(30)


def profile_run(sched: Scheduler, fn) -> None:
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if sched.runner.device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        fn()
        sync(sched.runner.device)
    table = prof.key_averages().table
    if sched.runner.device.type == "cuda":
        print(table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=60), flush=True)
        print(gpu_busy(prof), flush=True)
        if pdl_enabled(sched.runner.device):
            # thirteenth session, H100: a 32 KB sum kernel "took" 12.6 us, the kernels of a 3.48 ms
            # step summed to ~4.9 ms: each span includes its wait on the kernel before it
            print("NOTE: PDL is on: a Triton kernel starts before the one it depends on ends, and its span "
                  "includes that wait; DISAGG_PDL=0 for each kernel's own time", flush=True)  # fmt: skip
    # the host's share: where a step is launch-bound, these ops (not the kernels) set its time
    print(table(sort_by="self_cpu_time_total", row_limit=18, max_name_column_width=60), flush=True)


def gpu_busy(prof) -> str:
    """How much of the span from the first kernel's start to the last one's end some kernel ran (the
    union of their intervals): where it is well under the span, the GPU waited on the host's launches
    (or on a sync) and faster kernels alone would not shorten the run. With PDL on, a kernel's span
    includes its wait on the one before, so the union overstates the busy time (DISAGG_PDL=0)."""
    spans = sorted(
        (e.time_range.start, e.time_range.end, e.name)
        for e in prof.events()
        if e.device_type.name == "CUDA" and e.time_range.end > e.time_range.start
    )
    if not spans:
        return "GPU busy: no kernels recorded"
    busy, (start, end, before) = 0.0, spans[0]
    first, last = spans[0][0], max(e for _, e, _ in spans)
    gaps = []  # (idle us, the kernel before, the one after)
    for s, e, name in spans[1:]:
        if s > end:
            busy, gaps = busy + end - start, gaps + [(s - end, before, name)]
            start, end = s, e
        elif e > end:
            end = e
        before = name if e >= end else before
    busy += end - start
    span = last - first
    small = sum(g for g, _, _ in gaps if g < 20)
    lines = [f"GPU busy {busy / 1e3:.2f} ms of a {span / 1e3:.2f} ms span from the first kernel to the last "
             f"({100 * busy / span:.1f}%; {len(spans)} kernels, idle {(span - busy) / 1e3:.2f} ms: "
             f"{len(gaps)} gaps, {small / 1e3:.2f} ms of them under 20 us each); the largest gaps:"]  # fmt: skip
    for g, b, a in sorted(gaps, reverse=True)[:8]:
        lines.append(f"  {g:8.1f} us after {b[:60]} before {a[:60]}")
    return "\n".join(lines)


def prefill_host_split(runner, plan, repeat: int = 3) -> dict:
    """Where an eager forward's time goes between the host and the device (median of `repeat` by
    total): `prepare_ms`, the host building the batch's tensors and the attention plan (make_batch;
    the device has nothing queued meanwhile; `plan_ms` of it the attention backend's), `launch_ms`, the host queuing every layer's kernels,
    `total_ms` until the logits are computed; on CUDA `device_layers_ms`, the device's timeline from
    the end of prepare to the logits (CUDA events). device_layers close to launch: the device waited on
    the launches (host-bound); close to the kernels' sum (`--profile-prefill`): it ran them back to back."""
    cuda = runner.device.type == "cuda"
    runs, planned = [], []
    backend_prepare = runner.backend.prepare

    def timed_prepare(batch):  # the attention backend's part of prepare (its plan: `plan_ms`)
        t = time.perf_counter()
        backend_prepare(batch)
        planned.append(time.perf_counter() - t)

    for _ in range(repeat):
        sync(runner.device)
        t0 = time.perf_counter()
        runner.backend.prepare = timed_prepare
        try:
            batch = runner.make_batch(plan)
        finally:
            runner.backend.prepare = backend_prepare
        t1 = time.perf_counter()
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        runner.model(batch, runner.pool.kv_buffer, runner.backend)
        if cuda:
            end.record()
        t2 = time.perf_counter()
        sync(runner.device)
        t3 = time.perf_counter()
        run = dict(prepare_ms=(t1 - t0) * 1e3, launch_ms=(t2 - t1) * 1e3, total_ms=(t3 - t0) * 1e3)
        run["plan_ms"] = planned[-1] * 1e3
        if cuda:
            run["device_layers_ms"] = start.elapsed_time(end)
        runs.append(run)
    return sorted(runs, key=lambda r: r["total_ms"])[len(runs) // 2]


def bench_prefill(sched: Scheduler, length: int) -> tuple[float, float, dict]:
    """Seconds to prefill one request of `length` tokens (one chunk), median of 3; and of the model
    forward alone on its batch (planning, the layers and the logits; median of 3): the rest of the
    steps is host work around it (scheduling, sampling, finishing the request)."""
    runner, vocab, plans = sched.runner, sched.runner.hf_config.vocab_size, []
    times = []
    for i in range(4):
        sched.add_request(_make_req(f"p{i}", length, vocab, 1))
        sync(runner.device)
        t = time.perf_counter()
        with captured_plans(runner, plans):
            while sched.has_work():
                sched.step()
            sync(runner.device)
        times.append(time.perf_counter() - t)
        sched.cache.reset()
    plan = max(plans, key=lambda p: sum(p.q_lens))  # the prompt's (not a decode step after it)
    # NOTE: the re-run writes the freed pages of the finished request again: nothing reads them
    forward_s = time_plan(runner.forward_plan, plan, runner.device, 3)
    split = prefill_host_split(runner, plan) if get_parallel().world_size == 1 else {}
    return sorted(times[1:])[1], forward_s, split


def prefix_plans(runner, prefix: int, length: int) -> tuple[BatchPlan, BatchPlan]:
    """One request's plans: its first `prefix` tokens as a fresh prompt, then `length` more after them
    (the attention reads the prefix from the pool's pages); random ids, on the pool's pages from 1 on
    (the engine idle: nothing else holds them)."""
    ps, n = runner.pool.page_size, prefix + length
    table = list(range(1, 1 + -(-n // ps)))
    if len(table) >= runner.pool.num_pages:
        raise ValueError(f"a prefix of {prefix} and {length} new tokens need more pages than the pool has")
    ids = torch.randint(
        0, runner.hf_config.vocab_size, (n,), generator=torch.Generator().manual_seed(0)
    ).tolist()

    def rows(start: int, end: int) -> BatchPlan:
        at = range(start, end)
        pages, offsets = [table[i // ps] for i in at], [i % ps for i in at]
        return BatchPlan(ids[start:end], list(at), pages, offsets, [end - start - 1], [end - start], [end],
                         [table[: -(-end // ps)]])  # fmt: skip

    return rows(0, prefix), rows(prefix, n)


def bench_prefix_prefill(runner, prefix: int, length: int, repeat: int = 5) -> float:
    """Seconds of the model forward alone for `length` new tokens after `prefix` cached ones (a
    radix-cache hit, or a long prompt's later chunk), median of `repeat`; the prefix's forward first
    writes its K/V."""
    first, then = prefix_plans(runner, prefix, length)
    time_plan(runner.forward_plan, first, runner.device, 1)
    return time_plan(runner.forward_plan, then, runner.device, repeat)


def weight_traffic(model) -> dict:
    """This rank's weights by how a step uses them (bytes; params = multiply-adds per token):
    dense: read every step, each param one multiply-add per token (attention, norms, router, dense
    MLPs, the LM head); embedding: only gathered rows; expert: one expert of one MoE layer, read only
    where routed. The LM head runs once per sequence in prefill, so it is counted apart."""
    head = model.embed_tokens if model.tie_word_embeddings else model.lm_head
    t = dict(dense_bytes=0, dense_params=0, head_params=head.weight.numel(), expert_bytes=0, expert_params=0)
    t["embedding_bytes"] = 0 if model.tie_word_embeddings else model.embed_tokens.weight.nbytes
    moes = [m for m in model.modules() if isinstance(m, SparseMoE)]
    expert_ids = {id(p) for m in moes for p in m.experts.parameters()}
    for p in model.parameters():  # NOTE: a tied LM head is listed once
        if id(p) in expert_ids:
            continue
        if p is model.embed_tokens.weight and not model.tie_word_embeddings:
            continue
        t["dense_bytes"] += p.nbytes
        if p.dim() == 2 and p is not head.weight:
            t["dense_params"] += p.numel()
    if moes:
        m = moes[0]
        t["expert_bytes"] = sum(p[0].nbytes for p in m.experts.parameters())
        t["expert_params"] = sum(p[0].numel() for p in m.experts.parameters())
        # shared experts fused as expert slots (DeepseekMoE.fuse_shared_experts): read every step, as
        # their MLP was; every layer fuses alike
        shared = getattr(m, "num_shared_fused", 0) * len(moes)
        t["dense_bytes"] += shared * t["expert_bytes"]
        t["dense_params"] += shared * t["expert_params"]
        # expected routed slots per token that land on this rank's experts
        t["local_slots"] = m.top_k * m.num_local / m.num_experts
        t["num_local"] = m.num_local
    t["moe_layers"] = len(moes)
    return t


def touched_experts(sched: Scheduler, plan) -> float:
    """Mean number of this rank's experts a forward of `plan` routes to, per MoE layer: one eager
    forward counted by the layers' per-expert counters (their own counts kept)."""
    model, runner = sched.runner.model, sched.runner
    moes = [m for m in model.modules() if isinstance(m, SparseMoE)]
    if not moes:
        return 0.0
    # the layers' own per-expert counters (set_expert_load_stats), not hooks on the gates: a gate
    # module is not called where the router's Triton GEMV computes the logits
    flags, kept = [m.count_tokens for m in moes], [m.expert_tokens.clone() for m in moes]
    for m in moes:
        m.count_tokens = True
        m.expert_tokens.zero_()
    graphs, runner.graph_runner = runner.graph_runner, None
    try:
        if get_parallel().tp_size > 1:
            broadcast_plan(plan)
        runner.forward_plan(plan)
        counts = [
            int((m.expert_tokens[m.first_expert : m.first_expert + m.num_local] > 0).sum()) for m in moes
        ]
    finally:
        runner.graph_runner = graphs
        for m, flag, tokens in zip(moes, flags, kept, strict=True):
            m.count_tokens = flag
            m.expert_tokens.copy_(tokens)
    return sum(counts) / len(counts)


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
        # NOTE: the warm-up has the timed run's shapes (any kernel built or tuned per shape is not timed)
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, pad_token_id=0)
        sync(device)
        t = time.perf_counter()
        model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
        sync(device)
    elapsed = time.perf_counter() - t
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return batch * new / elapsed


def ours_generate(sched: Scheduler, batch: int, context: int, new: int, steps: list | None = None) -> float:
    """Output tokens/s of `batch` requests of `context` random tokens, `new` tokens each. `steps`: a
    list to append each step's (prefill tokens, decode rows, host seconds of the step) to."""
    vocab = sched.runner.hf_config.vocab_size
    for i in range(batch):
        sched.add_request(_make_req(f"g{batch}-{i}", context, vocab, new))
    scheduled: list[tuple[int, int]] = []
    if steps is not None:
        _record_batches(sched, scheduled)
    try:
        sync(sched.runner.device)
        t, produced, errors = time.perf_counter(), 0, set()
        while sched.has_work():
            t0, before = time.perf_counter(), len(scheduled)
            for out in sched.step():
                produced += len(out.new_token_ids)
                if out.error:
                    errors.add(out.error)
            if steps is not None:  # a step that launched nothing (the overlap's last read-back): (0, 0)
                steps.append(
                    (*(scheduled[-1] if len(scheduled) > before else (0, 0)), time.perf_counter() - t0)
                )
        sync(sched.runner.device)
        elapsed = time.perf_counter() - t
    finally:
        sched.__dict__.pop("schedule_batch", None)  # the class's method again
    sched.cache.reset()
    if produced != batch * new:  # e.g. prompts longer than the model's context are refused
        raise RuntimeError(f"generated {produced} of {batch * new} tokens: {'; '.join(errors) or 'no error'}")
    return batch * new / elapsed


def _record_batches(sched: Scheduler, log: list[tuple[int, int]]) -> None:
    """Append each batch the scheduler picks as (prefill tokens, decode rows) to `log`."""
    plain = type(sched).schedule_batch.__get__(sched)

    def schedule_batch():
        batch = plain()
        if batch:
            log.append((sum(n for _, n in batch if n > 1), sum(1 for _, n in batch if n == 1)))
        return batch

    sched.schedule_batch = schedule_batch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-path", default=None)
    p.add_argument("--load-format", default="auto")
    p.add_argument("--attention-backend", default="auto")
    p.add_argument("--decode-attention-backend", default="auto", choices=["auto", "flashinfer", "triton"])
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--ep", type=int, default=1)
    p.add_argument("--moe-a2a-backend", default="none", choices=["none", "all_to_all"])
    p.add_argument("--deepep-mode", default="auto", choices=["auto", "normal", "low_latency"])
    p.add_argument("--profile-batch-sizes", default="", help="print the top kernels of these decode batches")
    p.add_argument("--profile-prefill", action="store_true", help="print the top kernels of one prefill")
    p.add_argument("--disable-cuda-graph", action="store_true")
    p.add_argument("--disable-prefill-cuda-graph", action="store_true",
                   help="prefill eagerly (by default a fresh prompt's prefill replays a CUDA graph, cuda_graph."
                   "PrefillGraphRunner; the host/device split line is the eager forward's either way)")  # fmt: skip
    p.add_argument("--disable-overlap-schedule", action="store_true")
    p.add_argument("--disable-shared-experts-fusion", action="store_true")
    p.add_argument(
        "--moe-kernel",
        choices=["auto", "torch"],
        default="auto",
        help="torch: the batched-matmul MoE path even on the GPU (for before/after; this process only, tp 1)",
    )
    p.add_argument("--json-model-override-args", default="{}", help="JSON merged into the model config")
    p.add_argument("--batch-sizes", default="1,16,64")
    p.add_argument("--context-len", type=int, default=1024)
    p.add_argument("--prefill-len", type=int, default=4096)
    p.add_argument("--decode-steps", type=int, default=32)
    p.add_argument("--prefix-len", type=int, default=0,
                   help="also time the forward of --prefill-len new tokens after a cached prefix of this many "
                   "(a radix-cache hit or a later chunk; the forward alone)")  # fmt: skip
    p.add_argument(
        "--hf", action="store_true", help="also run transformers generate (batch 1 and the largest)"
    )
    p.add_argument("--hf-new-tokens", type=int, default=32)
    p.add_argument("--output-json", default=None)
    args = p.parse_args()
    batches = [int(b) for b in args.batch_sizes.split(",")]
    profile_at = {int(b) for b in args.profile_batch_sizes.split(",") if b}
    max_tokens = max(batches) * (args.context_len + 2 * args.decode_steps + 64) + args.prefill_len + 4096
    max_tokens += args.prefix_len
    t0 = time.perf_counter()
    if args.moe_kernel == "torch":
        moe.fused_moe_available = lambda: False
    print(f"loading {args.model_path or 'default model'} (tp {args.tp}) ...", flush=True)
    engine = Engine(
        model_path=args.model_path,
        load_format=args.load_format,
        attention_backend=args.attention_backend,
        decode_attention_backend=args.decode_attention_backend,
        max_total_tokens=max_tokens,
        chunked_prefill_size=max(args.prefill_len, 8192),
        max_prefill_tokens=1 << 20,
        max_running_requests=max(batches) + 8,
        disable_radix_cache=True,
        tp=args.tp,
        ep=args.ep,
        moe_a2a_backend=args.moe_a2a_backend,
        deepep_mode=args.deepep_mode,
        disable_cuda_graph=args.disable_cuda_graph,
        disable_prefill_cuda_graph=args.disable_prefill_cuda_graph,
        prefill_cuda_graph_max_tokens=max(args.prefill_len, 4096),
        disable_overlap_schedule=args.disable_overlap_schedule,
        disable_shared_experts_fusion=args.disable_shared_experts_fusion,
        json_model_override_args=args.json_model_override_args,
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
    traffic = weight_traffic(sched.runner.model)
    kv_tok = kv_bytes_per_token(sched)
    print(f"  weights by use {traffic}", flush=True)
    rows = []
    for b in batches:
        print(f"[{time.perf_counter() - t0:.0f} s] decode batch {b} ...", flush=True)
        step, fwd, touched = bench_decode(sched, b, args.context_len, args.decode_steps, b in profile_at)
        rows.append(decode_row(traffic, kv_tok, ceil, b, args.context_len, step, fwd, touched))
        print(f"  {rows[-1]}", flush=True)
    print(f"[{time.perf_counter() - t0:.0f} s] prefill {args.prefill_len} tokens ...", flush=True)
    t, fwd, split = bench_prefill(sched, args.prefill_len)
    rows.append(prefill_row(traffic, ceil, sched.runner.hf_config, args.prefill_len, args.tp, t, fwd) | split)
    if args.profile_prefill:
        profile_prefill(sched, args.prefill_len)
    print(f"  {rows[-1]}", flush=True)
    if args.prefix_len:
        print(
            f"[{time.perf_counter() - t0:.0f} s] {args.prefill_len} tokens after {args.prefix_len} cached ..."
        )
        fwd = bench_prefix_prefill(sched.runner, args.prefix_len, args.prefill_len)
        c = sched.runner.hf_config
        rows.append(
            prefill_row(traffic, ceil, c, args.prefill_len, args.tp, fwd, fwd, prefix=args.prefix_len)
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
    print_report(ceil, traffic, kv_tok, rows, gen)
    if args.output_json:  # NOTE: before the shutdown, which waits for the other ranks to leave
        with open(args.output_json, "w") as f:
            json.dump(
                dict(
                    ceilings=ceil,
                    weights=traffic,
                    rows=rows,
                    generate=gen,
                    device=str(device),
                    args=vars(args),
                ),
                f,
                indent=2,
            )
    engine.shutdown()


def decode_row(traffic: dict, kv_tok: int, ceil: dict, batch: int, context: int, step, fwd, touched) -> dict:
    """A decode step beside its roofline: the bytes it must read (dense weights, the LM head, the
    experts it touched, the KV cache) over the copy bandwidth measured in this run."""
    expert_bytes = traffic["moe_layers"] * touched * traffic["expert_bytes"]
    nbytes = traffic["dense_bytes"] + expert_bytes + batch * context * kv_tok
    roof = nbytes / (ceil["copy_gb_s"] * 1e9)
    return dict(
        kind="decode",
        batch=batch,
        context=context,
        ms=step * 1e3,
        forward_ms=fwd * 1e3,
        touched_experts=touched,
        read_gb=nbytes / 1e9,
        roofline_ms=roof * 1e3,
        of_roofline=roof / step,
        forward_of_roofline=roof / fwd,
        tok_s=batch / step,
    )


def prefill_row(
    traffic: dict, ceil: dict, c, n: int, tp: int, seconds: float, forward_s: float = 0.0, prefix: int = 0
) -> dict:
    """A prefill of n tokens (after `prefix` cached ones) beside its roofline: matmul FLOPs by active
    experts (k routed slots a token, the share on this rank), the LM head once (only the last token's
    logits), causal attention over the prefix and the new tokens, over the matmul rate measured in this
    run; or the weight read, if that is longer."""
    active = (
        traffic["dense_params"]
        + traffic["moe_layers"] * traffic.get("local_slots", 0) * traffic["expert_params"]
    )
    # per head: q.k over the query/key dim, p.v over the value dim (MLA: 192 and 128, not the latent's)
    qk_v = c.qk_nope_head_dim + c.qk_rope_head_dim + c.v_head_dim if is_mla(c) else 2 * head_dim_of(c)
    attn = 2 * c.num_hidden_layers * (c.num_attention_heads // tp) * qk_v * n * (prefix + n / 2)
    flops = 2 * active * n + 2 * traffic["head_params"] + attn
    touched = min(traffic.get("num_local", 0), n * traffic.get("local_slots", 0))  # at most all, at most n*k
    experts_read = traffic["moe_layers"] * traffic["expert_bytes"] * touched
    roof = max(
        flops / (ceil["matmul_tflops"] * 1e12),
        (traffic["dense_bytes"] + experts_read) / (ceil["copy_gb_s"] * 1e9),
    )
    return dict(
        kind="prefill",
        batch=1,
        context=n,
        prefix=prefix,
        ms=seconds * 1e3,
        forward_ms=forward_s * 1e3,
        tok_s=n / seconds,
        tflop=flops / 1e12,
        tflops=flops / seconds / 1e12,
        roofline_ms=roof * 1e3,
        of_matmul=flops / seconds / 1e12 / ceil["matmul_tflops"],
        of_roofline=roof / seconds,
    )


def print_report(ceil: dict, traffic: dict, kv_tok: int, rows: list[dict], gen: list[dict]) -> None:
    print(
        f"\nceilings (this run): copy {ceil['copy_gb_s']:.0f} GB/s, matmul {ceil['matmul_tflops']:.1f} TFLOP/s"
        + (f" (FP8 {ceil['fp8_matmul_tflops']:.1f})" if "fp8_matmul_tflops" in ceil else "")
        + "; "
        f"dense weights {traffic['dense_bytes'] / 1e9:.2f} GB, one expert {traffic['expert_bytes'] / 1e6:.1f} MB "
        f"x {traffic['moe_layers']} MoE layers, KV {kv_tok / 1024:.0f} KiB/token"
    )
    print(
        f"{'kind':8} {'batch':>5} {'ctx':>6} {'ms':>9} {'fwd ms':>8} {'tok/s':>10} {'experts':>8} {'work':>10} "
        f"{'roofline ms':>12} {'% of roof':>10} {'fwd %':>7}"
    )
    for r in rows:
        if r["kind"] == "decode":
            print(
                f"{'decode':8} {r['batch']:>5} {r['context']:>6} {r['ms']:>9.2f} {r['forward_ms']:>8.2f} "
                f"{r['tok_s']:>10.1f} {r['touched_experts']:>8.1f} {r['read_gb']:>7.2f} GB {r['roofline_ms']:>12.2f} "
                f"{100 * r['of_roofline']:>9.1f}% {100 * r['forward_of_roofline']:>6.1f}%"
            )
        else:
            print(
                f"{'extend' if r.get('prefix') else 'prefill':8} {r['batch']:>5} {r['context']:>6} {r['ms']:>9.2f} {r['forward_ms']:>8.2f} {r['tok_s']:>10.1f} "
                f"{'':>8} {r['tflop']:>7.2f} TF {r['roofline_ms']:>12.2f} {100 * r['of_roofline']:>9.1f}% "
                f"(matmul rate {100 * r['of_matmul']:.1f}%: {r['tflops']:.1f} TFLOP/s)"
                + (f", after {r['prefix']} cached tokens (the forward alone)" if r.get("prefix") else "")
            )
            if "prepare_ms" in r:  # the eager forward's host / device split (prefill_host_split)
                device = (
                    f", the device's layers {r['device_layers_ms']:.2f}" if "device_layers_ms" in r else ""
                )
                print(
                    f"{'':8} forward {r['total_ms']:.2f} ms: host prepare {r['prepare_ms']:.2f} (nothing queued; "
                    f"the attention plan {r['plan_ms']:.2f}), "
                    f"host launch {r['launch_ms']:.2f}{device}"
                )
    if gen:
        print(f"\n{'generate':8} {'batch':>5} {'ours tok/s':>11} {'HF tok/s':>10} {'speed-up':>9}")
        for g in gen:
            print(
                f"{'':8} {g['batch']:>5} {g['ours_tok_s']:>11.1f} {g['hf_tok_s']:>10.1f} {g['speedup']:>8.2f}x"
            )


if __name__ == "__main__":
    main()
