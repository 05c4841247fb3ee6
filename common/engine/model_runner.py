"""Owns the model, the KV pool and the attention backend of one rank; runs forward passes."""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass

import torch
from disagg.common.config import (
    EngineConfig,
    cpu_threads,
    mla_prefill_graph,
    mps_sm_percent,
    paged_prefill_graph,
)
from disagg.common.engine.attention import ForwardBatch, create_attention_backend
from disagg.common.engine.device_wait import rows_to_device, to_device
from disagg.common.engine.gemm_check import check_gemms, dense_weight_shapes
from disagg.common.engine.kernel_prebuild import kernel_needs, start_prebuild
from disagg.common.engine.kv_pool import KVPagePool, size_pool_pages
from disagg.common.engine.request import Req, prompt_logprob_rows
from disagg.common.messages import message
from disagg.common.models.argmax import check_argmax
from disagg.common.models.decoder import (
    SUPPORTED_ARCHITECTURES,
    CausalLM,
    check_tp_layout,
    head_dim_of,
    kv_heads_per_rank,
)
from disagg.common.models.deepseek import attention_backend_for, fuse_shared_experts, is_mla, mla_dims
from disagg.common.models.eplb import create_balancer
from disagg.common.models.fp8 import deferred_fp8_weights
from disagg.common.models.gemv import GEMV_MAX_TOKENS, prepare_gemv
from disagg.common.models.kernels import check_fused_kernels
from disagg.common.models.model_files import model_fingerprint, resolve_model_path
from disagg.common.models.moe import MOE_ARCHITECTURES
from disagg.common.models.weights import PRESETS, load_config, load_weights
from disagg.common.parallel.pipeline import layer_range, run_pipeline
from disagg.common.parallel.ranks import broadcast_plan
from disagg.common.parallel.state import get_parallel

logger = logging.getLogger(__name__)


@message
@dataclass
class BatchPlan:
    """One forward of a flattened batch; rank 0 broadcasts it and every rank runs it on its shard.
    Per token: ids, positions, and the KV page/offset its K and V are written to; per request:
    q_lens (new tokens), kv_lens (tokens after this step), tables (its pages)."""

    ids: list[int]
    positions: list[int]
    pages: list[int]
    offsets: list[int]
    logits_index: list[int]  # rows of the tokens whose next token is sampled
    q_lens: list[int]
    kv_lens: list[int]
    tables: list[list[int]]


@dataclass
class FutureIds:
    """Input ids still on the device (the overlap scheduler): plan row index[0][i] takes
    tokens[index[1][i]], a token the previous step sampled and the host has not read yet; the
    plan holds a placeholder 0 there, so no host sync is needed between the two steps."""

    index: torch.Tensor  # [2, k] int64, device: plan rows, rows of `tokens`
    tokens: torch.Tensor  # [B_prev] int64, device: the previous step's sampled tokens

    def fill(self, input_ids: torch.Tensor) -> None:
        """Write the tokens into `input_ids` (on the device, in stream order: after the sampling)."""
        input_ids[self.index[0]] = self.tokens[self.index[1]]


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(name)


def _set_cpu_threads(tp: int) -> None:
    # NOTE: oversubscribed cores make torch's CPU kernels many times slower; several ranks or
    # servers on one machine should split the cores (DISAGG_CPU_THREADS overrides).
    threads = cpu_threads()
    torch.set_num_threads(int(threads) if threads else max(1, (os.cpu_count() or 1) // tp))


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


class ModelRunner:
    def __init__(self, config: EngineConfig):
        self.config = config
        self.device = resolve_device(config.device)
        if self.device.type == "cpu":
            _set_cpu_threads(config.world_size)
        self.dtype = _DTYPES.get(config.dtype) or (
            torch.bfloat16 if self.device.type == "cuda" else torch.float32
        )
        self.model_path = (
            config.model_path if config.model_path in PRESETS else resolve_model_path(config.model_path)
        )
        self.hf_config = load_config(self.model_path, config.json_model_override_args)
        self.hf_config.moe_a2a_backend = config.moe_a2a_backend  # --moe-a2a-backend, read by the MoE layers
        self.hf_config.deepep_mode = config.deepep_mode  # its exchange mode (moe_a2a.py)
        self.hf_config.enable_dp_lm_head = config.enable_dp_attention and config.enable_dp_lm_head  # CausalLM
        # EPLB (common/models/eplb.py): physical expert slots, and whether routing goes through a placement
        self.hf_config.ep_num_redundant_experts = config.ep_num_redundant_experts
        self.hf_config.expert_remap = bool(
            config.init_expert_location or config.eplb_rebalance_num_iterations or config.enable_eplb
        )
        # DeepSeek's shared experts as routed-expert slots (deepseek.DeepseekMoE.fuse_shared_experts):
        # the expert stacks are allocated with room for them, so fusing copies no stack
        self.hf_config.fuse_shared_experts = not config.disable_shared_experts_fusion
        self._check_model()
        if self.device.type == "cuda":  # FlashInfer's missing kernels build while the weights load
            capability = torch.cuda.get_device_capability(self.device)
            needs = kernel_needs(self.hf_config, self.dtype, config.attention_backend, capability,
                                 get_parallel().attn_tp_size)  # fmt: skip
            start_prebuild(needs)
        # what a PD peer compares before any page crosses (same config and weights)
        self.fingerprint = model_fingerprint(
            self.model_path, config.load_format, config.random_seed, self.hf_config
        )
        self.context_length = config.context_length or self.hf_config.max_position_embeddings
        self.model = self._load_model()
        if self.device.type == "cuda" and (sm_percent := mps_sm_percent()) is not None:
            # cuBLAS computed NaN under an MPS SM cap on an H100 (gemm_check.py): refuse to serve noise
            check_gemms(dense_weight_shapes(self.model), self.dtype, self.device, sm_percent)
        self.eplb = create_balancer(self.model, config)  # MoE: expert load counters, EPLB placement
        if self.device.type == "cuda":
            fused = check_fused_kernels(self.device, self.dtype)
            logger.info(
                "fused kernels (RMSNorm+residual, SiLU*mul, RoPE): %s", "flashinfer" if fused else "off"
            )
        self.pool = self._make_pool()
        self.backend = create_attention_backend(
            attention_backend_for(self.hf_config, config.attention_backend),
            self.device,
            pool=self.pool,
            num_qo_heads=self.hf_config.num_attention_heads // get_parallel().attn_tp_size,
            **({"mla_dims": mla_dims(self.hf_config)} if is_mla(self.hf_config) else {}),
        )
        self.tokenizer = self._load_tokenizer()
        # NOTE: set by forward() around its forward_plan only: the plan stays a plain host message
        # (broadcast to the other ranks, replayed by the benchmarks) while its future ids are filled in
        self._future: FutureIds | None = None
        self._plan_fence = None
        if self.device.type == "cuda":
            from disagg.common.engine.cuda_graph import PlanFence

            self._plan_fence = PlanFence()  # eager steps' attention plans (see PlanFence)
        self.graph_runner = self._capture_cuda_graphs()
        self.prefill_graphs = None
        if self.device.type == "cuda":
            self._warm_up()
            self.prefill_graphs = self._capture_prefill_graphs()

    def _warm_up(self) -> None:
        """Run a prefill, a chunk on top of it and a decode step once before serving.

        FlashInfer builds its kernels on first use (JIT), which takes minutes on a machine whose
        cache lacks them: a first request must not pay that (a PD room would time out while its
        prefill compiles). Every rank runs the same plans, so TP collectives match. Only pages no
        request holds yet are written, and a page is always written before it is read.
        """
        t0, ps = time.perf_counter(), self.pool.page_size
        n = min(2 * ps, max(1, self.pool.num_free_pages * ps // 3))

        def plan(start: int, q: int) -> BatchPlan:
            pos = list(range(start, start + q))
            return BatchPlan(ids=[0] * q, positions=pos, pages=[p // ps for p in pos], offsets=[p % ps for p in pos],
                             logits_index=[q - 1], q_lens=[q], kv_lens=[start + q],
                             tables=[list(range((start + q + ps - 1) // ps))])  # fmt: skip

        for p in (plan(0, n), plan(n, n), plan(2 * n, 1)):
            logits = self.forward_plan(p)
        # greedy sampling's Triton argmax built and checked (pipeline ranks but the last get None)
        if logits is not None:
            check_argmax(logits)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        logger.info("warm-up forwards (kernels built or loaded): %.1fs", time.perf_counter() - t0)

    def _check_model(self) -> None:
        model_type = self.hf_config.model_type
        archs = set(getattr(self.hf_config, "architectures", None) or [])
        archs |= {
            a
            for a in SUPPORTED_ARCHITECTURES | MOE_ARCHITECTURES
            if a.lower().startswith(model_type.replace("_", ""))
        }

        if not archs & (SUPPORTED_ARCHITECTURES | MOE_ARCHITECTURES):
            raise ValueError(
                f"unsupported architecture {sorted(archs)}; supported: {sorted(SUPPORTED_ARCHITECTURES | MOE_ARCHITECTURES)}"
            )
        par = get_parallel()
        check_tp_layout(self.hf_config, par.tp_size, par.ep_size, par.attn_tp_size)

    def _load_model(self) -> CausalLM:
        t0 = time.perf_counter()
        # FP8 checkpoints: the weights that stay FP8 get no 16/32-bit copy while the model is built
        with (
            _default_dtype(self.dtype),
            torch.device(self.device),
            deferred_fp8_weights(self.hf_config, self.device),
        ):
            model = CausalLM(self.hf_config, max_positions=self.context_length, layer_range=self.layer_range)
        load_weights(model, self.model_path, self.config.load_format)
        if not self.config.disable_shared_experts_fusion and (fused := fuse_shared_experts(model)):
            logger.info("shared experts fused into the routed experts' kernels: %d layers", fused)
        if planned := prepare_gemv(model):
            logger.info(
                "decode batches of <= %d tokens: %d linears on the Triton GEMV", GEMV_MAX_TOKENS, planned
            )
        model.eval()
        n = sum(p.numel() for p in model.parameters())
        logger.info(
            "model loaded: %.1fM params/rank, %s, %s, %.1fs",
            n / 1e6,
            self.dtype,
            self.device,
            time.perf_counter() - t0,
        )
        return model

    @property
    def layer_range(self) -> tuple[int, int]:
        """This rank's pipeline stage's layers [start, end) (all of them without --pp-size)."""
        par = get_parallel()
        return layer_range(self.hf_config.num_hidden_layers, par.pp_rank, par.pp_size)

    def _make_pool(self) -> KVPagePool:
        c, tp, par = self.hf_config, get_parallel().attn_tp_size, get_parallel()  # KV heads: as attention
        start, end = self.layer_range  # a pipeline stage's pool holds its own layers only
        layers, heads, dim = end - start, kv_heads_per_rank(c, tp), head_dim_of(c)
        bytes_per_page = layers * 2 * self.config.page_size * heads * dim * self.dtype.itemsize
        num_pages = size_pool_pages(
            bytes_per_page,
            self.config.page_size,
            self.device,
            self.config.max_total_tokens,
            self.config.mem_fraction_static,
        )
        if (
            par.world_size > 1
        ):  # every rank must agree on the pool size (the scheduler on rank 0 decides for all)
            on_device = (
                self.device.type == "cuda" and par.pp_size == 1
            )  # the stages' TP groups: gloo across them
            t = torch.tensor([num_pages], device=self.device if on_device else "cpu")
            torch.distributed.all_reduce(
                t, op=torch.distributed.ReduceOp.MIN, group=par.group if on_device else par.cpu_group
            )
            num_pages = int(t.item())
        logger.info(
            "KV pool: %d pages x %d tokens (%.2f GiB)",
            num_pages,
            self.config.page_size,
            num_pages * bytes_per_page / 2**30,
        )
        return KVPagePool(num_pages, self.config.page_size, layers, heads, dim, self.dtype, self.device)

    def _capture_cuda_graphs(self):
        c = self.config
        if get_parallel().attn_dp_size > 1:
            return None  # DP attention runs eager steps (graphs per DP rank: not yet)
        if self.device.type != "cuda" or c.disable_cuda_graph or c.cuda_graph_max_bs <= 0 or c.pp_size > 1:
            return None
        from disagg.common.engine.attention_flashinfer import FlashInferBackend

        if not isinstance(self.backend, FlashInferBackend):
            return None
        from disagg.common.engine.cuda_graph import CudaGraphRunner

        return CudaGraphRunner(
            self.model,
            self.pool,
            self.hf_config.num_attention_heads // get_parallel().tp_size,
            min(c.cuda_graph_max_bs, c.max_running_requests),
            self.context_length,
            kernel=c.decode_attention_backend,
        )

    def _capture_prefill_graphs(self):
        """cuda_graph.PrefillGraphRunner where the decode graphs run and the attention backend has
        FlashInfer's ragged prefill, unless --disable-prefill-cuda-graph: fresh prompts (MLA models' in
        their expanded form unless DISAGG_MLA_PREFILL_GRAPH=0) and, unless DISAGG_PAGED_PREFILL_GRAPH=0,
        GQA batches over the pool, a cached prefix or a later chunk. The
        all-to-all MoE (its prefill exchange sizes buffers on the host) and every batch while EPLB or the
        expert metrics count the experts' load (a batch's pad rows would count) prefill eagerly. The
        graphs' memory is not in the KV pool's budget: where capturing them runs out of memory, one rank
        prefills eagerly (logged); several ranks fail to start (a rank that gave up would leave the
        others inside a collective)."""
        c = self.config
        if c.disable_prefill_cuda_graph or c.prefill_cuda_graph_max_tokens <= 0 or self.graph_runner is None:
            return None
        if getattr(self.backend, "ragged", None) is None or c.moe_a2a_backend != "none":
            logger.info("prefill CUDA graphs: not for this attention backend or layout (eager prefill)")
            return None
        if self.eplb is not None and self.eplb.counting:  # a padded batch's pad rows would count as load
            logger.info("prefill CUDA graphs: off while the experts' load is counted (eager prefill)")
            return None
        max_tokens = min(c.prefill_cuda_graph_max_tokens, c.max_prefill_tokens)
        heads = self.hf_config.num_attention_heads // get_parallel().attn_tp_size
        if is_mla(self.hf_config) and not mla_prefill_graph():
            logger.info("prefill CUDA graphs: off for MLA (DISAGG_MLA_PREFILL_GRAPH=0): eager prefill")
            return None
        if is_mla(self.hf_config):  # the expanded form's buffers, as the eager prepare bounds them
            max_tokens = min(max_tokens, self.backend.expanded_max_keys())
        from disagg.common.engine.cuda_graph import PREFILL_GRAPH_MAX_REQS, PrefillGraphRunner

        t0 = time.perf_counter()
        try:
            # MLA's prefix batches run the absorbed form on its paged MLA kernel: not in these graphs
            paged = paged_prefill_graph() and not is_mla(self.hf_config)
            graphs = PrefillGraphRunner(
                self.model,
                self.pool,
                heads,
                max_tokens,
                min(PREFILL_GRAPH_MAX_REQS, c.max_running_requests),
                max_context=self.context_length if paged else 0,
            )
        except torch.OutOfMemoryError:
            if get_parallel().world_size > 1:
                raise  # the other ranks may wait inside a collective of the capture: fail, never hang
            torch.cuda.empty_cache()
            logger.warning(
                "prefill CUDA graphs: out of memory capturing them (lower --mem-fraction-static or "
                "--prefill-cuda-graph-max-tokens): eager prefill"
            )
            return None
        logger.info("prefill CUDA graphs captured in %.1fs", time.perf_counter() - t0)
        return graphs

    def _load_tokenizer(self):
        if self.model_path in PRESETS:
            return None
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(self.model_path)
        except (OSError, ValueError) as e:
            logger.warning("no tokenizer in %s (%s): token ids only", self.model_path, e)
            return None

    def build_plan(
        self, scheduled: list[tuple[Req, int]], pending: dict[Req, int] | None = None
    ) -> BatchPlan:
        """Flatten `n` new tokens of each request into one batch plan (rank 0 broadcasts it to
        the other ranks). pending: requests whose one new token is the previous step's sampled
        token, still on the device (-> its row there): a placeholder 0 here, see FutureIds."""
        pending = pending or {}
        ps = self.pool.page_size
        ids, positions, pages, offsets, logits_index = [], [], [], [], []
        q_lens, kv_lens, tables = [], [], []
        for req, n in scheduled:
            start = req.num_computed_tokens
            # prompt logprobs: the rows of prompt positions p that predict prompt token p + 1 (sorted:
            # the scheduler reads them before the sampled row, Scheduler._take_prompt_logprobs)
            logits_index += [len(ids) + i for i in range(prompt_logprob_rows(req, n))]
            ids += [0] if req in pending else req.ids_between(start, start + n)
            pos = range(start, start + n)
            positions += pos
            pages += [req.page_table[p // ps] for p in pos]
            offsets += [p % ps for p in pos]
            if start + n == req.seq_len + (req in pending):
                logits_index.append(len(ids) - 1)
            q_lens.append(n)
            kv_lens.append(start + n)
            tables.append(req.page_table[: (start + n + ps - 1) // ps])
        return BatchPlan(ids, positions, pages, offsets, logits_index, q_lens, kv_lens, tables)

    def forward(
        self,
        scheduled: list[tuple[Req, int]],
        pending: dict[Req, int] | None = None,
        future: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The batch's logits (queued on the device, not waited for). pending/future: the overlap
        scheduler's requests whose input token is row pending[req] of `future`, the previous
        step's sampled tokens on the device (only with one rank: the others never see them)."""
        plan = self.build_plan(scheduled, pending)
        if get_parallel().world_size > 1:
            assert not pending, "future input ids need every rank to hold the sampled tokens"
            broadcast_plan(plan)
        self._future = self._future_ids(scheduled, pending, future) if pending else None
        try:
            logits = self.forward_plan(plan)
        finally:
            self._future = None
        if self.eplb is not None:
            self.eplb.after_step()  # every --eplb-rebalance-num-iterations: re-place the experts
        return logits

    def _future_ids(self, scheduled: list[tuple[Req, int]], pending: dict[Req, int], future) -> FutureIds:
        rows, src, row = [], [], 0
        for req, n in scheduled:
            if req in pending:
                rows.append(row)
                src.append(pending[req])
            row += n
        return FutureIds(to_device([rows, src], torch.long, self.device), future)

    def forward_plan(self, plan: BatchPlan) -> torch.Tensor:
        if get_parallel().pp_size > 1:
            return run_pipeline(self, plan)  # rank 0 gets the logits; the other ranks None
        if self.graph_runner is not None and self.graph_runner.can_run(plan):
            return self.graph_runner.run(plan, self._future)
        if self.prefill_graphs is not None and self.prefill_graphs.can_run(plan):
            return self.prefill_graphs.run(plan, self._future)
        batch = self.make_batch(plan)
        return self.model(batch, self.pool.kv_buffer, self.backend)

    def make_batch(self, plan: BatchPlan) -> ForwardBatch:
        """The plan as device tensors, with the attention backend prepared for it."""
        ids, positions, pages, offsets = rows_to_device(
            [plan.ids, plan.positions, plan.pages, plan.offsets], torch.long, self.device
        )
        batch = ForwardBatch(
            input_ids=ids,
            positions=positions,
            out_page=pages,
            out_offset=offsets,
            q_lens=plan.q_lens,
            kv_lens=plan.kv_lens,
            page_tables=plan.tables,
            logits_index=to_device(plan.logits_index, torch.long, self.device),
            page_size=self.pool.page_size,
        )
        if self._future is not None:
            self._future.fill(batch.input_ids)
        if self._plan_fence is not None:
            self._plan_fence.wait()
        self.backend.prepare(batch)
        if self._plan_fence is not None:
            self._plan_fence.record()
        return batch
