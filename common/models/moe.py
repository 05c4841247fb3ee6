"""Mixture-of-Experts layers (Qwen3-MoE / Mixtral style) with expert parallelism.

Layout over the TP group of size tp with --ep E (E divides tp): rank r holds experts
[e0, e0 + num_experts/E) with e0 = (r // (tp/E)) * num_experts/E, each expert's intermediate
dimension split (tp/E)-ways. Under TP every rank sees every token, so each rank computes the
contributions of the experts it holds and one all-reduce combines them: the same collective
count as a dense MLP, no all-to-all needed. `--moe-a2a-backend all_to_all` (--ep == --tp) sends
each token only to the ranks holding its experts instead (common/models/moe_a2a.py), in DeepEP's
normal or low-latency exchange (`--deepep-mode`; low latency is CUDA-graph capturable).

Redundant experts (--ep-num-redundant-experts N, EPLB): the E logical experts live in E + N physical
slots, (E + N) / ep per rank; slot p holds logical expert `physical_to_logical[p]` (p % E until a
placement from the recorded load replaces it: common/models/eplb.py), and each routed pair goes to
one replica of its expert. "first_expert" and "num_local" then count physical slots.

Only the routed experts run: the (token, slot) pairs are grouped by expert on the device
(common/models/moe_align.py) and each expert's weights are read once per block of its tokens:
the Triton kernels of common/models/fused_moe.py on the GPU, batched torch matmuls elsewhere.
"""

from __future__ import annotations

import math
import re

import torch
from disagg.common.config import persistent_moe_requested, triton_interpret
from disagg.common.models.fused_moe import (
    ROUTER_GEMV_MAX_TOKENS,
    fused_experts,
    fused_moe_available,
    fused_topk,
    fused_topk_ok,
    router_gemv_ok,
    router_logits,
)
from disagg.common.models.moe_a2a import a2a_moe, capturing
from disagg.common.models.moe_align import ExpertScales, grouped_experts
from disagg.common.models.persistent_moe import new_scratch, persistent_moe, persistent_moe_available
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
    num_redundant = getattr(config, "ep_num_redundant_experts", 0) or 0  # ModelRunner sets it
    experts = num_experts_of(config) + num_redundant
    if experts % ep:
        extra = f" + {num_redundant} redundant" if num_redundant else ""
        raise ValueError(
            f"--ep {ep}: the model's {experts - num_redundant}{extra} experts are not divisible by {ep}"
        )
    if ep < 1 or tp % ep:
        raise ValueError(f"--ep {ep} must divide --tp {tp}")
    inter = getattr(config, "moe_intermediate_size", None) or config.intermediate_size
    if inter % (tp // ep):
        raise ValueError(f"expert intermediate size {inter} is not divisible by tp/ep = {tp // ep}")


class Experts(nn.Module):
    def __init__(self, num_local: int, hidden: int, inter_local: int, spare: int = 0):
        """`spare`: slots allocated after the local experts' (w13, w2 and FP8 scales alike) for
        grow_slots to fill later without copying the stacks (DeepSeek's fused shared experts)."""
        super().__init__()
        self.spare = spare
        self.w13 = nn.Parameter(_with_room((num_local, 2 * inter_local, hidden), spare))  # gate | up
        self.w2 = nn.Parameter(_with_room((num_local, hidden, inter_local), spare))
        self.fp8_block: tuple[int, int] | None = None  # set by quantize (FP8 checkpoints)
        self.fp8_backend: str | None = None  # "triton": the fused FP8 kernels; "torch": the reference

    @property
    def scales(self) -> ExpertScales | None:
        if self.fp8_block is None:
            return None
        return ExpertScales(self.w13_scale_inv, self.w2_scale_inv, self.fp8_block)

    @torch.no_grad()
    def quantize(self, block: tuple[int, int], backend: str) -> None:
        """Keep w13 / w2 as float8_e4m3fn in [block_n, block_k] blocks + float32 `*_scale_inv`: weights
        not allocated yet (fp8.deferred_fp8_weights) get empty ones for the loader to fill; dense
        ones are quantized expert by expert (one expert's dense copy at a time)."""
        from disagg.common.models.fp8 import empty_fp8_blocks, is_unallocated, quantize_weight_blocks

        for name in ("w13", "w2"):
            dense = getattr(self, name)
            n, *rest = dense.shape
            q, scale = empty_fp8_blocks((n + self.spare, *rest), block, dense.device)  # the spare room too
            q, scale = q[:n], scale[:n]
            if not is_unallocated(dense):
                for e in range(n):
                    q[e], scale[e] = quantize_weight_blocks(dense.data[e], block)
            setattr(self, name, nn.Parameter(q, requires_grad=False))
            setattr(self, f"{name}_scale_inv", nn.Parameter(scale, requires_grad=False))
        self.fp8_block, self.fp8_backend = block, backend

    @torch.no_grad()
    def grow_slots(self, name: str, slots: torch.Tensor) -> bool:
        """Append `slots` to the stack `name` (w13, w2 or their *_scale_inv): in the room allocated
        after it (`spare`) where there is enough, else as a new stack (a copy: the old one's bytes
        stay allocated until it is built). Returns whether it was the room."""
        old = getattr(self, name)
        n, want = old.shape[0], (old.shape[0] + slots.shape[0], *old.shape[1:])
        storage = old.untyped_storage()
        if (
            old.is_contiguous()
            and old.storage_offset() == 0
            and storage.nbytes() >= math.prod(want) * old.element_size()
        ):
            grown = old.new_empty(0).set_(storage, 0, want)
            grown[n:] = slots
        else:
            grown = torch.cat((old, slots))
        setattr(self, name, nn.Parameter(grown, requires_grad=False))
        return grown.untyped_storage().data_ptr() == storage.data_ptr()


def _with_room(shape: tuple[int, ...], spare: int) -> torch.Tensor:
    """An uninitialised stack of `shape` whose storage has room for `spare` more slots after it."""
    if not spare:
        return torch.empty(shape)
    return torch.empty(shape[0] + spare, *shape[1:])[: shape[0]]


def check_fp8_expert_split(inter: int, moe_tp: int, block: tuple[int, int]) -> None:
    """FP8 experts keep the checkpoint's block grid: each rank's slice of the intermediate dimension
    (the gate and up rows of w13, the columns of w2) must be whole blocks."""
    inter_local = inter // moe_tp
    if inter_local % block[0] or inter_local % block[1]:
        raise ValueError(
            f"FP8 experts: moe intermediate size {inter} split {moe_tp} ways (tp/ep) is {inter_local} per "
            f"rank, not a multiple of the checkpoint's {list(block)} blocks; choose --tp/--ep so that "
            f"{inter} / (tp/ep) is a multiple of {max(block)}, or dequantize with DISAGG_FP8_GEMM=off"
        )


def quantize_experts(model: nn.Module, block: tuple[int, int], backend: str) -> int:
    """Every MoE layer's experts to FP8 blocks (after the weights are loaded); returns the layer count."""
    moes = [m for m in model.modules() if isinstance(m, SparseMoE)]
    for moe in moes:
        check_fp8_expert_split(moe.inter_local * moe.moe_tp, moe.moe_tp, block)
        moe.experts.quantize(block, backend)
    return len(moes)


class SparseMoE(nn.Module):
    def __init__(self, config):
        super().__init__()
        ps = get_parallel()
        self.num_experts = num_experts_of(config)
        self.top_k = config.num_experts_per_tok
        # Mixtral renormalizes over the top-k; Qwen3-MoE only when norm_topk_prob
        self.renormalize = getattr(config, "norm_topk_prob", True)
        moe_tp = ps.tp_size // ps.ep_size
        # physical expert slots: the logical experts plus the redundant replicas (ModelRunner sets it)
        self.num_physical = self.num_experts + (getattr(config, "ep_num_redundant_experts", 0) or 0)
        self.num_local = self.num_physical // ps.ep_size  # slots on this rank
        self.first_expert = (ps.tp_rank // moe_tp) * self.num_local  # this rank's first physical slot
        self.moe_tp_rank, self.moe_tp = ps.tp_rank % moe_tp, moe_tp
        inter = getattr(config, "moe_intermediate_size", None) or config.intermediate_size
        self.inter_local = inter // moe_tp
        # --moe-a2a-backend: the model config carries it (ModelRunner sets it from EngineConfig)
        self.a2a = getattr(config, "moe_a2a_backend", "none") == "all_to_all" and ps.ep_size > 1
        self.a2a_mode = getattr(config, "deepep_mode", "auto")  # --deepep-mode (moe_a2a.py)
        if self.a2a and moe_tp != 1:
            raise ValueError(
                f"--moe-a2a-backend all_to_all needs --ep equal to --tp (got tp {ps.tp_size}, ep {ps.ep_size})"
            )
        self.gate = nn.Linear(config.hidden_size, self.num_experts, bias=False)
        # one Triton launch for softmax + top-k + renormalisation on the GPU, where it agrees with torch
        self.fused_routing = fused_topk_ok(
            self.gate.weight.device, self.num_experts, self.top_k, self.renormalize
        )
        # and the gate's GEMV of a decode batch as one Triton launch (cuBLAS's: ~5 us at batch 1)
        self.router_gemv = router_gemv_ok(
            self.gate.weight.device, self.num_experts, config.hidden_size, self.gate.weight.dtype
        )
        self.experts = Experts(self.num_local, config.hidden_size, self.inter_local, self.spare_slots(config))
        # count the routed (token, slot) pairs per expert (expert_load); off by default: the
        # count costs two small kernels a layer, ~5% of a batch-1 decode step
        self.count_tokens = False
        # logical expert -> routed pairs; every rank routes every token, so this counts all experts
        self.register_buffer(
            "expert_tokens", torch.zeros(self.num_experts, dtype=torch.long), persistent=False
        )
        self._init_placement(getattr(config, "expert_remap", False))
        # DISAGG_PERSISTENT_MOE=1: one token's block as one launch where it applies (persistent_block)
        self.persistent = persistent_moe_requested() and persistent_moe_available()
        self._persistent_scratch: dict | None = None

    def spare_slots(self, config) -> int:
        """Expert slots to allocate beyond the local experts (DeepseekMoE: its fused shared experts)."""
        return 0

    def _init_placement(self, remap: bool) -> None:
        """The logical -> physical maps. remap (decided before CUDA graphs are captured, as they
        bake the choice in): pairs go through `replicas` (EPLB), else physical == logical."""
        self.remap = remap or self.num_physical != self.num_experts
        self.physical_to_logical = [p % self.num_experts for p in range(self.num_physical)]
        max_copies = self.num_physical - self.num_experts + 1
        # [E, max copies] physical slots of each logical expert (padded by repeats), [E] copies each
        self.register_buffer(
            "replicas", torch.zeros(self.num_experts, max_copies, dtype=torch.long), persistent=False
        )
        self.register_buffer("num_replicas", torch.ones(self.num_experts, dtype=torch.long), persistent=False)
        self.set_placement(self.physical_to_logical)

    def set_placement(self, physical_to_logical: list[int]) -> None:
        """Route to this placement from now on (in place: captured CUDA graphs follow it). The
        weights must already be in their slots (eplb.apply_placement moves them)."""
        copies = [
            [p for p, e in enumerate(physical_to_logical) if e == expert]
            for expert in range(self.num_experts)
        ]
        if len(physical_to_logical) != self.num_physical or min(map(len, copies)) == 0:
            raise ValueError(
                f"a placement needs {self.num_physical} slots holding each of {self.num_experts} experts"
            )
        width = self.replicas.shape[1]
        table = [(c * width)[:width] for c in copies]
        self.replicas.copy_(torch.tensor(table, dtype=torch.long))
        self.num_replicas.copy_(torch.tensor([min(len(c), width) for c in copies], dtype=torch.long))
        self.physical_to_logical = list(physical_to_logical)

    def physical_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """[T, k] logical expert ids -> physical slots: pair p takes replica p mod (its expert's copies),
        so a hot expert's pairs spread over its copies (no host sync, graph-capturable)."""
        if not self.remap:
            return ids
        pair = torch.arange(ids.numel(), device=ids.device).view_as(ids)
        return self.replicas[ids, pair % self.num_replicas[ids]]

    def local_slots(self, expert: int) -> list[int]:
        """This rank's slots (0-based) holding logical `expert`."""
        mine = self.physical_to_logical[self.first_expert : self.first_expert + self.num_local]
        return [s for s, e in enumerate(mine) if e == expert]

    def persistent_routing(self) -> tuple[bool, float, int] | None:
        """(renormalize, scaling, shared slots) of a routing persistent_moe computes (softmax top-k),
        or None."""
        return self.renormalize, 1.0, 0

    def persistent_block(
        self, x: torch.Tensor, residual: torch.Tensor | None = None, norm: nn.Module | None = None
    ) -> torch.Tensor | None:
        """One token's whole block (router GEMV, top-k, the experts) as one persistent launch
        (common/models/persistent_moe.py), or None where it does not compute what this layer does: it
        needs one token on a GPU (or in Triton's interpreter: the CPU tests), every expert local,
        unsplit and unreplicated (no EP, no MoE TP, no EPLB, no all-to-all), experts in x's dtype (no
        FP8), the routing persistent_routing names, no token counts. With `residual` and `norm` (the
        decoder layer's post-attention RMSNorm) x is the attention's output: the launch norms
        x + residual itself and leaves that sum in `residual` (in place, as the fused add-RMSNorm)."""
        if not self.persistent:  # the default: one attribute read a layer
            return None
        routing = self.persistent_routing()
        w13, w2 = self.experts.w13, self.experts.w2
        if (
            routing is None
            or not (x.is_cuda or triton_interpret())
            or x.shape[0] != 1
            or self.count_tokens
            or self.remap
            or self.a2a
            or self.num_local != self.num_experts
            or self.moe_tp != 1
            or self.experts.scales is not None
            or w13.dtype != x.dtype
            or not (residual is None or (x.is_contiguous() and residual.is_contiguous()))
        ):
            return None
        renormalize, scaling, shared = routing
        if self._persistent_scratch is None:  # the counters start zeroed; each launch leaves them so
            if capturing(x):  # NOTE: a capture's zeros are written at replay: an eager launch before
                return None  # would find them unset (the graph runners' eager warm-up makes it first)
            self._persistent_scratch = new_scratch(
                self.num_experts, self.top_k + shared, w2.shape[2], x.device
            )
        return persistent_moe(
            x, self.gate.weight, w13, w2, self.top_k, renormalize, scaling, shared,
            scratch=self._persistent_scratch, residual=residual,
            norm_weight=None if norm is None else norm.weight, eps=1e-6 if norm is None else norm.eps,
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.persistent_block(x)
        if out is not None:  # every expert on this rank and unsplit: nothing to reduce
            return out
        weights, ids = self.route(self.logits(x))  # [T, k] each
        if self.count_tokens:
            self._count(ids)
        ids = self.physical_ids(ids)
        if self.uses_all_to_all(x):
            return a2a_moe(self, x, ids, weights)
        # out of [0, num_local): another rank's expert, skipped (no subtraction kernel on rank 0)
        local = ids - self.first_expert if self.first_expert else ids
        return all_reduce(self.routed_experts(x, local, weights))

    def uses_all_to_all(self, x: torch.Tensor) -> bool:
        """The all-to-all layout for this forward; a CUDA graph capture under --deepep-mode normal
        falls back to the all-reduce layout (normal mode reads the send counts on the host)."""
        return self.a2a and not (self.a2a_mode == "normal" and capturing(x))

    def _count(self, ids: torch.Tensor) -> None:
        """ids: [T, k] logical expert ids."""
        flat = ids.flatten()
        self.expert_tokens.scatter_add_(0, flat, torch.ones_like(flat))  # graph-capturable

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The gate's logits [T, E], in its dtype."""
        if self.router_gemv and x.is_cuda and x.shape[0] <= ROUTER_GEMV_MAX_TOKENS:
            return router_logits(x, self.gate.weight)
        return self.gate(x)

    def route(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Softmax top-k routing: float32 weights (renormalised over the k if the model says so)
        and int64 global expert ids, each [T, k]."""
        if self.fused_routing and logits.is_cuda:
            return fused_topk(logits, self.top_k, self.renormalize)
        weights, ids = torch.softmax(logits.float(), dim=-1).topk(self.top_k, dim=-1)
        if self.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights, ids

    def routed_experts(
        self, x: torch.Tensor, local: torch.Tensor, weights: torch.Tensor, config: dict | None = None
    ) -> torch.Tensor:
        """This rank's experts on the tokens routed to them (only those experts' weights are read);
        `config`: the fused kernels' block sizes (default: the table's for the experts' shape)."""
        w13, w2, scales = self.experts.w13, self.experts.w2, self.experts.scales
        # FP8 experts take the fused kernels only where the FP8 GEMMs run in Triton (fp8.py's rule)
        fused = scales is None or self.experts.fp8_backend == "triton"
        if x.is_cuda and fused_moe_available() and fused:
            # foreign: some ids may be out of range (another rank's expert, an all-to-all pad row: the
            # all-to-all needs ep > 1, so there are other ranks' experts then too)
            foreign = self.num_local < self.num_physical
            return fused_experts(x, w13, w2, weights, local, config, scales=scales, foreign=foreign)
        capturing = x.is_cuda and torch.cuda.is_current_stream_capturing()
        return grouped_experts(x, w13, w2, weights.to(x.dtype), local, trim=not capturing, scales=scales)


def set_expert_load_stats(model: nn.Module, enabled: bool) -> None:
    """Count routed tokens per expert in every MoE layer (before CUDA graphs are captured)."""
    for m in model.modules():
        if isinstance(m, SparseMoE):
            m.count_tokens = enabled


def expert_load(model: nn.Module, reset: bool = False) -> torch.Tensor:
    """[MoE layers, logical experts] routed (token, slot) pairs counted so far (CPU). Every rank
    routes every token (TP attention), so any rank's count is the whole model's."""
    moes = [m for m in model.modules() if isinstance(m, SparseMoE)]
    load = torch.stack([m.expert_tokens for m in moes]).cpu() if moes else torch.zeros(0, 0, dtype=torch.long)
    if reset:
        for m in moes:
            m.expert_tokens.zero_()
    return load


def make_moe(config, layer_id: int) -> nn.Module:
    return SparseMoE(config)


def load_expert_weight(model, params: dict, name: str, tensor_slice) -> bool:
    """Load one checkpoint expert tensor into this rank's slot, if this rank holds that expert
    (FP8 experts: its FP8 values and block scales, weights.copy_weight)."""
    from disagg.common.models.weights import copy_weight

    m = _EXPERT_RE.search(name)
    if m is None:
        return False
    prefix = f"{m.group(1)}.mlp"
    moe = model.get_submodule(prefix)
    part, n, r = _PART[m.group(3)], moe.inter_local, moe.moe_tp_rank
    mine = slice(r * n, (r + 1) * n)  # this rank's share of the intermediate dimension
    for e in moe.local_slots(int(m.group(2))):  # none: another rank's expert; several: replicas
        if part == 2:
            copy_weight(model, params, f"{prefix}.experts.w2", (e,), tensor_slice, (slice(None), mine))
        else:
            rows = (e, slice(part * n, (part + 1) * n))
            copy_weight(model, params, f"{prefix}.experts.w13", rows, tensor_slice, (mine,))
    return True
