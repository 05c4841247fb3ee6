"""Pipeline parallelism (--pp-size): the layers in contiguous stages, micro-batches flowing through them.

Ranks are stage-major: stage s is the TP group of world ranks [s * tp, (s + 1) * tp). Stage 0
owns the embedding, the last stage the final norm and the LM head; each stage holds its layers'
weights and a KV pool for its layers only (the same page indices on every stage: rank 0's
scheduler allocates pages once for all of them).

Every rank gets rank 0's `BatchPlan` (the plan broadcast) and splits it into the same
micro-batches (`split_plan`: about equal tokens, a long prompt cut into pieces). For each micro-batch a stage
receives (hidden, residual) from the same TP rank of the stage before, runs its layers and sends
them on without waiting (`isend`), so stage s computes micro-batch i + 1 while stage s + 1
computes micro-batch i. Activations travel only point-to-point over the default process group
(NCCL on GPU, gloo on CPU).

The last stage's TP rank 0 sends the logits of every micro-batch back to rank 0 in one message,
after its last micro-batch; rank 0 samples (the sampler's per-request state lives with the
scheduler). NOTE: one message at the end, never one per micro-batch: rank 0 posts its receive
only after sending its last micro-batch, and an NCCL send waits for its receive on the stream,
so an earlier logits send would stall the last stage before it received the next micro-batch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from disagg.common.parallel.state import get_parallel

MICRO_BATCHES_PER_STAGE = (
    4  # up to pp_size * this micro-batches per forward (never fewer than one token each)
)


def layer_range(num_layers: int, pp_rank: int, pp_size: int) -> tuple[int, int]:
    """Layers [start, end) of stage `pp_rank`: an even split, the later stages taking the remainder."""
    return pp_rank * num_layers // pp_size, (pp_rank + 1) * num_layers // pp_size


def check_pp_layout(hf_config, config) -> None:
    """Raise ValueError when the model cannot be split into --pp-size stages."""
    layers = hf_config.num_hidden_layers
    if not 1 <= config.pp_size <= layers:
        raise ValueError(f"--pp-size {config.pp_size}: the model has {layers} layers (1 to {layers} stages)")
    if getattr(config, "enable_dp_attention", False):
        raise ValueError("--pp-size > 1 with --enable-dp-attention is not supported")


class StageKV:
    """A stage's KV pool indexed by global layer id (the attention layers index kv_buffer[layer_id])."""

    def __init__(self, kv_buffer: torch.Tensor, start_layer: int):
        self.kv_buffer, self.start_layer = kv_buffer, start_layer

    def __getitem__(self, layer_id: int) -> torch.Tensor:
        return self.kv_buffer[layer_id - self.start_layer]


def split_plan(plan, max_micro_batches: int, page_size: int) -> list:
    """The plan as up to max_micro_batches plans of about equal token counts (logits rows
    renumbered per micro-batch). A request's new tokens may be cut between consecutive
    micro-batches: its later part attends to the KV its earlier part wrote, exactly as the next
    chunk of a chunked prefill does (every stage runs the micro-batches in order), so even one
    long prompt flows through the stages in pieces."""
    total = len(plan.ids)
    n = min(max_micro_batches, total)
    if n <= 1:
        return [plan]
    cuts = [total * k // n for k in range(n + 1)]
    starts = [0]
    for q in plan.q_lens:
        starts.append(starts[-1] + q)
    return [_token_range(plan, starts, t0, t1, page_size) for t0, t1 in zip(cuts, cuts[1:], strict=False)]


def _token_range(plan, starts: list[int], t0: int, t1: int, page_size: int):
    """The plan's tokens [t0, t1) as a plan of their own (the parts of the requests they belong to)."""
    q_lens, kv_lens, tables = [], [], []
    for r, kv in enumerate(plan.kv_lens):
        lo, hi = max(starts[r], t0), min(starts[r + 1], t1)
        if lo < hi:
            part_kv = kv - (starts[r + 1] - hi)  # the tokens after this part are not in the pool yet
            q_lens.append(hi - lo)
            kv_lens.append(part_kv)
            tables.append(plan.tables[r][: -(-part_kv // page_size)])
    return type(plan)(
        ids=plan.ids[t0:t1],
        positions=plan.positions[t0:t1],
        pages=plan.pages[t0:t1],
        offsets=plan.offsets[t0:t1],
        logits_index=[i - t0 for i in plan.logits_index if t0 <= i < t1],
        q_lens=q_lens,
        kv_lens=kv_lens,
        tables=tables,
    )


@torch.inference_mode()
def run_pipeline(runner, plan) -> torch.Tensor | None:
    """This rank's part of one pipelined forward; rank 0 returns the logits, the others None."""
    par, model = get_parallel(), runner.model
    kv = StageKV(runner.pool.kv_buffer, model.start_layer)
    stage_rank = lambda s: s * par.tp_size + par.tp_rank  # noqa: E731 - this TP rank in stage s
    hidden = (runner.hf_config.hidden_size,)
    sends, logits = [], []
    for mb in split_plan(plan, MICRO_BATCHES_PER_STAGE * par.pp_size, runner.pool.page_size):
        batch = runner.make_batch(mb)
        if model.is_first_stage:
            x, residual = model.embed_tokens(batch.input_ids), None
        else:
            buf = torch.empty((2, len(mb.ids), *hidden), dtype=runner.dtype, device=runner.device)
            dist.recv(buf, src=stage_rank(par.pp_rank - 1))
            x, residual = buf[0], buf[1]
        x, residual = model.run_layers(x, residual, batch, kv, runner.backend)
        if not model.is_last_stage:
            buf = torch.stack([x, residual])  # kept alive in `sends` until the send completes
            sends.append((dist.isend(buf, dst=stage_rank(par.pp_rank + 1)), buf))
        elif mb.logits_index:
            logits.append(model.compute_logits(x, residual, batch))
    for work, _ in sends:
        work.wait()
    return _logits_to_rank0(plan, logits, runner)


def _logits_to_rank0(plan, logits: list[torch.Tensor], runner) -> torch.Tensor | None:
    par = get_parallel()
    last = (par.pp_size - 1) * par.tp_size  # TP rank 0 of the last stage
    if not plan.logits_index or par.rank not in (0, last):
        return None
    if par.rank == last:
        dist.send(torch.cat(logits).contiguous(), dst=0)
        return None
    out = torch.empty(
        (len(plan.logits_index), runner.hf_config.vocab_size), dtype=torch.float32, device=runner.device
    )
    dist.recv(out, src=last)
    return out
