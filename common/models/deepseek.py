"""DeepSeek-V2 / V3: multi-head latent attention (MLA) over a latent paged KV pool, and DeepSeekMoE.

The decoder of decoder.py runs these layers (embedding, norms and LM head are shared); only the
attention and the MLP differ.

MLA caches one latent per token per layer: the normalised compressed KV (kv_lora_rank values) and
the rotated shared key (qk_rope_head_dim values), 576 values for V3, replicated on every TP rank.
The pool keeps its [layers, pages, 2, page_size, heads, dim] layout with one "head" of dim
latent/2, so a page holds exactly page_size latents and the memory planner and transfer/ see a
plain 1-head pool that moves whole pages. Inside a page the bytes are read as [page_size, latent]
(`latent_pages`: a view, no copy): token i's 576 values are contiguous, ckv = [..., :kv_lora_rank]
and kpe = [..., kv_lora_rank:] are the strided [num_pages, page_size, dim] views FlashInfer's MLA
kernels read in place (SGLang's flashinfer_mla_backend keeps the same layout).

Prefill (any new token in the batch with q_len > 1) expands the latents into per-head K and V;
a decode-only batch runs the weight-absorbed form (queries projected into the latent space, one
shared latent "key/value" for all heads), which reads each latent once.
"""

from __future__ import annotations

import functools
import logging
import re

import torch
import torch.nn.functional as F
from disagg.common.engine.attention import AttentionBackend, ForwardBatch, MLABackend, TorchBackend
from disagg.common.models.fp8 import fp8_block_size
from disagg.common.models.fused_mla_rope import deinterleave, fused_mla_rope, fused_mla_rope_ok
from disagg.common.models.fused_moe import (
    ROUTER_GEMV_MAX_TOKENS,
    fused_grouped_topk,
    fused_moe_available,
    fused_topk,
    fused_topk_ok,
    grouped_topk_shape_ok,
    moe_config,
    router_gemv_ok,
    router_logits,
)
from disagg.common.models.gemv import bmm
from disagg.common.models.layers import ColumnParallelLinear, RMSNorm, RotaryEmbedding, RowParallelLinear
from disagg.common.models.moe import SparseMoE
from disagg.common.parallel.state import TPGroup, all_reduce, attn_tp_group, get_parallel
from torch import nn

logger = logging.getLogger(__name__)

DEEPSEEK_ARCHITECTURES = {"DeepseekV2ForCausalLM", "DeepseekV3ForCausalLM"}


def is_mla(config) -> bool:
    return getattr(config, "kv_lora_rank", None) is not None


def attention_backend_for(config, name: str) -> str:
    """The attention backend name an MLA model passes to create_attention_backend: torch, or the
    `_mla` form of auto/flashinfer (FlashInfer's MLA kernels over the latent pages). `auto` falls
    back to torch where the kernels do not take the model's shapes; an explicit flashinfer is then
    refused before anything is built."""
    if not is_mla(config) or name == "torch":
        return name
    reason = flashinfer_mla_unsupported(config)
    if reason is None:
        return f"{name}_mla"
    if name == "flashinfer":
        raise ValueError(
            f"--attention-backend flashinfer: FlashInfer's MLA kernels do not run this model ({reason})"
        )
    return "torch"


def flashinfer_mla_unsupported(config) -> str | None:
    """Why FlashInfer's MLA kernels (fa2/fa3 of FlashInfer 0.7.2) cannot run this model, or None.
    DeepSeek-V2/V3 (512 + 64) and V2-Lite fit; the tiny CPU test configs do not."""
    if config.kv_lora_rank % 128 or config.qk_rope_head_dim % 64:
        return (
            f"kv_lora_rank {config.kv_lora_rank} must be a multiple of 128 and qk_rope_head_dim "
            f"{config.qk_rope_head_dim} a multiple of 64"
        )
    heads = config.num_attention_heads
    # NOTE: the causal (prefill) plan refuses a head count that does not divide its 64/128-row query
    # tiles for some lengths; powers of two up to 128 (every DeepSeek at any TP) never hit it
    if heads & (heads - 1) or heads > 128:
        return f"num_attention_heads {heads} must be a power of two up to 128"
    return None


def mla_dims(config) -> tuple[int, int, int, int]:
    """(kv_lora_rank, qk_rope_head_dim, qk_nope_head_dim, v_head_dim): what the MLA backend weighs
    the absorbed and expanded forms by (attention_flashinfer.expanded_pays)."""
    return config.kv_lora_rank, config.qk_rope_head_dim, config.qk_nope_head_dim, config.v_head_dim


def latent_dim(config) -> int:
    return config.kv_lora_rank + config.qk_rope_head_dim


def latent_half_dim(config) -> int:
    """The pool's head_dim for MLA: half a latent (K slot | V slot)."""
    dim = latent_dim(config)
    if dim % 2:
        raise ValueError(f"MLA latent size kv_lora_rank + qk_rope_head_dim = {dim} must be even")
    return dim // 2


def _yarn_mscale(factor: float, mscale: float) -> float:
    import math

    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def softmax_scale(config) -> float:
    """1/sqrt(qk_head_dim), times mscale^2 under YaRN with mscale_all_dim (as DeepSeek trains it)."""
    scale = (config.qk_nope_head_dim + config.qk_rope_head_dim) ** -0.5
    params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    if params.get("rope_type", params.get("type", "default")) != "default" and params.get("mscale_all_dim"):
        m = _yarn_mscale(params["factor"], params["mscale_all_dim"])
        scale *= m * m
    return scale


class MLAttention(nn.Module):
    def __init__(self, config, layer_id: int, rope: RotaryEmbedding):
        super().__init__()
        group = attn_tp_group()  # the TP group, or with DP attention this DP rank's attention ranks
        tp = group.size
        self.layer_id = layer_id
        self.absorb_plans = None  # W_UK, W_UV on the batched GEMV (gemv.prepare_gemv)
        self.num_heads = config.num_attention_heads // tp
        self.nope, self.rope_dim = config.qk_nope_head_dim, config.qk_rope_head_dim
        self.v_dim, self.rank = config.v_head_dim, config.kv_lora_rank
        self.qk_dim = self.nope + self.rope_dim
        self.q_lora = config.q_lora_rank is not None
        hidden, bias = config.hidden_size, bool(getattr(config, "attention_bias", False))
        q_rows = config.q_lora_rank if self.q_lora else self.num_heads * self.qk_dim
        kv_a_rows = self.rank + self.rope_dim
        # x's two projections as one GEMM (SGLang's fused_qkv_a_proj_with_mqa: one weight read a
        # step, one launch less a layer) where both are whole on this rank: q_a (V3) is replicated
        # like kv_a; V2's per-head q_proj only at attention TP 1. FP8: where the rows meet on a
        # scale block's edge, so each keeps its checkpoint blocks.
        block = fp8_block_size(config)
        self.fused_qkv_a = (self.q_lora or tp == 1) and (block is None or q_rows % block[0] == 0)
        if self.fused_qkv_a:
            self.qkv_a_proj = ColumnParallelLinear(hidden, [q_rows, kv_a_rows], bias=bias, tp=group)
        else:  # V2's q_proj split by heads (attention TP > 1), or FP8 blocks the fused rows would cut
            if self.q_lora:
                self.q_a_proj = ColumnParallelLinear(hidden, [q_rows], bias=bias)  # replicated
            else:
                self.q_proj = ColumnParallelLinear(hidden, [q_rows], tp=group)
            self.kv_a_proj_with_mqa = ColumnParallelLinear(hidden, [kv_a_rows], bias=bias)  # replicated
        if self.q_lora:
            self.q_a_layernorm = RMSNorm(config.q_lora_rank, config.rms_norm_eps)
            self.q_b_proj = ColumnParallelLinear(config.q_lora_rank, [self.num_heads * self.qk_dim], tp=group)
        self.kv_a_layernorm = RMSNorm(self.rank, config.rms_norm_eps)
        # rows per head: k_nope | v (this rank's heads)
        self.kv_b_proj = ColumnParallelLinear(
            self.rank, [self.num_heads * (self.nope + self.v_dim)], tp=group
        )
        self.o_proj = RowParallelLinear(self.num_heads * self.v_dim, hidden, bias=bias, tp=group)
        self.interleaved = config.model_type == "deepseek_v2" or getattr(config, "rope_interleave", False)
        self.scale = softmax_scale(config)
        self.rope = rope
        # the latent's norm, RoPE and the latent write in one Triton launch where it agrees with torch
        w = self.kv_a_layernorm.weight
        self.fused_rope = fused_mla_rope_ok(
            w.device, w.dtype, self.num_heads, self.nope, self.rope_dim, self.rank, self.interleaved
        )

    def forward(self, x, batch: ForwardBatch, kv_buffer: torch.Tensor, backend: AttentionBackend):
        if not batch.q_lens:  # an idle DP-attention rank: no tokens, only the o_proj collective
            return self.o_proj(x.new_zeros(0, self.num_heads * self.v_dim))
        if not isinstance(backend, (MLABackend, TorchBackend)):
            raise NotImplementedError(
                f"MLA runs on the torch or an MLA attention backend, not {type(backend).__name__}"
            )
        q, kv_a = self.project_x(x)  # kv_a [T, rank + rope]: c_kv | k_pe (rows may be strided)
        q = q.view(-1, self.num_heads, self.qk_dim)
        q_nope = q[..., : self.nope]
        kv = kv_buffer[self.layer_id]  # [num_pages, 2, page_size, 1, latent/2]: the pool's view
        if self.fused_rope:
            norm = self.kv_a_layernorm
            q_pe = fused_mla_rope(batch.positions, q, kv_a, norm.weight, norm.eps, latent_pages(kv), batch.out_page,
                                  batch.out_offset, self.rope.table(), self.interleaved)  # fmt: skip
        else:
            q_pe = self.rope_and_write_latent(q[..., self.nope :], kv_a, kv, batch)
        if isinstance(backend, MLABackend) and backend.runs_expanded(batch):
            out = self.ragged_expanded_attention(q_nope, q_pe, latent_pages(kv), batch, backend)
        elif isinstance(backend, MLABackend) and backend.runs_in_place(batch):
            out = self.paged_absorbed_attention(q_nope, q_pe, latent_pages(kv), batch, backend)
        else:
            latent = gather_latent(kv, batch)  # [B, max_kv, latent]
            form = self.absorbed_attention if batch.is_decode_only else self.expanded_attention
            out = form(q_nope, q_pe, latent, batch)
        return self.o_proj(out.reshape(-1, self.num_heads * self.v_dim))

    def project_x(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(q [T, heads * qk], kv_a [T, rank + rope]) from the layer's input."""
        if self.fused_qkv_a:
            q, kv_a = self.qkv_a_proj(x).split(self.qkv_a_proj.out_sizes, dim=-1)
        else:
            q, kv_a = (self.q_a_proj(x) if self.q_lora else self.q_proj(x)), self.kv_a_proj_with_mqa(x)
        if self.q_lora:  # contiguous rows for the fused norm (a no-op at one token)
            q = self.q_b_proj(self.q_a_layernorm(q.contiguous()))
        return q, kv_a

    def rope_and_write_latent(self, q_pe, kv_a, kv: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        """fused_mla_rope's steps one op at a time (FlashInfer's norm and RoPE where they apply)."""
        c_kv, k_pe = kv_a.split([self.rank, self.rope_dim], dim=-1)
        c_kv, k_pe = self.kv_a_layernorm(c_kv), k_pe.unsqueeze(1)  # k_pe [T, 1, rope]
        if self.interleaved:
            q_pe, k_pe = deinterleave(q_pe), deinterleave(k_pe)
        # contiguous: the fused CUDA RoPE rotates in place through a flattened view
        q_pe, k_pe = self.rope(batch.positions, q_pe.contiguous(), k_pe.contiguous())
        write_latent(kv, batch, torch.cat((c_kv, k_pe.squeeze(1)), dim=-1))
        return q_pe

    def _kv_b_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """W_UK [H, nope, rank] and W_UV [H, v, rank] (views of kv_b_proj)."""
        w = self.kv_b_proj.weight.view(self.num_heads, self.nope + self.v_dim, self.rank)
        return w[:, : self.nope], w[:, self.nope :]

    def expanded_attention(self, q_nope, q_pe, latent, batch) -> torch.Tensor:
        """Per-head K and V from the latents (prefill: many queries share each expanded key)."""
        a = batch.attn
        bsz, max_kv = latent.shape[:2]
        c_kv, k_pe = latent.split([self.rank, self.rope_dim], dim=-1)
        kv = self.kv_b_proj(c_kv).view(bsz, max_kv, self.num_heads, self.nope + self.v_dim)
        k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)
        k = torch.cat((k_nope, k_pe.unsqueeze(2).expand(-1, -1, self.num_heads, -1)), dim=-1)
        q = torch.cat((q_nope, q_pe), dim=-1)[a["q_index"]].transpose(1, 2)  # [B, H, max_q, qk]
        out = F.scaled_dot_product_attention(
            q, k.transpose(1, 2), v.transpose(1, 2), attn_mask=a["mask"], scale=self.scale
        )
        return out.transpose(1, 2).reshape(-1, self.num_heads, self.v_dim)[a["out_rows"]]

    def ragged_expanded_attention(self, q_nope, q_pe, pages, batch, backend: MLABackend) -> torch.Tensor:
        """The expanded form on an MLA backend's ragged kernel: every key's latent (the rows its
        prepare() listed, new ones already written) through kv_b_proj into per-head K and V, one
        GEMM for all requests; no padding, no mask tensor (prefill of a long prompt: 192 + 128
        products a query-key pair and head, against the absorbed form's 576 + 512)."""
        latent = pages.reshape(-1, pages.shape[-1])[batch.attn["mla_kv_rows"]]  # [N, latent]
        c_kv, k_pe = latent.split([self.rank, self.rope_dim], dim=-1)
        kv = self.kv_b_proj(c_kv).view(-1, self.num_heads, self.nope + self.v_dim)
        k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)
        k = torch.cat((k_nope, k_pe.unsqueeze(1).expand(-1, self.num_heads, -1)), dim=-1)
        q = torch.cat((q_nope, q_pe), dim=-1)
        # NOTE: v contiguous: one [N, H, v] copy (~1% of the layer at 4096 tokens) for the kernel's
        # plainest layout
        return backend.run_ragged(q, k, v.contiguous(), self.scale, batch)

    def paged_absorbed_attention(self, q_nope, q_pe, pages, batch, backend: MLABackend) -> torch.Tensor:
        """The absorbed form on an MLA backend's kernel, over the latent pages in place (no gather):
        q_nope through W_UK into the latent space, the kernel's latent context through W_UV."""
        w_uk, w_uv = self._kv_b_weights()
        t = q_nope.shape[0]
        # [H, T, nope] @ [H, nope, rank], one GEMM per head, written straight into the [T, H, rank]
        # rows the kernel reads (NOTE: an `out` whose rows are strided by H * rank is cuBLAS's ldc:
        # no copy after the GEMM); the same for the [T, H, v] rows o_proj reads
        # (a decode batch of <= 4 tokens: one Triton batched GEMV each where this device's tune has
        # one, gemv.py)
        uk, uv = self.absorb_plans or (None, None)
        q_lat = bmm(q_nope, w_uk.transpose(1, 2), q_nope.new_empty(t, self.num_heads, self.rank), uk)
        ctx = backend.run_mla(q_lat, q_pe, pages, self.scale, batch)  # [T, H, rank]
        return bmm(ctx, w_uv, q_nope.new_empty(t, self.num_heads, self.v_dim), uv)

    def absorbed_attention(self, q_nope, q_pe, latent, batch) -> torch.Tensor:
        """Queries in the latent space: score = (q_nope W_UK) . c_kv + q_pe . k_pe; the context
        stays a latent until W_UV projects it per head (decode: the latents are read once)."""
        a = batch.attn
        w_uk, w_uv = self._kv_b_weights()
        q_lat = torch.einsum("thd,hdr->thr", q_nope, w_uk)
        q = torch.cat((q_lat, q_pe), dim=-1)[a["q_index"]].transpose(1, 2)  # [B, H, max_q, latent]
        bsz, _, max_q, _ = q.shape
        # one latent shared by all heads: the heads become more query rows of a single-head
        # attention (no per-head copy of the latents, which GQA broadcasting would make on the CPU)
        k = latent.unsqueeze(1)  # [B, 1, max_kv, latent]
        ctx = F.scaled_dot_product_attention(
            q.reshape(bsz, 1, self.num_heads * max_q, -1),
            k,
            k[..., : self.rank],
            attn_mask=a["mask"].repeat(1, 1, self.num_heads, 1),
            scale=self.scale,
        ).view(bsz, self.num_heads, max_q, self.rank)
        ctx = ctx.transpose(1, 2).reshape(-1, self.num_heads, self.rank)[a["out_rows"]]
        return torch.einsum("thr,hvr->thv", ctx, w_uv)


def latent_pages(kv: torch.Tensor) -> torch.Tensor:
    """A layer's pool view [num_pages, 2, page_size, 1, latent/2] read as [num_pages, page_size, latent]:
    the same bytes (each page is contiguous), one contiguous latent per token."""
    return kv.view(kv.shape[0], kv.shape[2], -1)


def latent_rows(batch: ForwardBatch) -> torch.Tensor:
    """[T] row of each new token in a layer's latent_pages(...).view(-1, latent)."""
    return batch.out_page * batch.page_size + batch.out_offset


def write_latent(kv: torch.Tensor, batch: ForwardBatch, latent: torch.Tensor) -> None:
    """Store each new token's latent [T, latent] in its page slot."""
    pages = latent_pages(kv)
    pages.view(-1, pages.shape[-1]).index_copy_(0, latent_rows(batch), latent.to(kv.dtype))


def gather_latent(kv: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
    """Each request's latents, padded: [B, max_kv, latent] (TorchBackend.prepare built the indices)."""
    a = batch.attn
    return latent_pages(kv)[a["kv_page"], a["kv_offset"]]


class DeepseekGate(nn.Module):
    """The router: V2 softmax (greedy or group-limited greedy), V3 sigmoid with a score-correction
    bias and group-limited top-k (groups ranked by their top-2 sum); weights scaled by
    routed_scaling_factor. Computed in float32 as the reference does."""

    def __init__(self, config, num_experts: int):
        super().__init__()
        # float32, as the reference computes the logits (a bf16 checkpoint's values exactly): no
        # per-forward cast of the weight
        self.weight = nn.Parameter(torch.empty(num_experts, config.hidden_size, dtype=torch.float32))
        self.v3 = config.model_type != "deepseek_v2"
        if self.v3:
            self.e_score_correction_bias = nn.Parameter(torch.zeros(num_experts, dtype=torch.float32))
        self.grouped = self.v3 or getattr(config, "topk_method", "greedy") == "group_limited_greedy"
        self.n_group, self.topk_group = config.n_group or 1, config.topk_group or 1
        self.top_k = config.num_experts_per_tok
        self.norm_topk = bool(getattr(config, "norm_topk_prob", False))
        self.scaling = config.routed_scaling_factor
        # one Triton launch on the GPU where it agrees with torch (instead of ~6 small kernels a layer
        # for V2's plain softmax top-k, moe.py's routing; ~12 for V3's biased group-limited one)
        device = self.weight.device
        if self.v3:
            self.fused = grouped_topk_shape_ok(num_experts, self.n_group, self.topk_group, self.top_k) and (
                fused_v3_routing_ok(device, num_experts, self.top_k, self.n_group, self.topk_group, self.norm_topk)
            )  # fmt: skip
        else:
            self.fused = not self.grouped and fused_topk_ok(device, num_experts, self.top_k, False)
        # the logits of a decode batch in one Triton launch (F.linear(x.float(), w) is ~4: the cast,
        # cuBLAS's split GEMV and its reduction)
        self.gemv = router_gemv_ok(device, num_experts, config.hidden_size, torch.float32)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """[T, hidden] -> float32 [T, E]."""
        if self.gemv and x.is_cuda and x.shape[0] <= ROUTER_GEMV_MAX_TOKENS:
            return router_logits(x, self.weight)
        return F.linear(x.float(), self.weight)

    def forward(self, x: torch.Tensor, shared: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, hidden] -> (weights [T, k] float32, expert ids [T, k]); `shared` more slots a token:
        experts E, E + 1, ... with weight 1 (DeepseekMoE.fuse_shared_experts)."""
        logits = self.logits(x)
        if self.fused and logits.is_cuda:
            if self.v3:
                return fused_grouped_topk(
                    logits, self.e_score_correction_bias, self.top_k, self.n_group, self.topk_group,
                    self.norm_topk, self.scaling, shared,
                )  # fmt: skip
            return fused_topk(logits, self.top_k, False, self.scaling, shared)
        bias = self.e_score_correction_bias if self.v3 else None
        weights, ids = route(logits, bias, self.top_k, self.n_group if self.grouped else 1, self.topk_group,
                             self.norm_topk, self.scaling)  # fmt: skip
        if not shared:
            return weights, ids
        slots = torch.arange(logits.shape[1], logits.shape[1] + shared, device=ids.device).expand(
            len(ids), -1
        )
        ones = torch.ones(slots.shape, dtype=weights.dtype, device=weights.device)
        return torch.cat((weights, ones), 1), torch.cat((ids, slots), 1)


def route(
    logits: torch.Tensor,
    bias: torch.Tensor | None,
    k: int,
    n_group: int,
    topk_group: int,
    norm_topk: bool,
    scaling: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference routing in torch: V3 (`bias` given) sigmoid scores, the choice = scores + bias,
    groups ranked by their top-2 sum; V2 softmax, groups ranked by their best (group_limited_greedy;
    n_group 1: plain greedy). Top-k choices of the best `topk_group` groups; weights = their scores
    (V3: over their sum if norm_topk) x scaling."""
    v3 = bias is not None
    scores = logits.sigmoid() if v3 else logits.softmax(dim=-1)
    choice = scores + bias.float() if v3 else scores
    if n_group > 1:
        t, e = choice.shape
        groups = choice.view(t, n_group, e // n_group)
        group_scores = groups.topk(2, dim=-1)[0].sum(-1) if v3 else groups.max(dim=-1).values
        keep = torch.zeros_like(group_scores)
        keep.scatter_(1, group_scores.topk(topk_group, dim=-1, sorted=False)[1], 1)
        keep = keep.bool().unsqueeze(-1).expand(-1, -1, e // n_group).reshape(t, e)
        choice = choice.masked_fill(~keep, float("-inf"))
    ids = choice.topk(k, dim=-1, sorted=False)[1]
    weights = scores.gather(1, ids)
    if norm_topk and v3:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * scaling, ids


@functools.cache
def fused_v3_routing_ok(
    device: torch.device, num_experts: int, k: int, n_group: int, topk_group: int, norm_topk: bool
) -> bool:
    """Whether fused_grouped_topk picks `route`'s experts with its weights on this device and shape
    (checked once when a layer is built, never inside a graph capture): on a mismatch or an error
    the layer keeps the torch routing, so a kernel bug costs speed, not tokens."""
    if not (fused_moe_available() and device.type == "cuda"):
        return False
    try:
        return check_grouped_topk(device, num_experts, k, n_group, topk_group, norm_topk)
    except Exception:  # noqa: BLE001 - any failure: the torch routing, loudly
        logger.exception(
            "fused_grouped_topk failed its start-up check (E=%d, k=%d): torch routing", num_experts, k
        )
        return False


def check_grouped_topk(
    device: torch.device, num_experts: int, k: int, n_group: int, topk_group: int, norm_topk: bool
) -> bool:
    """fused_grouped_topk against `route` on 256 random float32 tokens (ids compared as sets: torch's
    unsorted top-k has no order; weights matched per id). Logs what differs."""
    gen = torch.Generator(device=device).manual_seed(0)
    # NOTE: float32 explicitly (layers are built under a bf16 default dtype: bf16 values tie often)
    logits = torch.randn(256, num_experts, device=device, generator=gen, dtype=torch.float32)
    bias = torch.randn(num_experts, device=device, generator=gen, dtype=torch.float32) / 10
    got_w, got_ids = fused_grouped_topk(logits, bias, k, n_group, topk_group, norm_topk, 2.5)
    want_w, want_ids = route(logits, bias, k, n_group, topk_group, norm_topk, 2.5)
    got_ids, order = got_ids.sort(dim=-1)
    want_ids, want_order = want_ids.sort(dim=-1)
    ok = torch.equal(got_ids, want_ids) and torch.allclose(
        got_w.gather(1, order), want_w.gather(1, want_order), rtol=1e-5, atol=1e-6
    )
    if not ok:
        logger.warning("fused_grouped_topk disagrees with torch (E=%d, k=%d): torch routing", num_experts, k)
    return ok


class DeepseekMoE(SparseMoE):
    """DeepSeekMoE: routed experts (moe.py's expert compute and EP layout) plus always-on shared
    experts; one all-reduce joins both."""

    def __init__(self, config):
        super().__init__(config)
        from disagg.common.models.decoder import MLP

        self.gate = DeepseekGate(config, self.num_experts)
        shared = config.moe_intermediate_size * (config.n_shared_experts or 0)
        # DP attention with the all-to-all MoE: each rank holds only its own tokens, so the shared
        # experts are replicated and run on them (as SGLang does with DeepEP); else TP-split
        replicated = self.a2a and get_parallel().attn_dp_size > 1
        shared_tp = TPGroup(0, 1, None) if replicated else None
        self.shared_experts = MLP(config.hidden_size, shared, shared_tp) if shared else None
        if self.shared_experts is not None:
            self.shared_experts.down_proj.reduce = False  # reduced together with the routed part
        self.num_shared_fused = 0  # shared experts appended to the routed ones (fuse_shared_experts)
        self.fused_in_place = True  # ... into the room spare_slots left (no stack copied)
        self.fused_config: dict | None = None

    def spare_slots(self, config) -> int:
        """Room after the routed experts for the shared ones' slots where fuse_shared_experts will
        fuse them (ModelRunner sets config.fuse_shared_experts): fusing then copies no expert stack,
        so the load's peak stays the kept bytes. (Where the fusion still declines, e.g. FP8 pieces
        that cut a block, the room stays unused: n_shared of num_experts slots.)"""
        remap = getattr(config, "expert_remap", False) or self.num_physical != self.num_experts
        fuses = getattr(config, "fuse_shared_experts", False) and self._fusable_layout(remap)
        return (config.n_shared_experts or 0) if fuses else 0

    def _fusable_layout(self, remap: bool) -> bool:
        """Every expert local and unreplicated: no EP, no EPLB replicas (`remap`), no all-to-all."""
        return not self.a2a and self.num_local == self.num_experts and not remap

    @torch.no_grad()
    def fuse_shared_experts(self) -> bool:
        """The shared MLP as more experts after the routed ones (SGLang's shared-experts fusion): its
        intermediate cut into pieces of a routed expert's width, each piece a w13/w2 slot that every
        token routes to with weight 1 (the routing kernels write those slots), so one GEMV or grouped
        GEMM runs both and the shared MLP's own GEMMs, activation and add are gone. Only where every
        expert is local and unreplicated (no EP, no EPLB replicas, no all-to-all) and the weights'
        kinds match (both bf16, or both FP8 with whole blocks a piece). Returns whether it fused."""
        mlp, experts = self.shared_experts, self.experts
        if mlp is None or not self._fusable_layout(self.remap):
            return False
        width = self.inter_local
        gate_up, down = mlp.gate_up_proj, mlp.down_proj
        pieces, rest = divmod(down.weight.shape[1], width)
        fp8 = experts.fp8_block is not None
        if (
            rest
            or fp8 != (gate_up.weight_scale_inv is not None)
            or fp8 != (down.weight_scale_inv is not None)
        ):
            return False
        if fp8 and (width % experts.fp8_block[0] or width % experts.fp8_block[1]):
            return False
        # piece j: its gate rows then its up rows of gate_up ([gate | up] -> [2, pieces, rows]), its
        # columns of down; FP8: the block scales cut alike, a piece width / block rows (columns) of them
        cuts = [("w13", "w2", gate_up.weight, down.weight, width, width)]
        if fp8:
            bn, bk = experts.fp8_block
            cuts.append(("w13_scale_inv", "w2_scale_inv", gate_up.weight_scale_inv, down.weight_scale_inv,
                         width // bn, width // bk))  # fmt: skip
        for name13, name2, rows_of, cols_of, rows, cols in cuts:
            w13 = rows_of.view(2, pieces, rows, -1).transpose(0, 1).reshape(pieces, 2 * rows, -1)
            w2 = cols_of.view(cols_of.shape[0], pieces, cols).transpose(0, 1)
            for name, slots in ((name13, w13), (name2, w2)):
                in_place = experts.grow_slots(name, slots)  # into the room spare_slots left, where it did
                self.fused_in_place = self.fused_in_place and in_place
        self.shared_experts, self.num_shared_fused = None, pieces
        # the routed shape's tuned block sizes, the GEMV taking a batch's shared slots too
        config = dict(moe_config(self.num_experts, width, experts.w2.shape[1], fp8))
        config["gemv_max_pairs"] = config["gemv_max_pairs"] * (self.top_k + pieces) // self.top_k
        self.fused_config = config
        return True

    def persistent_routing(self) -> tuple[bool, float, int] | None:
        """V2's softmax greedy top-k (no renormalisation), the shared experts fused as slots or absent;
        V3's sigmoid group-limited top-k is not persistent_moe's."""
        gate = self.gate
        if gate.v3 or gate.grouped or (self.shared_experts is not None and not self.num_shared_fused):
            return None
        return False, gate.scaling, self.num_shared_fused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.persistent_block(x)
        if out is not None:  # moe.py: every expert on this rank, the shared ones fused
            return out
        if self.num_shared_fused:  # every expert local, none replicated: the ids are the slots
            weights, ids = self.gate(x, self.num_shared_fused)  # [T, k + shared]
            if self.count_tokens:
                self._count(ids[:, : self.top_k])
            return all_reduce(self.routed_experts(x, ids, weights, self.fused_config))
        weights, ids = self.gate(x)
        if self.count_tokens:  # moe.py's per-expert load counters (set_expert_load_stats)
            self._count(ids)
        ids = self.physical_ids(ids)  # EPLB: one replica of each routed expert (moe.py)
        if self.uses_all_to_all(x):
            from disagg.common.models.moe_a2a import a2a_moe

            out = a2a_moe(self, x, ids, weights)
            if self.shared_experts is None:
                return out
            return out + all_reduce(self.shared_experts(x), self.shared_experts.down_proj.tp)
        local = ids - self.first_expert if self.first_expert else ids
        out = self.routed_experts(x, local, weights)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return all_reduce(out)


def fuse_shared_experts(model: nn.Module) -> int:
    """DeepseekMoE.fuse_shared_experts in every layer that takes it; returns how many did."""
    return sum(m.fuse_shared_experts() for m in model.modules() if isinstance(m, DeepseekMoE))


def make_deepseek_mlp(config, layer_id: int) -> nn.Module:
    from disagg.common.models.decoder import MLP

    if config.n_routed_experts and layer_id >= (config.first_k_dense_replace or 0):
        return DeepseekMoE(config)
    return MLP(config.hidden_size, config.intermediate_size)


_HEAD_SPLIT = re.compile(r"self_attn\.(q_proj|q_b_proj|kv_b_proj)\.weight$")
_X_PROJ = re.compile(r"self_attn\.(q_a_proj|q_proj|kv_a_proj_with_mqa)\.(weight|bias)$")


def load_mla_weight(model, params: dict, name: str, tensor_slice) -> tuple[bool, str | None]:
    """(handled, parameter name) for the checkpoint tensors MLA loads its own way: x's two
    projections into their fused rows (MLAttention.fused_qkv_a), per-head projections split by rows
    across TP ranks. `name` has the "model." prefix removed."""
    from disagg.common.models.weights import copy_weight

    m = _X_PROJ.search(name)
    attn = model.get_submodule(name[: m.start()] + "self_attn") if m else None
    if attn is not None and attn.fused_qkv_a:
        pname = name[: m.start()] + f"self_attn.qkv_a_proj.{m.group(2)}"
        sizes = attn.qkv_a_proj.out_sizes  # [q rows, kv_a rows]
        start, size = (sizes[0], sizes[1]) if m.group(1) == "kv_a_proj_with_mqa" else (0, sizes[0])
        copy_weight(model, params, pname, (slice(start, start + size),), tensor_slice)
        return True, pname
    if _HEAD_SPLIT.search(name) is None:
        return False, None

    # the rank among the layer's ranks: the TP group, or with DP attention the attention group
    rows, r = params[name].shape[0], model.get_submodule(name.rsplit(".", 1)[0]).tp.rank
    copy_weight(model, params, name, (), tensor_slice, (slice(r * rows, (r + 1) * rows),))
    return True, name
