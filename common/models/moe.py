"""Mixture-of-Experts layers (Qwen3-MoE / Mixtral style) with expert parallelism.

Layout over the TP group of size tp with --ep E (E divides tp): rank r holds experts
[e0, e0 + num_experts/E) with e0 = (r // (tp/E)) * num_experts/E, each expert's intermediate
dimension split (tp/E)-ways. Under TP every rank sees every token, so each rank computes the
contributions of the experts it holds and one all-reduce combines them: the same collective
count as a dense MLP, no all-to-all needed. `--moe-a2a-backend all_to_all` (--ep == --tp) sends
each token only to the ranks holding its experts instead (common/models/moe_a2a.py).

Only the routed experts run: the (token, slot) pairs are grouped by expert on the device
(common/models/moe_align.py) and each expert's weights are read once per block of its tokens:
the Triton kernels of common/models/fused_moe.py on the GPU, batched torch matmuls elsewhere.
"""

from __future__ import annotations

import re

import torch
from disagg.common.models.fused_moe import fused_experts, fused_moe_available
from disagg.common.models.moe_a2a import a2a_moe
from disagg.common.models.moe_align import grouped_experts
from disagg.common.parallel.state import all_reduce, get_parallel
from torch import nn

MOE_ARCHITECTURES = {"Qwen3MoeForCausalLM", "MixtralForCausalLM"}
_EXPERT_RE = re.compile(
    r"(layers\.\d+)\.(?:mlp|block_sparse_moe)\.experts\.(\d+)\.(gate_proj|up_proj|down_proj|w1|w3|w2)\.weight$"
)
_PART = {"gate_proj": 0, "w1": 0, "up_proj": 1, "w3": 1, "down_proj": 2, "w2": 2}


def num_experts_of(config) -> int:
    return getattr(config, "num_experts", None) or config.num_local_experts


def check_ep_layout(config, tp: int, ep: int) -> None:
    experts = num_experts_of(config)
    if experts % ep:
        raise ValueError(f"--ep {ep}: the model's {experts} experts are not divisible by {ep}")
    if ep < 1 or tp % ep:
        raise ValueError(f"--ep {ep} must divide --tp {tp}")
    inter = getattr(config, "moe_intermediate_size", None) or config.intermediate_size
    if inter % (tp // ep):
        raise ValueError(f"expert intermediate size {inter} is not divisible by tp/ep = {tp // ep}")


class Experts(nn.Module):
    def __init__(self, num_local: int, hidden: int, inter_local: int):
        super().__init__()
        self.w13 = nn.Parameter(torch.empty(num_local, 2 * inter_local, hidden))  # gate | up
        self.w2 = nn.Parameter(torch.empty(num_local, hidden, inter_local))


class SparseMoE(nn.Module):
    def __init__(self, config):
        super().__init__()
        ps = get_parallel()
        self.num_experts = num_experts_of(config)
        self.top_k = config.num_experts_per_tok
        # Mixtral renormalizes over the top-k; Qwen3-MoE only when norm_topk_prob
        self.renormalize = getattr(config, "norm_topk_prob", True)
        moe_tp = ps.tp_size // ps.ep_size
        self.num_local = self.num_experts // ps.ep_size
        self.first_expert = (ps.tp_rank // moe_tp) * self.num_local
        self.moe_tp_rank, self.moe_tp = ps.tp_rank % moe_tp, moe_tp
        inter = getattr(config, "moe_intermediate_size", None) or config.intermediate_size
        self.inter_local = inter // moe_tp
        # --moe-a2a-backend: the model config carries it (ModelRunner sets it from EngineConfig)
        self.a2a = getattr(config, "moe_a2a_backend", "none") == "all_to_all" and ps.ep_size > 1
        if self.a2a and moe_tp != 1:
            raise ValueError(
                f"--moe-a2a-backend all_to_all needs --ep equal to --tp (got tp {ps.tp_size}, ep {ps.ep_size})"
            )
        self.gate = nn.Linear(config.hidden_size, self.num_experts, bias=False)
        self.experts = Experts(self.num_local, config.hidden_size, self.inter_local)
        # routed (token, slot) pairs per local expert since the last reset; off by default: the
        # count costs two small kernels a layer, ~5% of a batch-1 decode step
        self.count_tokens = False
        self.register_buffer("expert_tokens", torch.zeros(self.num_local, dtype=torch.long), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = self.route(self.gate(x))  # [T, k] each
        if self.count_tokens:
            self._count(ids)
        if self.a2a and not (x.is_cuda and torch.cuda.is_current_stream_capturing()):
            return a2a_moe(self, x, ids, weights)
        # out of [0, num_local): another rank's expert, skipped (no subtraction kernel on rank 0)
        local = ids - self.first_expert if self.first_expert else ids
        return all_reduce(self.routed_experts(x, local, weights))

    def _count(self, ids: torch.Tensor) -> None:
        local = (ids - self.first_expert).flatten()
        ours = (local >= 0) & (local < self.num_local)
        self.expert_tokens.scatter_add_(0, torch.where(ours, local, 0), ours.long())  # graph-capturable

    def route(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Softmax top-k routing: float32 weights (renormalised over the k if the model says so)
        and int64 global expert ids, each [T, k]."""
        weights, ids = torch.softmax(logits.float(), dim=-1).topk(self.top_k, dim=-1)
        if self.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights, ids

    def routed_experts(self, x: torch.Tensor, local: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """This rank's experts on the tokens routed to them (only those experts' weights are read)."""
        w13, w2 = self.experts.w13, self.experts.w2
        if x.is_cuda and fused_moe_available():
            return fused_experts(x, w13, w2, weights, local)
        capturing = x.is_cuda and torch.cuda.is_current_stream_capturing()
        return grouped_experts(x, w13, w2, weights.to(x.dtype), local, trim=not capturing)


def set_expert_load_stats(model: nn.Module, enabled: bool) -> None:
    """Count routed tokens per expert in every MoE layer (before CUDA graphs are captured)."""
    for m in model.modules():
        if isinstance(m, SparseMoE):
            m.count_tokens = enabled


def expert_load(model: nn.Module, reset: bool = False) -> torch.Tensor:
    """[MoE layers, local experts] routed (token, slot) pairs counted so far on this rank (CPU)."""
    moes = [m for m in model.modules() if isinstance(m, SparseMoE)]
    load = torch.stack([m.expert_tokens for m in moes]).cpu() if moes else torch.zeros(0, 0, dtype=torch.long)
    if reset:
        for m in moes:
            m.expert_tokens.zero_()
    return load


def make_moe(config, layer_id: int) -> nn.Module:
    return SparseMoE(config)


def load_expert_weight(model, params: dict, name: str, tensor_slice) -> bool:
    """Load one checkpoint expert tensor into this rank's slot, if this rank holds that expert."""
    m = _EXPERT_RE.search(name)
    if m is None:
        return False
    moe = model.get_submodule(f"{m.group(1)}.mlp")
    e = int(m.group(2)) - moe.first_expert
    if not 0 <= e < moe.num_local:
        return True  # another rank's expert
    part, n, r = _PART[m.group(3)], moe.inter_local, moe.moe_tp_rank
    if part == 2:
        moe.experts.w2.data[e].copy_(tensor_slice[:, r * n : (r + 1) * n])
    else:
        moe.experts.w13.data[e, part * n : (part + 1) * n].copy_(tensor_slice[r * n : (r + 1) * n])
    return True
