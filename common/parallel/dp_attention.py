"""DP attention (`--enable-dp-attention --dp-size D`, SGLang's): data-parallel attention inside one TP group.

Layout over the tp ranks (tp = D * A): rank r is attention rank r % A of DP rank r // A. Each DP
rank owns its own requests and KV pages (its pool holds only them: no KV replicated across DP
ranks) and runs attention over them, with the attention weights split A ways (replicated when
A == 1). The embedding follows attention. The layers after attention span all tp ranks:

- an all-to-all MoE (`--moe-a2a-backend all_to_all`, --ep == --tp) sends this rank's tokens to
  their experts' ranks and back (common/models/moe_a2a.py): no gather at all;
- a dense MLP or an all-reduce MoE needs every DP rank's tokens: `dp_gather_tokens` before it,
  `dp_scatter_tokens` (this rank's rows) after it;
- the LM head is vocab-parallel over the whole TP group (the sampled rows' hidden states gathered
  from every DP rank), or with `--enable-dp-lm-head` over the A attention ranks only (no gather
  of hidden states across DP ranks; the logits are gathered for sampling instead).

Scheduling: rank 0 runs one `Scheduler` per DP rank (its queue, radix cache and page accounting;
the pages themselves live on that DP rank) inside `DPAttentionScheduler`, which dispatches each
request to the least loaded DP rank and steps them together: each schedules its batch, rank 0
broadcasts all batches in one `DPBatchPlan`, every rank runs its DP rank's batch (a rank with none
runs an idle zero-token forward, so every collective is matched), and each scheduler samples its
rows of the logits rank 0 gets back.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from disagg.common.config import EngineConfig
from disagg.common.engine.attention import AttentionBackend, ForwardBatch
from disagg.common.engine.kv_pool import KVPagePool
from disagg.common.engine.request import TokenOut
from disagg.common.messages import message
from disagg.common.models.moe_a2a import set_forward_shape
from disagg.common.parallel.ranks import broadcast_plan
from disagg.common.parallel.state import (
    ParallelState,
    TPGroup,
    all_reduce,
    attn_tp_group,
    get_parallel,
    tp_group,
)

if TYPE_CHECKING:
    from disagg.common.engine.model_runner import BatchPlan, ModelRunner
    from disagg.common.engine.request import Req


# ---- layout ---------------------------------------------------------------------------------------
def check_dp_attention(config: EngineConfig) -> None:
    """Raise ValueError for flag combinations DP attention does not support."""
    if config.dp_size < 1 or config.tp % config.dp_size:
        raise ValueError(f"--enable-dp-attention: --dp-size {config.dp_size} must divide --tp {config.tp}")
    if getattr(config, "pp_size", 1) > 1:
        raise ValueError("--enable-dp-attention with --pp-size > 1 is not supported")
    if config.moe_a2a_backend == "all_to_all" and config.ep != config.tp:
        raise ValueError("--enable-dp-attention with --moe-a2a-backend all_to_all needs --ep equal to --tp")


def init_dp_attention(config: EngineConfig, state: ParallelState) -> None:
    """Every rank, once the TP group formed: make the dp_size attention groups (every rank creates
    every group, in the same order) and record this rank's place."""
    attn_tp = config.tp // config.dp_size
    groups = [dist.new_group(list(range(d * attn_tp, (d + 1) * attn_tp))) for d in range(config.dp_size)]
    state.attn_dp_size = config.dp_size
    state.attn_group = groups[state.tp_rank // attn_tp] if attn_tp > 1 else None


# ---- the collectives of one forward -------------------------------------------------------------
@dataclass
class DPBatchSizes:
    """Sizes of this forward on every DP rank (the gathers need them)."""

    num_tokens: list[int]  # tokens per DP rank
    num_rows: list[int]  # sampled rows (logits) per DP rank


_SIZES = DPBatchSizes([0], [0])


def dp_gather(x: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """[this DP rank's rows, ...] -> [every DP rank's rows in DP order, ...] on every rank.

    An all-reduce over the TP group: each DP rank's first attention rank writes its rows at their
    offset, every other contribution is zeros (no padding to the longest DP rank, sizes may differ)."""
    ps = get_parallel()
    start = sum(counts[: ps.attn_dp_rank])
    out = x.new_zeros((sum(counts), *x.shape[1:]))
    if ps.attn_tp_rank == 0:
        out[start : start + x.shape[0]] = x
    return all_reduce(out, tp_group())


def dp_gather_tokens(x: torch.Tensor) -> torch.Tensor:
    """This DP rank's tokens -> all DP ranks' tokens (before a layer split over the whole TP group)."""
    return dp_gather(x, _SIZES.num_tokens)


def dp_scatter_tokens(y: torch.Tensor) -> torch.Tensor:
    """All DP ranks' tokens (every rank holds the full, reduced result) -> this DP rank's rows."""
    start = sum(_SIZES.num_tokens[: get_parallel().attn_dp_rank])
    return y[start : start + _SIZES.num_tokens[get_parallel().attn_dp_rank]]


def lm_head_group(config) -> TPGroup:
    """The LM head's vocab split: the TP group (under DP attention the sampled rows' hidden states
    are gathered from every DP rank first) or, with --enable-dp-lm-head, the attention group."""
    return attn_tp_group() if getattr(config, "enable_dp_lm_head", False) else tp_group()


def dp_logits(head, x: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Logits of every DP rank's sampled rows [sum(num_rows), vocab], on every rank (rank 0 samples).
    `head`: a VocabParallelEmbedding over the TP group or, --enable-dp-lm-head, the attention group."""
    if head.tp.size == get_parallel().tp_size:
        return head.logits(dp_gather(x, _SIZES.num_rows), vocab_size)
    return dp_gather(head.logits(x, vocab_size), _SIZES.num_rows)


# ---- one forward of all DP ranks ----------------------------------------------------------------
@message
@dataclass
class DPBatchPlan:
    """One forward of every DP rank: plans[d] is DP rank d's batch (empty: an idle rank)."""

    plans: list[BatchPlan]


class IdleBackend(AttentionBackend):
    """Attention of a rank with no tokens: nothing to attend (the layers around still run their collectives)."""

    def prepare(self, batch: ForwardBatch) -> None:
        pass

    def forward(self, q: torch.Tensor, kv: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        return torch.zeros_like(q)


def run_dp_plan(runner: ModelRunner, msg: DPBatchPlan) -> torch.Tensor:
    """Every rank: run its DP rank's batch of `msg`. Returns every DP rank's logits (DP order)."""
    global _SIZES
    _SIZES = DPBatchSizes([len(p.ids) for p in msg.plans], [len(p.logits_index) for p in msg.plans])
    # the all-to-all MoE's exchange mode and buffer rows: from every DP rank's plan, alike on all ranks
    set_forward_shape(all(q == 1 for p in msg.plans for q in p.q_lens), max(_SIZES.num_tokens))
    plan = msg.plans[get_parallel().attn_dp_rank]
    if plan.q_lens:
        return runner.forward_plan(plan)
    none = torch.zeros(0, dtype=torch.long, device=runner.device)
    idle = ForwardBatch(none, none, none, none, [], [], [], none, page_size=runner.pool.page_size)
    return runner.model(idle, runner.pool.kv_buffer, IdleBackend())


def forward_dp(runner: ModelRunner, batches: list[list[tuple[Req, int]]]) -> list[torch.Tensor]:
    """Rank 0: one forward of every DP rank's batch; the logits of each DP rank's sampled rows."""
    plans = [runner.build_plan(batch) for batch in batches]
    msg = DPBatchPlan(plans)
    broadcast_plan(msg)
    logits = run_dp_plan(runner, msg)
    if runner.eplb is not None:  # EPLB: re-place the experts every N steps (load from DP rank 0's tokens)
        runner.eplb.after_step()
    return list(logits.split([len(p.logits_index) for p in plans]))


# ---- scheduling ---------------------------------------------------------------------------------
def pick_dp_rank(loads: list[int], turn: int) -> int:
    """The least loaded DP rank; ties go round robin from `turn`."""
    n = len(loads)
    return min(((turn + i) % n for i in range(n)), key=lambda d: loads[d])


class RankView:
    """What the scheduler of another DP rank needs from a runner on rank 0: the facts of the model
    and page accounting for that rank's pool (the pages live on that rank; no tensor here)."""

    def __init__(self, runner: ModelRunner):
        p = runner.pool
        self.pool = KVPagePool(
            p.num_pages, p.page_size, 0, p.num_kv_heads, p.head_dim, p.dtype, torch.device("cpu")
        )
        self.device, self.tokenizer, self.hf_config = runner.device, runner.tokenizer, runner.hf_config
        self.model_path, self.context_length = runner.model_path, runner.context_length
        self.eplb = None  # MoE expert counters: rank 0's runner (DP rank 0's scheduler reports them)

    def forward(self, scheduled) -> torch.Tensor:
        raise RuntimeError("DP ranks run together: DPAttentionScheduler.step runs their batches")


class DPAttentionScheduler:
    """Rank 0: one `Scheduler` per DP rank, stepped together (the scheduler surface the server
    loop and the offline Engine drive).

    `make_scheduler(runner, dp_rank)` builds DP rank d's scheduler over rank 0's runner (d = 0) or a
    `RankView` (default: the colocated `Scheduler`). A PD decode passes its own, each with a
    `transfer.coordinator.DPRankTransfer` of `transfer`, the coordinator its DP ranks share: it is
    flushed here once per step and each room's result handed to the DP rank that expects it.

    `by_room` (a PD prefill): a request with a bootstrap room goes to DP rank room % D, where the
    decode looks for it (SGLang's rule; the bootstrap answers that DP rank's ranks), one without
    (a health check) to the least loaded; `data_parallel_rank` is the decode's choice, not looked at."""

    def __init__(self, config: EngineConfig, runner: ModelRunner | None = None, make_scheduler=None,
                 transfer=None, by_room: bool = False):  # fmt: skip
        from disagg.common.engine.model_runner import ModelRunner
        from disagg.common.engine.scheduler import Scheduler

        self.config = config
        self.runner = runner or ModelRunner(config)
        views = [self.runner] + [RankView(self.runner) for _ in range(1, config.dp_size)]
        make = make_scheduler or (lambda view, d: Scheduler(config, view))
        self.schedulers = [make(view, d) for d, view in enumerate(views)]
        self.tokenizer, self.context_length = self.runner.tokenizer, self.runner.context_length
        self.transfer = transfer
        self._dp_rank_of: dict[str, int] = {}  # rid -> DP rank, while the request lives
        self._turn = 0
        self._rejected: list[TokenOut] = []  # refused in add_request (a 4xx), answered with the next step
        self._rooms: dict[str, int] = {}  # PD: rid -> bootstrap room, while the request lives
        self.by_room = by_room

    def add_request(self, req: Req) -> None:
        error = self._check_request(req)
        if error:  # the client's: a 400 (a room in use: 409)
            self._rejected.append(TokenOut(req.rid, [], finished=True, finish_reason="abort", error=error,
                                           prompt_tokens=len(req.input_ids)))  # fmt: skip
            return
        self._dp_rank_of[req.rid] = d = self._dp_rank_for(req)
        if self.transfer is not None and req.bootstrap_room is not None:
            self._rooms[req.rid] = req.bootstrap_room
        self.schedulers[d].add_request(req)

    def _dp_rank_for(self, req: Req) -> int:
        if self.by_room:  # a PD prefill: data_parallel_rank is the decode's
            return (
                self._least_loaded()
                if req.bootstrap_room is None
                else req.bootstrap_room % len(self.schedulers)
            )
        return self._least_loaded() if req.data_parallel_rank is None else req.data_parallel_rank

    def _check_request(self, req: Req) -> str | None:
        d = None if self.by_room else req.data_parallel_rank
        if d is not None and not 0 <= d < len(self.schedulers):
            return f"data_parallel_rank {d} is out of range: this server has {len(self.schedulers)} DP ranks"
        # NOTE: each DP rank checks its own rooms; a room on two DP ranks would have two receivers
        # (by room, one room always lands on one DP rank, which refuses it there)
        if self.transfer is not None and not self.by_room and req.bootstrap_room in self._rooms.values():
            return f"bootstrap_room {req.bootstrap_room} is already in use on this decode server"
        return None

    def _least_loaded(self) -> int:
        """The DP rank holding the fewest live requests (any stage: a decode's pre-allocated and
        transferring ones count), ties in turn."""
        loads = [0] * len(self.schedulers)
        for d in self._dp_rank_of.values():
            loads[d] += 1
        d = pick_dp_rank(loads, self._turn)
        self._turn += 1
        return d

    def abort_request(self, rid: str) -> None:
        d = self._dp_rank_of.get(rid)
        if d is not None:
            self.schedulers[d].abort_request(rid)

    def step(self) -> list[TokenOut]:
        batches = [s.schedule_batch() for s in self.schedulers]
        if any(batches):
            for s, batch, logits in zip(
                self.schedulers, batches, forward_dp(self.runner, batches), strict=True
            ):
                if batch:
                    s.process_batch_result(batch, logits)
        if self.transfer is not None:  # PD: one flush for every DP rank's rooms
            results = self.transfer.flush()
            for s in self.schedulers:
                s.transfer.deliver(results)
        outs, self._rejected = self._rejected + [out for s in self.schedulers for out in s.finish_step()], []
        for out in outs:
            if out.finished:
                self._dp_rank_of.pop(out.rid, None)
                self._rooms.pop(out.rid, None)
        return outs

    def has_work(self) -> bool:
        return bool(self._rejected) or any(s.has_work() for s in self.schedulers)

    def stats(self):
        """The DP ranks' counts summed (pages: over all DP ranks' pools)."""
        parts = [s.stats() for s in self.schedulers]
        total = dataclasses.replace(parts[0], **{k: sum(getattr(p, k) for p in parts) for k in _SUMMED})
        total.kv_usage = total.num_used_pages / max(1, total.num_total_pages)
        total.cache_hit_rate = sum(p.cache_hit_rate for p in parts) / len(parts)
        total.queues = {k: sum(p.queues.get(k, 0) for p in parts) for k in parts[0].queues}
        return total

    @property
    def num_free_pages(self) -> int:
        return sum(s.num_free_pages for s in self.schedulers)

    @property
    def num_total_pages(self) -> int:
        return sum(s.num_total_pages for s in self.schedulers)

    def flush_cache(self) -> bool:
        return not self.has_work() and all([s.flush_cache() for s in self.schedulers])

    def pd_identity(self) -> dict | None:
        return self.schedulers[0].pd_identity()

    def wait_timeout_ms(self) -> int:
        return 0 if self._rejected else min(s.wait_timeout_ms() for s in self.schedulers)

    @property
    def wake_fd(self) -> int | None:
        return None  # tp > 1: the other ranks' transfer results come with the next step's gather

    def on_wake(self) -> None:
        pass


_SUMMED = ("num_running", "num_waiting", "num_total_pages", "num_free_pages", "num_used_pages",
           "num_request_pages", "num_cached_pages", "num_retractions", "num_transferring", "num_prealloc",
           "num_open_rooms")  # fmt: skip


def uses_dp_attention(config: EngineConfig) -> bool:
    """Whether rank 0 runs a `DPAttentionScheduler`: --enable-dp-attention with more than one DP rank
    (--dp-size 1, or tp 1, is plain TP). Raises ValueError for flags DP attention does not support."""
    if not config.enable_dp_attention:
        return False
    check_dp_attention(config)
    return get_parallel().attn_dp_size > 1


def create_scheduler(config: EngineConfig):
    """The colocated scheduler: `DPAttentionScheduler` under DP attention, else a `Scheduler`."""
    from disagg.common.engine.scheduler import Scheduler

    return DPAttentionScheduler(config) if uses_dp_attention(config) else Scheduler(config)


def create_pd_scheduler(
    config: EngineConfig, make_scheduler, make_transfer, rank_transfer, by_room: bool = False
):
    """A PD role's scheduler (prefill or decode): `make_scheduler()` alone, or under DP attention one
    per DP rank inside a `DPAttentionScheduler`, whose DP ranks share one transfer coordinator.

    `make_scheduler(runner, transfer)`: the role's scheduler (no arguments: over its own runner and
    coordinator); `make_transfer(runner)`: the coordinator the DP ranks share; `rank_transfer(shared,
    dp_rank)`: DP rank d's handle on it (`transfer.coordinator.DPRankTransfer`: common/ cannot import
    transfer/, so the roles pass these in). `by_room`: see `DPAttentionScheduler`."""
    from disagg.common.engine.model_runner import ModelRunner

    if not uses_dp_attention(config):
        return make_scheduler()
    runner = ModelRunner(config)
    shared = make_transfer(runner)

    def make(view, dp_rank: int):
        return make_scheduler(view, rank_transfer(shared, dp_rank))

    return DPAttentionScheduler(config, runner, make, transfer=shared, by_room=by_room)
