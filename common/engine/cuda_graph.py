"""CUDA graphs for decode batches: one graph per batch-size bucket, captured at start-up.

A decode step of a large model at small batch is dominated by kernel launches (hundreds per step);
replaying a captured graph removes them. Inputs live in static buffers; a batch of size b runs the
graph of the smallest bucket >= b, the extra rows padded onto the pool's `pad_page`. FlashInfer's
planning (host work) happens before the replay, outside the graph. MLA models (DeepSeek) capture
FlashInfer's MLA decode kernel the same way (`_GraphMLADecodeBackend`). With
`--decode-attention-backend triton` (auto: in the small buckets) the graphs run the Triton split-KV
kernels instead (`_GraphTritonDecodeBackend`: a fixed page table and length buffer each bucket,
filled before the replay; the number of KV splits fixed per bucket at capture).
"""

from __future__ import annotations

import bisect
import itertools
import logging

import torch
from disagg.common.config import mla_kernel
from disagg.common.engine.attention import AttentionBackend, ForwardBatch, MLABackend
from disagg.common.engine.attention_flashinfer import (
    flashinfer_mla_api,
    mla_metadata,
    paged_kv_layout,
    plan_mla,
    run_mla_wrapper,
)
from disagg.common.engine.device_wait import host_tensor
from disagg.common.models.deepseek import is_mla, softmax_scale
from disagg.common.models.fused_moe import device_name

logger = logging.getLogger(__name__)


class PlanFence:
    """Orders FlashInfer plans behind the previous plan's host-to-device copy.

    NOTE: a plan fills a pinned host buffer that an async copy reads only when the stream gets
    there; with a step in flight (the overlap scheduler) the next plan must not refill the buffer
    before that copy ran. It runs right after the step before it, so `wait` rarely waits."""

    def __init__(self) -> None:
        self._event: torch.cuda.Event | None = None

    def wait(self) -> None:
        if self._event is not None:
            self._event.synchronize()

    def record(self) -> None:
        self._event = torch.cuda.Event()
        self._event.record()


def batch_buckets(max_bs: int) -> list[int]:
    sizes = [1, 2, 4, 8] + list(range(16, max_bs + 1, 8))
    return sorted({s for s in sizes if s <= max_bs} | {max_bs})


class _GraphDecodeBackend(AttentionBackend):
    """FlashInfer decode with fixed buffers (required inside a CUDA graph), one per bucket."""

    def __init__(self, pool, num_qo_heads: int, bs: int, max_pages: int, workspace: torch.Tensor):
        import flashinfer

        device = pool.kv_buffer.device
        self.pool, self.num_qo_heads = pool, num_qo_heads
        self.indptr = torch.zeros(bs + 1, dtype=torch.int32, device=device)
        self.indices = torch.zeros(max_pages, dtype=torch.int32, device=device)
        self.last = torch.zeros(bs, dtype=torch.int32, device=device)
        self.wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
            workspace,
            "NHD",
            use_cuda_graph=True,
            paged_kv_indptr_buffer=self.indptr,
            paged_kv_indices_buffer=self.indices,
            paged_kv_last_page_len_buffer=self.last,
            use_tensor_cores=num_qo_heads // pool.num_kv_heads >= 4,
        )

    def plan(self, kv_lens: list[int], tables: list[list[int]]) -> None:
        ps = self.pool.page_size
        # no stream sync: a step may be in flight (the plan copies them into the graph's buffers)
        indptr, indices, last = paged_kv_layout(kv_lens, tables, ps, self.indices.device)
        self.wrapper.plan(
            indptr,
            indices,
            last,
            self.num_qo_heads,
            self.pool.num_kv_heads,
            self.pool.head_dim,
            ps,
            q_data_type=self.pool.dtype,
            kv_data_type=self.pool.dtype,
        )

    def prepare(self, batch: ForwardBatch) -> None:  # planned explicitly before replay
        pass

    def forward(self, q: torch.Tensor, kv: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        return self.wrapper.run(q, kv)


class _GraphMLADecodeBackend(MLABackend):
    """FlashInfer MLA decode (flashinfer.mla, use_cuda_graph=True) with fixed metadata buffers, one
    per bucket: the plan copies each step's metadata into them before the replay."""

    def __init__(self, pool, num_qo_heads: int, config, bs: int, max_pages: int, workspace: torch.Tensor):
        self.api, device = flashinfer_mla_api(), pool.kv_buffer.device
        self.pool, self.num_qo_heads = pool, num_qo_heads
        self.dims, self.sm_scale = (config.kv_lora_rank, config.qk_rope_head_dim), softmax_scale(config)
        # NOTE: FlashInfer requires the indptr and length buffers at exactly the batch's size
        self.qo_indptr = torch.arange(bs + 1, dtype=torch.int32, device=device)  # one query each
        self.kv_indptr = torch.zeros(bs + 1, dtype=torch.int32, device=device)
        self.indices = torch.zeros(max_pages, dtype=torch.int32, device=device)
        self.kv_len = torch.zeros(bs, dtype=torch.int32, device=device)
        self.wrapper = self.api.BatchMLAPagedAttentionWrapper(
            workspace,
            use_cuda_graph=True,
            qo_indptr=self.qo_indptr,
            kv_indptr=self.kv_indptr,
            kv_indices=self.indices,
            kv_len_arr=self.kv_len,
            backend=mla_kernel(),
        )

    def plan(self, kv_lens: list[int], tables: list[list[int]]) -> None:
        ps = self.pool.page_size
        metadata = mla_metadata([1] * len(kv_lens), kv_lens, tables, ps, self.indices.device)
        plan_mla(
            self.api,
            self.wrapper,
            metadata,
            self.num_qo_heads,
            self.dims,
            ps,
            False,
            self.sm_scale,
            self.pool.dtype,
        )

    def prepare(self, batch: ForwardBatch) -> None:  # planned explicitly before replay
        pass

    def run_mla(self, q_nope, q_pe, pages, sm_scale, batch: ForwardBatch) -> torch.Tensor:
        return run_mla_wrapper(self.wrapper, q_nope, q_pe, pages, self.dims[0])


class _GraphTritonDecodeBackend(MLABackend):
    """Triton split-KV decode (common/models/decode_attention.py), GQA or MLA, over a fixed page table
    [bs, pages of max_context] and kv lengths [bs] that plan() fills (pinned host rows, one async copy:
    no stream sync with a step in flight)."""

    def __init__(self, pool, num_qo_heads: int, bs: int, max_context: int, mla: bool):
        from disagg.common.models import decode_attention as kernels

        device = pool.kv_buffer.device
        self.kernels, self.pool = kernels, pool
        width = (max_context + pool.page_size - 1) // pool.page_size
        self.table = torch.full((bs, width), pool.pad_page, dtype=torch.int32, device=device)
        self.kv_lens = torch.zeros(bs, dtype=torch.int32, device=device)
        self.splits = kernels.model_splits(bs, num_qo_heads, max_context, None if mla else pool.num_kv_heads)

    def plan(self, kv_lens: list[int], tables: list[list[int]]) -> None:
        ps = self.pool.page_size
        n_pages = [(kv + ps - 1) // ps for kv in kv_lens]
        width = max(n_pages)  # the kernels read no page past a row's length: only this prefix changes
        rows = [t[:n] + [self.pool.pad_page] * (width - n) for t, n in zip(tables, n_pages, strict=True)]
        device = self.kv_lens.device
        self.table[:, :width].copy_(host_tensor(rows, torch.int32, device), non_blocking=True)
        self.kv_lens.copy_(host_tensor(kv_lens, torch.int32, device), non_blocking=True)

    def prepare(self, batch: ForwardBatch) -> None:  # planned explicitly before replay
        pass

    def forward(self, q: torch.Tensor, kv: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        scale = q.shape[-1] ** -0.5  # FlashInfer's default, the GQA models' scale
        return self.kernels.gqa_decode(q, kv, self.table, self.kv_lens, scale, self.splits)

    def run_mla(self, q_nope, q_pe, pages, sm_scale, batch: ForwardBatch) -> torch.Tensor:
        (bs, heads, rank), rope = q_nope.shape, q_pe.shape[2]  # static: the graph's bucket and shape
        launch = self.kernels.mla_launch(bs, heads, rank, rope, self.pool.page_size, device_name())
        return self.kernels.mla_decode(
            q_nope, q_pe, pages, self.table, self.kv_lens, sm_scale, self.splits, **launch
        )


# --decode-attention-backend auto: the Triton kernels for the buckets of at most this many programs a
# KV chunk (batch x MLA head blocks of 16; GQA: batch), FlashInfer's above. On the H200 (eleventh
# session, docs/benchmarks.md) Triton won at batch 1 and 8 for GQA (Qwen3-30B-A3B, Llama-8B) and MLA
# with 16 heads, at batch 1 only for 128 MLA heads, and lost at batch 64 everywhere.
AUTO_TRITON_PROGRAMS = 8


class CudaGraphRunner:
    def __init__(
        self, model, pool, num_qo_heads: int, max_bs: int, max_context: int, kernel: str = "flashinfer"
    ):
        """kernel: the decode attention kernel (--decode-attention-backend): flashinfer, triton, or
        auto (triton for small buckets, AUTO_TRITON_PROGRAMS)."""
        self.model, self.pool, self.max_context = model, pool, max_context
        self.num_qo_heads = num_qo_heads
        self._set_kernel(kernel)
        device = pool.kv_buffer.device
        self.buckets = batch_buckets(max_bs)
        self.plan_fence = PlanFence()
        max_pages = max_bs * ((max_context + pool.page_size - 1) // pool.page_size)
        self.workspace = torch.empty(128 * 1024 * 1024, dtype=torch.uint8, device=device)
        n = max_bs

        # rows: input ids, positions, out pages, out offsets  [4, max_bs] int64, cuda
        self.inputs = torch.zeros(4, n, dtype=torch.long, device=device)
        self.inputs[2].fill_(pool.pad_page)
        self.input_ids, self.positions, self.out_page, self.out_offset = self.inputs.unbind(0)
        # NOTE: every tensor a graph reads must outlive it (the static batches included), or its
        # memory is reused and the replay reads garbage
        self.graphs, self.outputs, self.backends, self.batches = {}, {}, {}, {}
        self.mempool = torch.cuda.graph_pool_handle()
        for bs in reversed(self.buckets):  # largest first: smaller graphs reuse its memory pool
            self._capture(bs, num_qo_heads, max_pages)
        logger.info("captured CUDA graphs for decode batch sizes %s", self.buckets)

    def _set_kernel(self, kernel: str) -> None:
        """The kernel the graphs run: FlashInfer's where Triton's fails its start-up check, which runs
        only where a bucket would use Triton (`auto` gives MLA with > 128 heads a rank none)."""
        self.kernel = kernel
        if self.uses_triton(1) and not self._triton_agrees(self.num_qo_heads):
            self.kernel = "flashinfer"

    def _triton_agrees(self, num_qo_heads: int) -> bool:
        """The Triton kernels against their torch reference at this model's shape (built now); on a
        mismatch or a failed build the graphs run FlashInfer's (logged)."""
        from disagg.common.models.decode_attention import check_decode_attention

        pool, config = self.pool, self.model.config
        if is_mla(config):
            shape = dict(mla=(num_qo_heads, config.kv_lora_rank, config.qk_rope_head_dim))
        else:
            shape = dict(gqa=(num_qo_heads, pool.num_kv_heads, pool.head_dim))
        ok = check_decode_attention(pool.kv_buffer.device, pool.dtype, page_size=pool.page_size, **shape)
        if not ok:
            logger.warning("the Triton decode attention failed its start-up check: FlashInfer's runs instead")
        return ok

    def uses_triton(self, bs: int) -> bool:
        """Whether the graph of bucket `bs` runs the Triton decode attention."""
        if self.kernel != "auto":
            return self.kernel == "triton"
        from disagg.common.models.decode_attention import head_programs

        head_blocks = head_programs(self.num_qo_heads) if is_mla(self.model.config) else 1
        return bs * head_blocks <= AUTO_TRITON_PROGRAMS

    def _static_batch(self, bs: int) -> ForwardBatch:
        return ForwardBatch(
            input_ids=self.input_ids[:bs],
            positions=self.positions[:bs],
            out_page=self.out_page[:bs],
            out_offset=self.out_offset[:bs],
            q_lens=[1] * bs,
            kv_lens=[1] * bs,
            page_tables=[[self.pool.pad_page]] * bs,
            logits_index=torch.arange(bs, device=self.input_ids.device),
            page_size=self.pool.page_size,
        )

    def _capture(self, bs: int, num_qo_heads: int, max_pages: int) -> None:
        if self.uses_triton(bs):
            mla = is_mla(self.model.config)
            backend = _GraphTritonDecodeBackend(self.pool, num_qo_heads, bs, self.max_context, mla)
        elif is_mla(self.model.config):
            backend = _GraphMLADecodeBackend(
                self.pool, num_qo_heads, self.model.config, bs, max_pages, self.workspace
            )
        else:
            backend = _GraphDecodeBackend(self.pool, num_qo_heads, bs, max_pages, self.workspace)
        batch = self._static_batch(bs)
        backend.plan(batch.kv_lens, batch.page_tables)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm-up outside the graph (lazy init, autotuning)
                self.model(batch, self.pool.kv_buffer, backend)
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()  # no collective of another rank still in flight during capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.mempool):
            out = self.model(batch, self.pool.kv_buffer, backend)
        self.graphs[bs], self.outputs[bs], self.backends[bs], self.batches[bs] = graph, out, backend, batch

    def can_run(self, plan) -> bool:
        q = plan.q_lens
        return bool(q) and len(q) <= self.buckets[-1] and all(n == 1 for n in q)

    def run(self, plan, future=None) -> torch.Tensor:
        """future: the overlap scheduler's input ids still on the device (model_runner.FutureIds),
        written into the static input ids after the plan's placeholders."""
        bs = len(plan.q_lens)
        padded = self.buckets[bisect.bisect_left(self.buckets, bs)]
        pad = padded - bs
        host = torch.tensor(
            [
                plan.ids + [0] * pad,
                plan.positions + [0] * pad,
                plan.pages + [self.pool.pad_page] * pad,
                plan.offsets + [0] * pad,
            ],
            pin_memory=True,  # built pinned: one host-to-device copy, no stream sync (device_wait.host_to_device)
        )
        self.inputs[:, :padded].copy_(host, non_blocking=True)
        if future is not None:
            future.fill(self.input_ids)
        self.plan_fence.wait()
        self.backends[padded].plan(plan.kv_lens + [1] * pad, plan.tables + [[self.pool.pad_page]] * pad)
        self.plan_fence.record()
        self.graphs[padded].replay()
        return self.outputs[padded][:bs]


# --- prefill ------------------------------------------------------------------------------------

PREFILL_GRAPH_MAX_REQS = 16  # requests in one graphed prefill batch (more: the eager forward)
_ROWS = 5  # per-token rows of a graphed prefill's static inputs (PrefillGraphRunner._views)


def prefill_buckets(max_tokens: int) -> list[int]:
    """The token counts prefill graphs are captured at: 16 to 256 by doubling (below ~300 tokens a
    forward reads its weights for as long as it computes: the pad rows cost ~nothing), then every 64 up
    to 1024 and every 128 past it (at most 1/8 extra rows where the FLOPs set the pace), and max_tokens."""
    sizes = [16, 32, 64, 128, 256, *range(320, 1025, 64), *range(1152, max_tokens + 1, 128)]
    return sorted({s for s in sizes if s < max_tokens} | {max_tokens})


def prefill_rows(
    plan, tokens: int, max_reqs: int, pad_page: int, page_size: int
) -> tuple[list[list[int]], list[int]]:
    """A fresh-prompt plan padded to a graph of `tokens` rows and max_reqs + 1 requests: the per-token
    rows (ids, positions, pages, offsets, and each token's row in a layer's [pages * page_size] slots,
    MLA's key rows; the pad rows read token 0 at position 0 and write the pool's pad page) and the
    attention's qo_indptr. The pad rows form one extra request that attends to itself, so every row the
    graph computes holds finite values; the requests after it are empty. logits rows: the plan's,
    then row 0 up to max_reqs."""
    n, pad = len(plan.ids), tokens - len(plan.ids)
    assert pad >= 0 and len(plan.q_lens) <= max_reqs and len(plan.logits_index) <= max_reqs
    pages, offsets = plan.pages + [pad_page] * pad, plan.offsets + [0] * pad
    rows = [
        plan.ids + [0] * pad,
        plan.positions + [0] * pad,
        pages,
        offsets,
        [p * page_size + o for p, o in zip(pages, offsets, strict=True)],
        plan.logits_index + [0] * (max_reqs - len(plan.logits_index)),
    ]
    indptr = [0, *itertools.accumulate(plan.q_lens + [pad] + [0] * (max_reqs - len(plan.q_lens)))]
    assert indptr[-1] == tokens and n == sum(plan.q_lens)
    return rows, indptr


def padded_tables(
    plan, pad: int, max_reqs: int, pad_page: int, page_size: int
) -> tuple[list[int], list[list[int]]]:
    """The kv lengths and page tables of a batch padded as prefill_rows pads it: the plan's requests, the
    pad request (its `pad` rows over the pad page, where they wrote their K/V) and empty ones up to
    max_reqs + 1 (a paged graph's attention plan)."""
    empty = max_reqs - len(plan.q_lens)
    pad_table = [pad_page] * ((pad + page_size - 1) // page_size)
    return plan.kv_lens + [pad] + [0] * empty, plan.tables + [pad_table] + [[]] * empty


class _GraphPagedPrefillBackend(AttentionBackend):
    """FlashInfer's paged prefill in CUDA-graph mode (GQA): a batch whose requests attend over the pool
    (a cached prefix, a chunk after the first, decode rows beside a prompt), with fixed qo / kv indptr,
    page-index and last-page-length buffers for max_reqs + 1 requests and max_pages pages. One wrapper
    for every bucket, as _GraphRaggedPrefillBackend's (the same fixed-size SM90 plan)."""

    def __init__(self, pool, num_qo_heads: int, max_reqs: int, max_pages: int, workspace):
        import flashinfer

        device = pool.kv_buffer.device
        self.pool, self.num_qo_heads = pool, num_qo_heads
        self.qo_indptr = torch.zeros(max_reqs + 2, dtype=torch.int32, device=device)
        self.kv_indptr = torch.zeros(max_reqs + 2, dtype=torch.int32, device=device)
        self.indices = torch.zeros(max_pages, dtype=torch.int32, device=device)
        self.last = torch.zeros(max_reqs + 1, dtype=torch.int32, device=device)
        self.wrapper = flashinfer.BatchPrefillWithPagedKVCacheWrapper(
            workspace, "NHD", use_cuda_graph=True, qo_indptr_buf=self.qo_indptr, paged_kv_indptr_buf=self.kv_indptr,
            paged_kv_indices_buf=self.indices, paged_kv_last_page_len_buf=self.last,
        )  # fmt: skip

    def plan(self, indptr: list[int], kv_lens: list[int], tables: list[list[int]]) -> None:
        # no stream sync: a step may be in flight (the plan copies into the graph's buffers)
        ps, device = self.pool.page_size, self.indices.device
        qo = host_tensor(indptr, torch.int32, device)
        kv_indptr, indices, last = paged_kv_layout(kv_lens, tables, ps, device)
        dtype = self.pool.dtype
        self.wrapper.plan(
            qo, kv_indptr, indices, last, self.num_qo_heads, self.pool.num_kv_heads, self.pool.head_dim, ps,
            causal=True, q_data_type=dtype, kv_data_type=dtype,
        )  # fmt: skip

    def prepare(self, batch: ForwardBatch) -> None:  # planned explicitly before replay
        pass

    def forward(self, q: torch.Tensor, kv: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        return self.wrapper.run(q.contiguous(), kv)


class _GraphRaggedPrefillBackend(MLABackend):
    """FlashInfer's ragged prefill (a fresh prompt's attention over the step's own K and V) in CUDA-graph
    mode: a fixed batch of max_reqs + 1 requests whose qo/kv indptr live in fixed buffers. One wrapper
    serves every bucket: its first plan (the largest bucket's) fixes the row count the planner sizes
    its work lists for, so their workspace offsets (baked into each graph) never move, and the SM90
    kernel runs one program a multiprocessor whatever the lengths. GQA models attend through
    forward_new_kv; MLA models run their expanded form through run_ragged (head dims nope + rope and v,
    the keys' latents read through the static batch's key rows: batch.attn["mla_kv_rows"])."""

    def __init__(self, pool, num_qo_heads: int, config, max_reqs: int, workspace: torch.Tensor):
        import flashinfer

        device = pool.kv_buffer.device
        self.pool = pool
        if is_mla(config):  # the expanded form: every head its own K (nope + rope) and V
            qk, v = config.qk_nope_head_dim + config.qk_rope_head_dim, config.v_head_dim
            self.heads = (num_qo_heads, num_qo_heads, qk, v)
            self.sm_scale = softmax_scale(config)
        else:
            self.heads = (num_qo_heads, pool.num_kv_heads, pool.head_dim, pool.head_dim)
            self.sm_scale = None  # FlashInfer's default, 1 / sqrt(head_dim)
        self.qo_indptr = torch.zeros(max_reqs + 2, dtype=torch.int32, device=device)
        self.kv_indptr = torch.zeros(max_reqs + 2, dtype=torch.int32, device=device)
        self.wrapper = flashinfer.BatchPrefillWithRaggedKVCacheWrapper(
            workspace, "NHD", use_cuda_graph=True, qo_indptr_buf=self.qo_indptr, kv_indptr_buf=self.kv_indptr
        )

    def plan(self, indptr: list[int]) -> None:
        # no stream sync: a step may be in flight (the plan copies into the graph's buffers)
        host = host_tensor(indptr, torch.int32, self.qo_indptr.device)
        hq, hk, qk, v = self.heads
        dtype = self.pool.dtype
        self.wrapper.plan(
            host, host, hq, hk, qk, head_dim_vo=v, causal=True, sm_scale=self.sm_scale,
            q_data_type=dtype, kv_data_type=dtype,
        )  # fmt: skip

    def prepare(self, batch: ForwardBatch) -> None:  # planned explicitly before replay
        pass

    def attends_new_kv(self, batch: ForwardBatch) -> bool:
        return True

    def runs_in_place(self, batch: ForwardBatch) -> bool:
        return True

    def runs_expanded(self, batch: ForwardBatch) -> bool:
        return True

    def forward(self, q: torch.Tensor, kv: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        raise AssertionError("a graphed prefill attends over the step's own K and V only")

    def forward_new_kv(self, q, k, v, batch: ForwardBatch) -> torch.Tensor:
        return self.wrapper.run(q.contiguous(), k, v)

    def run_ragged(self, q, k, v, sm_scale, batch: ForwardBatch) -> torch.Tensor:
        return self.wrapper.run(q, k, v)

    def run_mla(self, q_nope, q_pe, pages, sm_scale, batch: ForwardBatch) -> torch.Tensor:
        raise AssertionError("a graphed MLA prefill runs the expanded form only")


class PrefillGraphRunner:
    """CUDA graphs for prefill batches, one per token bucket (prefill_buckets), captured at start-up on
    one memory pool: batches of fresh prompts (no cached prefix: the ragged attention over the step's own
    K/V) and, unless DISAGG_PAGED_PREFILL_GRAPH=0, batches that attend over the pool (a cached prefix, a
    later chunk, decode rows beside a prompt) on a second set.

    An eager 2048-token prefill of a 48-layer MoE queues ~700 kernels: ~25 ms of host launches on an
    H100 against ~31 ms of device work, so a slower host makes the prefill host-bound, and the launch
    gaps stay on the device's timeline (docs/benchmarks.md). A replay launches the whole forward at
    once. The batch pads to its bucket (prefill_rows: pad rows write the pad page, as the decode graphs'
    do) and logits come from max_reqs fixed rows. Other batches (decode-only ones, more requests or
    logits rows than the graphs hold, past the largest bucket; without the paged set, any with a cached
    prefix) run eagerly. SGLang's piecewise CUDA graphs serve the same purpose with the attention left
    out of the graph; FlashInfer's SM90 prefill kernels are capturable with fixed-size plans, so here
    the whole forward is one graph."""

    def __init__(
        self, model, pool, num_qo_heads: int, max_tokens: int, max_reqs: int = PREFILL_GRAPH_MAX_REQS,
        max_context: int = 0,
    ):  # fmt: skip
        """max_context > 0: the paged set too, for requests of up to that many tokens."""
        self.model, self.pool, self.max_reqs = model, pool, max_reqs
        self.buckets = prefill_buckets(max_tokens)
        device, ps = pool.kv_buffer.device, pool.page_size
        n = self.buckets[-1]
        # per token: input ids, positions, out pages, out offsets, key rows; then the logits rows (_views)
        self.inputs = torch.zeros(_ROWS * n + max_reqs, dtype=torch.long, device=device)
        self.workspace = torch.empty(128 * 1024 * 1024, dtype=torch.uint8, device=device)
        self.backends = {
            "ragged": _GraphRaggedPrefillBackend(pool, num_qo_heads, model.config, max_reqs, self.workspace)
        }
        # the pages a paged batch's requests may hold (its pad request's come on top)
        self.request_pages = max_reqs * ((max_context + ps - 1) // ps)
        if max_context > 0:
            max_pages = self.request_pages + (n + ps - 1) // ps
            self.backends["paged"] = _GraphPagedPrefillBackend(
                pool, num_qo_heads, max_reqs, max_pages, self.workspace
            )
        self.plan_fence = PlanFence()
        self.graphs, self.outputs, self.batches = {}, {}, {}
        self.mempool = torch.cuda.graph_pool_handle()
        # largest first: smaller graphs reuse its memory pool, and each wrapper's first plan (the one its
        # work lists are sized for) is the largest bucket's
        for tokens in reversed(self.buckets):
            for kind in self.backends:
                self._capture(kind, tokens)
        logger.info(
            "captured CUDA graphs for prefill batches of %s tokens (%s)",
            self.buckets,
            ", ".join(self.backends),
        )

    def _views(self, tokens: int) -> list[torch.Tensor]:
        """Bucket `tokens`'s static rows, one block at the buffer's start (each graph holds its own
        views, so one copy fills a batch): ids, positions, pages, offsets, key rows, then the logits rows."""
        rows = [self.inputs[i * tokens : (i + 1) * tokens] for i in range(_ROWS)]
        return [*rows, self.inputs[_ROWS * tokens : _ROWS * tokens + self.max_reqs]]

    def _plan(self, kind: str, indptr: list[int], kv_lens: list[int], tables: list[list[int]]) -> None:
        """Plan the attention of a padded batch (prefill_rows' indptr, padded_tables' lengths and tables)."""
        if kind == "ragged":
            self.backends[kind].plan(indptr)
        else:
            self.backends[kind].plan(indptr, kv_lens, tables)

    def _capture(self, kind: str, tokens: int) -> None:
        ids, positions, pages, offsets, key_rows, logits_index = self._views(tokens)
        self.inputs.zero_()  # another bucket's layout left pages where this one has offsets
        pages.fill_(self.pool.pad_page)
        key_rows.fill_(self.pool.pad_page * self.pool.page_size)
        batch = ForwardBatch(
            input_ids=ids, positions=positions, out_page=pages, out_offset=offsets, q_lens=[tokens],
            kv_lens=[tokens], page_tables=[[self.pool.pad_page]], logits_index=logits_index,
            page_size=self.pool.page_size, attn={"mla_kv_rows": key_rows},
        )  # fmt: skip
        backend = self.backends[kind]
        r, ps = self.max_reqs, self.pool.page_size  # one request of all the rows
        tables = [[self.pool.pad_page] * ((tokens + ps - 1) // ps)] + [[]] * r
        self._plan(kind, [0] + [tokens] * (r + 1), [tokens] + [0] * r, tables)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self.model(batch, self.pool.kv_buffer, backend)  # warm-up: kernels built for this shape
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()  # no collective of another rank still in flight during capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.mempool):
            out = self.model(batch, self.pool.kv_buffer, backend)
        key = (kind, tokens)
        self.graphs[key], self.outputs[key], self.batches[key] = graph, out, batch

    def graph_kind(self, plan) -> str | None:
        """The graph set that takes this plan ("ragged": fresh prompts; "paged": any other prefill batch
        where that set was captured), or None (eager)."""
        q = plan.q_lens
        if not (
            q
            and len(plan.ids) <= self.buckets[-1]
            and len(q) <= self.max_reqs
            and len(plan.logits_index) <= self.max_reqs
            and any(n > 1 for n in q)  # decode batches have their own graphs
        ):
            return None
        if plan.kv_lens == q:  # fresh prompts: the ragged attention over their own K/V
            return "ragged"
        if "paged" not in self.backends or sum(map(len, plan.tables)) > self.request_pages:
            return None
        return "paged"

    def can_run(self, plan) -> bool:
        return self.graph_kind(plan) is not None

    def run(self, plan, future=None) -> torch.Tensor:
        """The plan's logits [len(plan.logits_index), vocab] (queued, not waited for). future: as
        CudaGraphRunner.run's."""
        kind = self.graph_kind(plan)
        tokens = self.buckets[bisect.bisect_left(self.buckets, len(plan.ids))]
        r, ps, pad_page = self.max_reqs, self.pool.page_size, self.pool.pad_page
        rows, indptr = prefill_rows(plan, tokens, r, pad_page, ps)
        host = host_tensor([v for row in rows for v in row], torch.long, self.inputs.device)
        self.inputs[: host.numel()].copy_(host, non_blocking=True)  # pinned: no stream sync
        if future is not None:
            future.fill(self.batches[kind, tokens].input_ids)
        self.plan_fence.wait()
        kv_lens, tables = (
            padded_tables(plan, tokens - len(plan.ids), r, pad_page, ps) if kind == "paged" else ((), ())
        )
        self._plan(kind, indptr, kv_lens, tables)
        self.plan_fence.record()
        self.graphs[kind, tokens].replay()
        return self.outputs[kind, tokens][: len(plan.logits_index)]
