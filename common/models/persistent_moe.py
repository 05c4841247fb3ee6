"""One token's whole MoE block (router GEMV, softmax top-k, gate/up GEMV with SiLU·mul, down GEMV
with the routing-weight combine), optionally with the decoder layer's post-attention add-RMSNorm
before it, as ONE persistent Triton launch: an experiment, in the engine only behind
DISAGG_PERSISTENT_MOE=1 (off by default: moe.py, SparseMoE.persistent_block) until a GPU measures it
(common/bench/persistent_moe.py times it against the engine's chain of six launches).

Why: at batch 1 a decode step is launch-bound. On an H200 a Qwen3-30B-A3B layer's norm and MoE are
six launches (add-RMSNorm 2.6, router 2.0, top-k 2.1, gate/up 15.7, down 8.5, sum 1.3 µs, PDL off)
for 18.3 µs of bytes, and every fusion of two launches into one tried so far lost in the engine
(docs/benchmarks.md). A persistent launch keeps the stages' parallelism (each stage is many small
tasks, as the separate grids were) and replaces the kernel boundaries by counters in global memory;
the norm needs no stage of its own (every router task norms the token itself).

How: the stages' tasks are numbered in stage order, [router tiles | gate/up tiles | down tiles];
each program takes tasks in increasing order (DYNAMIC: the next ticket of an atomic counter; else
task pid, pid + P, ...). A task of stage s first waits until stage s - 1 has finished (its counter
reaches the stage's task count: an acquire), then works and adds one to its own stage's counter (a
release). The last router task to finish (its count returns the stage's size - 1) routes the token
(top-k over the logits) and counts once more; the gate/up tasks wait for that extra count. The last
program to leave zeroes the counters for the next launch (no memset launch).

NOTE (deadlock): a waiting task only waits on tasks numbered before it, so it finishes as long as
the programs holding those tasks run. DYNAMIC hands a task only to a running program, so any grid
is safe (Triton's interpreter, which runs the programs one after another, included); static
assignment needs every program resident at once (a grid of at most the SM count).
NOTE (faults): a wait gives up after WAIT_POLLS reads (a stage that never finishes: counters a bug
left wrong). A gate/up task that gave up neither works nor counts, so every down task gives up as
well and writes its rows as NaN: the launch ends within seconds and the request ends with the
sampler's numerical error (common/engine/sampling.py) instead of a hung GPU; the last program out
still zeroes the counters, so the next launch starts clean.
NOTE (memory): data another program wrote (logits, slots, activations) is read with `.cg` loads
(L2, past a possibly stale L1) after the acquire; each release follows a CTA barrier so every
thread's stores are issued first (CUTLASS's generic barrier does the same).
"""

from __future__ import annotations

import torch
from disagg.common.config import triton_interpret
from disagg.common.models.fused_moe import default_down_block_k
from disagg.common.models.pdl import pdl_args, pdl_begin

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU image: no Triton kernel runs
    triton = None

# counters: [0] the next task's ticket (DYNAMIC), [1] router tasks done, [2] gate/up tasks done,
# [3] programs done (the last one zeroes all four)
NUM_COUNTERS = 4
# the reads a wait makes before it gives up (~0.5-1 µs each on a GPU: seconds; the tests set fewer)
WAIT_POLLS = 1 << 22
# the block sizes: BLOCK_E router rows a task (all of H at once: a task's loads in flight together);
# BLOCK_N gate (and up) rows x BLOCK_K columns a step; DOWN_N down rows a task, DOWN_K columns a step
# (0: fused_moe.default_down_block_k, the engine's GEMV's). The engine's tuned GEMV entries for Qwen3-30B-A3B on an
# H200 (16 x 512, 8 warps; down 8 rows) are the starting point. PIPELINE: the tasks that load the next K
# tile while summing one (down: the slots' tiles as one sequence); for the bench until a GPU says which wins.
DEFAULT_BLOCKS = {
    "BLOCK_E": 4, "BLOCK_N": 16, "BLOCK_K": 512, "DOWN_N": 8, "DOWN_K": 0, "PIPELINE": False, "num_warps": 8
}  # fmt: skip


def persistent_moe_available() -> bool:
    """Triton on a CUDA machine, or its CPU interpreter (the tests' engines)."""
    return triton is not None and (torch.cuda.is_available() or triton_interpret())


def persistent_moe(
    x: torch.Tensor,
    router_w: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    top_k: int,
    renormalize: bool,
    scaling: float = 1.0,
    shared: int = 0,
    programs: int = 0,
    dynamic: bool = True,
    blocks: dict | None = None,
    scratch: dict | None = None,
    trace: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    norm_weight: torch.Tensor | None = None,
    eps: float = 1e-6,
) -> torch.Tensor:
    """softmax top-k routing of x [1, H] over router_w [E, H], then sum over the k slots (and
    `shared` more slots: experts E, E + 1, ... of w13 / w2, weight 1) of weight * w2[e] @
    (silu(gate) * up) with gate | up = w13[e] @ x: w13 [E + shared, 2I, H], w2 [E + shared, H, I].
    Returns [1, H] in x's dtype. programs: the grid (default: the SM count; 1 under the interpreter
    unless asked; -1: as many as the GPU holds at once, resident_programs). scratch: the buffers of
    an earlier call (CUDA graphs: the counters must persist).
    trace (GPU only; the bench): int64 [tasks, 4] filled with each task's claim, end of wait and end
    (the GPU's global timer, ns) and program (num_tasks gives the row count).
    residual, norm_weight: x is the attention's output delta [1, H]: the block's input is
    rms_norm(x + residual) * norm_weight (the decoder layer's post-attention norm, done by the router
    tasks: no launch of its own), and residual becomes x + residual in place, as FlashInfer's fused
    add-RMSNorm leaves it."""
    if x.shape[0] != 1:
        raise ValueError(f"persistent_moe runs one token, got {x.shape[0]}")
    (num_experts, hidden), inter = router_w.shape, w2.shape[2]
    slots = top_k + shared
    b = {**DEFAULT_BLOCKS, **(blocks or {})}
    down_k = b["DOWN_K"] or default_down_block_k(inter)
    s = scratch if scratch is not None else new_scratch(num_experts, slots, inter, x.device)
    out = torch.empty_like(x)
    norm = residual is not None
    if norm and (s["x"] is None or s["x"].shape != x.shape or s["x"].dtype != x.dtype):
        s["x"] = torch.empty_like(x)
    delta, x = (x, s["x"]) if norm else (x, x)  # with the norm: x is the normed input the kernel writes
    args = (
        x, router_w, w13, w2, out, s["logits"], s["act"], s["top_w"], s["top_id"], s["counters"],
        s["counters"] if trace is None else trace,
        delta, residual if norm else x, norm_weight if norm else x, float(eps),
        num_experts, hidden, inter, router_w.stride(0), w13.stride(0), w13.stride(1), w2.stride(0), w2.stride(1),
        float(scaling),
    )  # fmt: skip
    meta = dict(
        K=top_k, SHARED=shared, K_POW2=triton.next_power_of_2(slots), E_POW2=triton.next_power_of_2(num_experts),
        RENORMALIZE=renormalize, DYNAMIC=dynamic, BLOCK_E=b["BLOCK_E"], ROUTER_K=triton.next_power_of_2(hidden),
        BLOCK_N=b["BLOCK_N"], BLOCK_K=b["BLOCK_K"], DOWN_N=b["DOWN_N"], DOWN_K=down_k, WAIT_POLLS=WAIT_POLLS,
        NORM=norm, PIPELINE=b["PIPELINE"], TRACE=trace is not None, num_warps=b["num_warps"],
        **pdl_args(x.device),
    )  # fmt: skip
    if programs < 0:  # every program resident at once (the bench's static assignment)
        programs = resident_programs(_moe_block_kernel.warmup(*args, grid=(1,), **meta), x.device)
    elif not programs:
        programs = torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 1
    _moe_block_kernel[(programs,)](*args, **meta)
    return out


def resident_programs(kernel, device: torch.device) -> int:
    """The programs of this compiled kernel the GPU holds at once: the SM count times what one SM's
    registers, threads and shared memory allow (registers allocated 256 a warp at a time)."""
    props = torch.cuda.get_device_properties(device)
    kernel._init_handles()  # loads the binary: n_regs is known from then on
    warps = kernel.metadata.num_warps
    regs_a_warp = -(-max(kernel.n_regs, 1) * 32 // 256) * 256
    fits = [
        getattr(props, "regs_per_multiprocessor", 65536) // (regs_a_warp * warps),
        getattr(props, "max_threads_per_multi_processor", 2048) // (32 * warps),
        32,
    ]
    if kernel.metadata.shared:
        fits.append(getattr(props, "shared_memory_per_multiprocessor", 233472) // kernel.metadata.shared)
    return props.multi_processor_count * max(1, min(fits))


def num_tasks(num_experts: int, hidden: int, inter: int, slots: int, blocks: dict | None = None) -> list[int]:
    """The tasks of each stage (router, gate/up, down) at these block sizes."""
    b = {**DEFAULT_BLOCKS, **(blocks or {})}
    return [-(-num_experts // b["BLOCK_E"]), slots * -(-inter // b["BLOCK_N"]), -(-hidden // b["DOWN_N"])]


def new_scratch(num_experts: int, slots: int, inter: int, device: torch.device) -> dict:
    """The launch's buffers: logits [E], slots' weights / experts [slots], activations [slots, I]
    (float32), the normed input when the launch norms it (x's shape and dtype: made at its first such
    launch; written before it is read, each launch), and the counters (zeroed once here; each launch
    leaves them zero)."""
    f32 = dict(dtype=torch.float32, device=device)
    return dict(
        x=None,
        logits=torch.empty(num_experts, **f32),
        act=torch.empty(slots, inter, **f32),
        top_w=torch.empty(slots, **f32),
        top_id=torch.empty(slots, dtype=torch.int32, device=device),
        counters=torch.zeros(NUM_COUNTERS, dtype=torch.int32, device=device),
    )


def reference(
    x, router_w, w13, w2, top_k: int, renormalize: bool, scaling: float = 1.0, shared: int = 0,
    residual=None, norm_weight=None, eps: float = 1e-6,
):  # fmt: skip
    """The same block in float32 torch: the result persistent_moe must give (to rounding). With
    `residual`: (the block of rms_norm(x + residual) * norm_weight, x + residual), residual untouched."""
    if residual is not None:
        summed = x.float() + residual.float()
        normed = summed * torch.rsqrt(summed.pow(2).mean(-1, keepdim=True) + eps) * norm_weight.float()
        block = reference(normed.to(x.dtype), router_w, w13, w2, top_k, renormalize, scaling, shared)
        return block, summed.to(residual.dtype)
    x32 = x.float()[0]
    # the logits rounded to the gate's dtype, as nn.Linear and the engine's router GEMV store them
    p = torch.softmax((router_w.float() @ x32).to(router_w.dtype).float(), -1)
    weights, ids = p.topk(top_k)
    if renormalize:
        weights = weights / weights.sum()
    weights = torch.cat([weights * scaling, torch.ones(shared, device=x.device)])
    ids = torch.cat([ids, torch.arange(shared, device=x.device) + router_w.shape[0]])
    inter = w2.shape[2]
    out = torch.zeros_like(x32)
    for w, e in zip(weights.tolist(), ids.tolist(), strict=True):
        gate_up = w13[e].float() @ x32
        out += w * (w2[e].float() @ (torch.nn.functional.silu(gate_up[:inter]) * gate_up[inter:]))
    return out[None].to(x.dtype)


if triton is not None:

    @triton.jit
    def _now():
        """The GPU's global timer (ns; one clock for every SM)."""
        return tl.inline_asm_elementwise(
            "mov.u64 $0, %globaltimer;", "=l", [], dtype=tl.int64, is_pure=False, pack=1
        )

    @triton.jit
    def _wait(counter, target, POLLS: tl.constexpr):
        """Until `counter` reaches target (acquire: the counted tasks' stores visible after it), at most
        POLLS reads; returns whether it did."""
        polls = 0
        while (tl.atomic_add(counter, 0, sem="acquire", scope="gpu") < target) & (polls < POLLS):
            polls += 1
        return polls < POLLS

    @triton.jit
    def _nan_rows(out, tile, hidden, DOWN_N: tl.constexpr):
        """The tile's output rows as NaN: a stage never finished (the module's NOTE on faults)."""
        rows = tile * DOWN_N + tl.arange(0, DOWN_N)
        tl.store(
            out + rows,
            tl.full([DOWN_N], float("nan"), tl.float32).to(out.dtype.element_ty),
            mask=rows < hidden,
        )

    @triton.jit
    def _count(counter):
        """One more task done (release, after every thread of the program issued its stores; acquire:
        the caller that sees the last count sees every counted task's stores); returns the count before."""
        tl.debug_barrier()
        return tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu")

    @triton.jit
    def _route(logits, top_w, top_id, num_experts, scaling, K: tl.constexpr, SHARED: tl.constexpr,
               K_POW2: tl.constexpr, E_POW2: tl.constexpr, RENORMALIZE: tl.constexpr):  # fmt: skip
        """softmax over the logits, K rounds of argmax (ties: the lowest id), renormalised if asked,
        times scaling; then SHARED slots (experts E, E + 1, ...; weight 1)."""
        experts = tl.arange(0, E_POW2)
        z = tl.load(logits + experts, mask=experts < num_experts, other=-float("inf"), cache_modifier=".cg")
        p = tl.exp(z - tl.max(z, axis=0))
        p = p / tl.sum(p, axis=0)
        slots = tl.arange(0, K_POW2)
        w = tl.zeros([K_POW2], dtype=tl.float32)
        ids = slots - K + num_experts  # the shared slots' experts; the routed ones set below
        for j in tl.static_range(K):
            best = tl.max(p, axis=0)
            pick = tl.min(tl.where(p == best, experts, E_POW2), axis=0)
            w = tl.where(slots == j, best, w)
            ids = tl.where(slots == j, pick, ids)
            p = tl.where(experts == pick, -1.0, p)
        if RENORMALIZE:
            w = w / tl.sum(w, axis=0)
        w = tl.where(slots < K, w * scaling, 1.0)
        tl.store(top_w + slots, w, mask=slots < K + SHARED)
        tl.store(top_id + slots, ids, mask=slots < K + SHARED)

    @triton.jit
    def _normed_x(delta, residual, norm_w, eps, hidden, x_dtype: tl.constexpr, ROUTER_K: tl.constexpr):
        """(rms_norm(delta + residual) * norm_w rounded to x_dtype, delta + residual): FlashInfer's fused
        add-RMSNorm in float32, one rounding."""
        cols = tl.arange(0, ROUTER_K)
        summed = tl.load(delta + cols, mask=cols < hidden, other=0.0).to(tl.float32)
        summed += tl.load(residual + cols, mask=cols < hidden, other=0.0).to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(summed * summed, axis=0) / hidden + eps)
        w = tl.load(norm_w + cols, mask=cols < hidden, other=0.0).to(tl.float32)
        return (summed * rstd * w).to(x_dtype), summed

    @triton.jit
    def _router_task(xv, router_w, logits, tile, num_experts, hidden, stride_re,
                     BLOCK_E: tl.constexpr, ROUTER_K: tl.constexpr):  # fmt: skip
        """logits[tile's BLOCK_E experts] = router_w rows . x (xv: [ROUTER_K] in x's dtype; float32
        sums), the rows loaded at once (ROUTER_K >= hidden: the route waits on the slowest router task)."""
        xv = xv.to(tl.float32)
        rows = tile * BLOCK_E + tl.arange(0, BLOCK_E)
        cols = tl.arange(0, ROUTER_K)
        mask = (rows[:, None] < num_experts) & (cols[None, :] < hidden)
        w = tl.load(router_w + rows[:, None].to(tl.int64) * stride_re + cols[None, :], mask=mask, other=0.0)
        acc = tl.sum(w.to(tl.float32) * xv[None, :], axis=1)
        # the logits in the gate weight's dtype, as nn.Linear (and the engine's router GEMV) rounds them
        tl.store(logits + rows, acc.to(router_w.dtype.element_ty).to(tl.float32), mask=rows < num_experts)

    @triton.jit
    def _gate_up_task(x, w13, act, top_id, slot, tile, hidden, inter, stride_we, stride_wn,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
        """act[slot, tile's BLOCK_N rows] = silu(gate) * up of the slot's expert."""
        expert = tl.load(top_id + slot, cache_modifier=".cg").to(tl.int64)
        rows = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        gate_rows = w13 + expert * stride_we + rows[:, None].to(tl.int64) * stride_wn
        up_rows = gate_rows + inter * stride_wn
        acc_g = tl.zeros([BLOCK_N], dtype=tl.float32)
        acc_u = tl.zeros([BLOCK_N], dtype=tl.float32)
        for k0 in range(0, hidden, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            xv = tl.load(x + cols, mask=cols < hidden, other=0.0, cache_modifier=".cg").to(tl.float32)
            mask = (rows[:, None] < inter) & (cols[None, :] < hidden)
            acc_g += tl.sum(
                tl.load(gate_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32) * xv[None, :], 1
            )
            acc_u += tl.sum(
                tl.load(up_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32) * xv[None, :], 1
            )
        act_rows = acc_g / (1.0 + tl.exp(-acc_g)) * acc_u
        tl.store(act + slot * inter + rows, act_rows, mask=rows < inter)

    @triton.jit
    def _down_task(w2, act, top_w, top_id, out, tile, hidden, inter, stride_de, stride_dn,
                   SLOTS: tl.constexpr, DOWN_N: tl.constexpr, DOWN_K: tl.constexpr):  # fmt: skip
        """out[tile's DOWN_N rows] = sum over the slots of weight * w2[expert] rows . act[slot]."""
        rows = tile * DOWN_N + tl.arange(0, DOWN_N)
        acc = tl.zeros([DOWN_N], dtype=tl.float32)
        for j in tl.static_range(SLOTS):  # unrolled: the next slot's rows may load during this one's sums
            expert = tl.load(top_id + j, cache_modifier=".cg").to(tl.int64)
            w_rows = w2 + expert * stride_de + rows[:, None].to(tl.int64) * stride_dn
            part = tl.zeros([DOWN_N], dtype=tl.float32)
            for k0 in range(0, inter, DOWN_K):
                cols = k0 + tl.arange(0, DOWN_K)
                a = tl.load(act + j * inter + cols, mask=cols < inter, other=0.0, cache_modifier=".cg")
                mask = (rows[:, None] < hidden) & (cols[None, :] < inter)
                part += tl.sum(
                    tl.load(w_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32) * a[None, :], 1
                )
            acc += part * tl.load(top_w + j, cache_modifier=".cg")
        tl.store(out + rows, acc.to(out.dtype.element_ty), mask=rows < hidden)

    @triton.jit
    def _gate_up_task_pipelined(x, w13, act, top_id, slot, tile, hidden, inter, stride_we, stride_wn,
                                BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
        """_gate_up_task with the next K tile's rows loading while this one's are summed (registers
        hold two tiles: one task's loads overlap instead of one latency a tile)."""
        expert = tl.load(top_id + slot, cache_modifier=".cg").to(tl.int64)
        rows = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        gate_rows = w13 + expert * stride_we + rows[:, None].to(tl.int64) * stride_wn
        up_rows = gate_rows + inter * stride_wn
        cols = tl.arange(0, BLOCK_K)
        mask = (rows[:, None] < inter) & (cols[None, :] < hidden)
        g = tl.load(gate_rows + cols[None, :], mask=mask, other=0.0)
        u = tl.load(up_rows + cols[None, :], mask=mask, other=0.0)
        acc_g = tl.zeros([BLOCK_N], dtype=tl.float32)
        acc_u = tl.zeros([BLOCK_N], dtype=tl.float32)
        for k0 in range(BLOCK_K, hidden + BLOCK_K, BLOCK_K):  # loads the tile at k0, sums the one before
            xv = tl.load(x + k0 - BLOCK_K + cols, mask=k0 - BLOCK_K + cols < hidden, other=0.0,
                         cache_modifier=".cg").to(tl.float32)  # fmt: skip
            mask = (rows[:, None] < inter) & (k0 + cols[None, :] < hidden)  # past the end: loads nothing
            next_g = tl.load(gate_rows + k0 + cols[None, :], mask=mask, other=0.0)
            next_u = tl.load(up_rows + k0 + cols[None, :], mask=mask, other=0.0)
            acc_g += tl.sum(g.to(tl.float32) * xv[None, :], 1)
            acc_u += tl.sum(u.to(tl.float32) * xv[None, :], 1)
            g, u = next_g, next_u
        act_rows = acc_g / (1.0 + tl.exp(-acc_g)) * acc_u
        tl.store(act + slot * inter + rows, act_rows, mask=rows < inter)

    @triton.jit
    def _down_task_pipelined(w2, act, top_w, top_id, out, tile, hidden, inter, stride_de, stride_dn,
                             SLOTS: tl.constexpr, SLOTS_POW2: tl.constexpr, DOWN_N: tl.constexpr,
                             DOWN_K: tl.constexpr):  # fmt: skip
        """_down_task over the slots' K tiles as one sequence: the slots' experts and weights read
        once up front (no expert id load between a slot's rows), the next tile's rows loading while
        this one's are summed, each activation tile scaled by its slot's weight."""
        rows = tile * DOWN_N + tl.arange(0, DOWN_N)
        row_ptrs = w2 + rows[:, None].to(tl.int64) * stride_dn
        slots = tl.arange(0, SLOTS_POW2)
        ids = tl.load(top_id + slots, mask=slots < SLOTS, other=0, cache_modifier=".cg").to(tl.int64)
        weights = tl.load(top_w + slots, mask=slots < SLOTS, other=0.0, cache_modifier=".cg")
        chunks = tl.cdiv(inter, DOWN_K)  # K tiles a slot
        cols = tl.arange(0, DOWN_K)
        mask = (rows[:, None] < hidden) & (cols[None, :] < inter)
        w = tl.load(
            row_ptrs + tl.sum(tl.where(slots == 0, ids, 0), 0) * stride_de + cols[None, :],
            mask=mask,
            other=0.0,
        )
        acc = tl.zeros([DOWN_N], dtype=tl.float32)
        for c in range(1, SLOTS * chunks + 1):  # loads tile c, sums tile c - 1
            j, k0 = (c - 1) // chunks, ((c - 1) % chunks) * DOWN_K
            a = tl.load(act + j * inter + k0 + cols, mask=k0 + cols < inter, other=0.0, cache_modifier=".cg")
            a *= tl.sum(tl.where(slots == j, weights, 0.0), 0)
            j, k0 = c // chunks, (c % chunks) * DOWN_K
            expert = tl.sum(tl.where(slots == j, ids, 0), 0)
            past = (j // SLOTS) * inter  # inter past the last slot (j == SLOTS: the mask loads nothing)
            mask = (rows[:, None] < hidden) & (past + k0 + cols[None, :] < inter)
            next_w = tl.load(row_ptrs + expert * stride_de + k0 + cols[None, :], mask=mask, other=0.0)
            acc += tl.sum(w.to(tl.float32) * a[None, :], 1)
            w = next_w
        tl.store(out + rows, acc.to(out.dtype.element_ty), mask=rows < hidden)

    @triton.jit
    def _moe_block_kernel(
        x, router_w, w13, w2, out, logits, act, top_w, top_id, counters, trace, delta, residual, norm_w, eps,
        num_experts, hidden, inter, stride_re, stride_we, stride_wn, stride_de, stride_dn, scaling,
        K: tl.constexpr, SHARED: tl.constexpr, K_POW2: tl.constexpr, E_POW2: tl.constexpr,
        RENORMALIZE: tl.constexpr, DYNAMIC: tl.constexpr, BLOCK_E: tl.constexpr, ROUTER_K: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOWN_N: tl.constexpr, DOWN_K: tl.constexpr,
        NORM: tl.constexpr, PIPELINE: tl.constexpr, WAIT_POLLS: tl.constexpr, TRACE: tl.constexpr,
        PDL: tl.constexpr,
    ):  # fmt: skip
        """Program: tasks in increasing order until none is left (the module's docstring)."""
        pdl_begin(PDL)  # first: before any load or store (pdl.py)
        SLOTS: tl.constexpr = K + SHARED
        routers = tl.cdiv(num_experts, BLOCK_E)
        up_tiles = tl.cdiv(inter, BLOCK_N)
        gate_ups = SLOTS * up_tiles
        total = routers + gate_ups + tl.cdiv(hidden, DOWN_N)
        if DYNAMIC:
            task = tl.atomic_add(counters, 1, sem="relaxed", scope="gpu")
        else:
            task = tl.program_id(0)
        while task < total:
            if TRACE:
                t0 = _now()
                t1 = t0
            if task < routers:
                cols = tl.arange(0, ROUTER_K)
                if NORM:  # every router task norms x itself: no stage before it
                    xv, summed = _normed_x(delta, residual, norm_w, eps, hidden, x.dtype.element_ty, ROUTER_K)
                else:
                    xv = tl.load(x + cols, mask=cols < hidden, other=0.0)
                _router_task(xv, router_w, logits, task, num_experts, hidden, stride_re, BLOCK_E, ROUTER_K)
                if _count(counters + 1) == routers - 1:
                    # the last router task (every other one's logits visible, and every router task done
                    # reading the residual): the normed x for the gate/up tasks and the new residual, in
                    # place (as FlashInfer's fused add-RMSNorm), the route, then one more count
                    if NORM:
                        tl.store(x + cols, xv, mask=cols < hidden)
                        tl.store(residual + cols, summed.to(residual.dtype.element_ty), mask=cols < hidden)
                    _route(
                        logits, top_w, top_id, num_experts, scaling, K, SHARED, K_POW2, E_POW2, RENORMALIZE
                    )
                    _count(counters + 1)
            elif task < routers + gate_ups:
                # timed out (no route: its experts unknown): no work and no count, so the down tasks
                # time out too and write NaN
                if _wait(counters + 1, routers + 1, WAIT_POLLS):
                    if TRACE:
                        t1 = _now()
                    t = task - routers
                    if PIPELINE:
                        _gate_up_task_pipelined(
                            x, w13, act, top_id, t // up_tiles, t % up_tiles, hidden, inter, stride_we,
                            stride_wn, BLOCK_N, BLOCK_K,
                        )  # fmt: skip
                    else:
                        _gate_up_task(
                            x, w13, act, top_id, t // up_tiles, t % up_tiles, hidden, inter, stride_we,
                            stride_wn, BLOCK_N, BLOCK_K,
                        )  # fmt: skip
                    _count(counters + 2)
            else:
                tile = task - routers - gate_ups
                if _wait(counters + 2, gate_ups, WAIT_POLLS):
                    if TRACE:
                        t1 = _now()
                    if PIPELINE:
                        _down_task_pipelined(
                            w2, act, top_w, top_id, out, tile, hidden, inter, stride_de, stride_dn, SLOTS,
                            K_POW2, DOWN_N, DOWN_K,
                        )  # fmt: skip
                    else:
                        _down_task(
                            w2, act, top_w, top_id, out, tile, hidden, inter, stride_de, stride_dn, SLOTS,
                            DOWN_N, DOWN_K,
                        )  # fmt: skip
                else:
                    _nan_rows(out, tile, hidden, DOWN_N)
            if TRACE:  # [task]: claimed, its wait over, done (globaltimer ns), the program
                row = trace + task.to(tl.int64) * 4
                tl.store(row, t0)
                tl.store(row + 1, t1)
                tl.store(row + 2, _now())
                tl.store(row + 3, tl.program_id(0).to(tl.int64))
            if DYNAMIC:
                task = tl.atomic_add(counters, 1, sem="relaxed", scope="gpu")
            else:
                task += tl.num_programs(0)
        if tl.atomic_add(counters + 3, 1, sem="acq_rel", scope="gpu") == tl.num_programs(0) - 1:
            tl.store(counters + tl.arange(0, 4), tl.zeros([4], dtype=tl.int32))  # NUM_COUNTERS
