"""The decoder: Llama / Mistral / Qwen2 / Qwen3 (dense), their MoE variants (moe.py) and DeepSeek-V2/V3
(MLA + DeepSeekMoE layers, deepseek.py), tensor parallel, over a paged KV pool.

Runs a flattened batch of tokens from many requests at once (no padding). Parameter names follow
the Hugging Face checkpoints, with q/k/v and gate/up fused (see weights.py for the mapping).
"""

from __future__ import annotations

import torch
from disagg.common.engine.attention import AttentionBackend, ForwardBatch
from disagg.common.models.deepseek import DEEPSEEK_ARCHITECTURES, MLAttention, is_mla, latent_half_dim
from disagg.common.models.fused_rope_kv import fused_rope_kv, fused_rope_kv_ok
from disagg.common.models.kernels import silu_and_mul
from disagg.common.models.layers import (
    ColumnParallelLinear,
    RMSNorm,
    RotaryEmbedding,
    RowParallelLinear,
    VocabParallelEmbedding,
)
from disagg.common.models.moe_a2a import set_forward_shape
from disagg.common.parallel.dp_attention import dp_gather_tokens, dp_logits, dp_scatter_tokens, lm_head_group
from disagg.common.parallel.state import TPGroup, attn_tp_group, get_parallel, tp_group
from torch import nn

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
} | DEEPSEEK_ARCHITECTURES


def head_dim_of(config) -> int:
    """The KV pool's head_dim. MLA: half a latent (its pool is one "head": K slot | V slot = one latent)."""
    if is_mla(config):
        return latent_half_dim(config)
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def rope_dim_of(config) -> int:
    return config.qk_rope_head_dim if is_mla(config) else head_dim_of(config)


def kv_heads_per_rank(config, tp_size: int) -> int:
    """KV heads held by each rank: an even split, or one replicated head when there are fewer heads than ranks.
    MLA: one latent per token, replicated on every rank."""
    if is_mla(config):
        return 1
    return max(1, config.num_key_value_heads // tp_size)


def check_tp_layout(config, tp_size: int, ep_size: int = 1, attn_tp_size: int | None = None) -> None:
    """Raise ValueError for layouts that cannot split this model. `attn_tp_size`: the ranks
    attention is split over (DP attention: tp / dp; default: tp)."""
    heads, kv, a = config.num_attention_heads, config.num_key_value_heads, attn_tp_size or tp_size
    if heads % a:
        raise ValueError(f"--tp {tp_size}: the model's {heads} attention heads are not divisible by {a}")
    if kv % a and a % kv:
        raise ValueError(f"--tp {tp_size}: the model's {kv} KV heads neither divide nor are divisible by {a}")
    if getattr(config, "num_experts", None) or getattr(config, "num_local_experts", None):
        from disagg.common.models.moe import check_ep_layout

        check_ep_layout(config, tp_size, ep_size)
    elif config.intermediate_size % tp_size:
        raise ValueError(
            f"--tp {tp_size}: intermediate_size {config.intermediate_size} is not divisible by {tp_size}"
        )


class Attention(nn.Module):
    def __init__(self, config, layer_id: int, rope: RotaryEmbedding):
        super().__init__()
        group = attn_tp_group()  # the TP group, or with DP attention this DP rank's attention ranks
        tp = group.size
        self.layer_id = layer_id
        self.head_dim = head_dim_of(config)
        self.num_heads = config.num_attention_heads // tp
        self.num_kv_heads = kv_heads_per_rank(config, tp)
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        bias = getattr(config, "attention_bias", False) or config.model_type == "qwen2"
        self.qkv_proj = ColumnParallelLinear(
            config.hidden_size, [q_size, kv_size, kv_size], bias=bias, tp=group
        )
        self.o_proj = RowParallelLinear(
            q_size, config.hidden_size, bias=bias and config.model_type != "qwen2", tp=group
        )
        self.qk_norm = config.model_type.startswith("qwen3")
        if self.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.rope = rope
        # RoPE (+ q/k norm) and the K/V write in one Triton launch where it agrees with the torch ops
        w = self.qkv_proj.weight
        self.fused_rope_kv = fused_rope_kv_ok(
            w.device, w.dtype, self.num_heads, self.num_kv_heads, self.head_dim, self.qk_norm
        )

    def forward(self, x, batch: ForwardBatch, kv_buffer: torch.Tensor, backend: AttentionBackend):
        q, k, v = self.qkv_proj(x).split(self.qkv_proj.out_sizes, dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        kv = kv_buffer[self.layer_id]  # [num_pages, 2, page_size, Hkv, D]
        new_kv = backend.attends_new_kv(batch)  # fresh prompts: attention over this step's K/V as they are
        if self.fused_rope_kv:
            norm = (self.q_norm.weight, self.k_norm.weight, self.q_norm.eps) if self.qk_norm else None
            q = fused_rope_kv(
                batch.positions, q, k, v, kv, batch.k_rows, self.rope.table(), norm, rotate_k=new_kv
            )
        else:
            q, k = self.rope_and_write_kv(q, k, v, kv, batch)
        out = backend.forward_new_kv(q, k, v, batch) if new_kv else backend.forward(q, kv, batch)
        return self.o_proj(out.reshape(-1, self.num_heads * self.head_dim))

    def rope_and_write_kv(
        self, q, k, v, kv: torch.Tensor, batch: ForwardBatch
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """fused_rope_kv's steps one op at a time (FlashInfer's norm and RoPE where they apply):
        the rotated q and k."""
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rope(batch.positions, q, k)
        rows = kv.view(-1, self.num_kv_heads, self.head_dim)  # one row per (page, K|V, slot)
        rows.index_copy_(0, batch.k_rows, k.to(kv.dtype))
        rows.index_copy_(0, batch.k_rows + batch.page_size, v.to(kv.dtype))
        return q, k


class MLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, tp: TPGroup | None = None):
        """`tp`: the ranks the intermediate dimension is split over (default: the TP group)."""
        super().__init__()
        tp = tp or tp_group()
        inter = intermediate_size // tp.size
        self.gate_up_proj = ColumnParallelLinear(hidden_size, [inter, inter], tp=tp)
        self.down_proj = RowParallelLinear(inter, hidden_size, tp=tp)

    def forward(self, x):
        return self.down_proj(silu_and_mul(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, config, layer_id: int, rope: RotaryEmbedding):
        super().__init__()
        attention = MLAttention if is_mla(config) else Attention
        self.self_attn = attention(config, layer_id, rope)
        self.mlp = make_mlp(config, layer_id)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        # DP attention: an MLP split over the whole TP group needs every DP rank's tokens (an
        # all-to-all MoE takes only this rank's tokens to their experts and back)
        self.gather_mlp = get_parallel().attn_dp_size > 1 and not getattr(self.mlp, "a2a", False)
        # DISAGG_PERSISTENT_MOE: the post-attention norm inside the MoE's one-token launch where it runs
        # (moe.py, SparseMoE.persistent_block; it returns None where it does not apply)
        self.norm_in_mlp = getattr(self.mlp, "persistent", False) and not self.gather_mlp

    def forward(self, x, residual, batch, kv_buffer, backend):
        """x: this layer's input delta; residual: the running sum (None before the first layer).
        Returns (delta, residual): the hidden state after the layer is delta + residual."""
        if residual is None:
            residual, x = x, self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(x, batch, kv_buffer, backend)
        if (
            self.norm_in_mlp
            and (fused := self.mlp.persistent_block(x, residual, self.post_attention_layernorm)) is not None
        ):
            return fused, residual  # NOTE: residual updated in place by the launch
        x, residual = self.post_attention_layernorm(x, residual)
        if self.gather_mlp:
            return dp_scatter_tokens(self.mlp(dp_gather_tokens(x))), residual
        return self.mlp(x), residual


def make_mlp(config, layer_id: int) -> nn.Module:
    if is_mla(config):
        from disagg.common.models.deepseek import make_deepseek_mlp

        return make_deepseek_mlp(config, layer_id)
    is_moe = getattr(config, "num_experts", None) or getattr(config, "num_local_experts", None)
    step = getattr(config, "decoder_sparse_step", 1) or 1
    sparse = layer_id not in (getattr(config, "mlp_only_layers", None) or []) and (layer_id + 1) % step == 0
    if is_moe and sparse:
        from disagg.common.models.moe import make_moe

        return make_moe(config, layer_id)
    return MLP(config.hidden_size, config.intermediate_size)


class CausalLM(nn.Module):
    def __init__(self, config, max_positions: int, layer_range: tuple[int, int] | None = None):
        """`layer_range`: the pipeline stage's layers [start, end) (default: all). Only the first
        stage has the embedding, only the last the final norm and LM head (with tied embeddings,
        the last stage keeps its own copy of the embedding for the head)."""
        super().__init__()
        self.config = config
        self.vocab_size = config.vocab_size
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        num_layers = config.num_hidden_layers
        self.start_layer, self.end_layer = layer_range or (0, num_layers)
        self.is_first_stage, self.is_last_stage = self.start_layer == 0, self.end_layer == num_layers
        if self.is_first_stage or (self.is_last_stage and self.tie_word_embeddings):
            self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, attn_tp_group())
        rope = RotaryEmbedding(config, rope_dim_of(config), max_positions)
        # NOTE: other stages' layers are empty placeholders, so parameter names keep the checkpoint's indices
        self.layers = nn.ModuleList(
            DecoderLayer(config, i, rope) if self.start_layer <= i < self.end_layer else nn.Identity()
            for i in range(num_layers)
        )
        if self.is_last_stage:
            self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
            if not self.tie_word_embeddings:
                self.lm_head = VocabParallelEmbedding(
                    config.vocab_size, config.hidden_size, lm_head_group(config)
                )

    @torch.inference_mode()
    def forward(
        self, batch: ForwardBatch, kv_buffer: torch.Tensor, backend: AttentionBackend
    ) -> torch.Tensor:
        """Returns float32 logits [len(batch.logits_index), vocab] for the wanted rows."""
        x, residual = self.run_layers(self.embed_tokens(batch.input_ids), None, batch, kv_buffer, backend)
        return self.compute_logits(x, residual, batch)

    @torch.inference_mode()
    def run_layers(self, x, residual, batch: ForwardBatch, kv_buffer, backend: AttentionBackend):
        """This stage's layers: (delta, residual) in, (delta, residual) out (residual None before layer 0)."""
        # flat row of each new token's K in the layer's [num_pages * 2 * page_size] rows (V: + page_size)
        batch.k_rows = batch.out_page * (2 * batch.page_size) + batch.out_offset
        if get_parallel().attn_dp_size == 1:  # (DP attention: run_dp_plan sets it from every DP rank's plan)
            set_forward_shape(batch.is_decode_only)  # the all-to-all MoE's exchange mode (moe_a2a.py)
        for layer in self.layers[self.start_layer : self.end_layer]:
            x, residual = layer(x, residual, batch, kv_buffer, backend)
        return x, residual

    @torch.inference_mode()
    def compute_logits(self, x, residual, batch: ForwardBatch) -> torch.Tensor:
        """The last stage: final norm and LM head over the rows whose next token is sampled."""
        x, _ = self.norm(x[batch.logits_index], residual[batch.logits_index])
        head = self.embed_tokens if self.tie_word_embeddings else self.lm_head
        if get_parallel().attn_dp_size > 1:
            return dp_logits(head, x, self.vocab_size).float()
        return head.logits(x, self.vocab_size).float()
