"""Building blocks of the decoder, tensor-parallel aware (tp == 1: plain layers)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from disagg.common.models.fp8 import fp8_linear
from disagg.common.models.gemv import linear
from disagg.common.models.kernels import add_rms_norm, apply_rope, rms_norm
from disagg.common.parallel.state import TPGroup, all_gather_last_dim, all_reduce, tp_group
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """norm(x); with `residual`: (norm(x + residual), x + residual), fused on CUDA."""
        if residual is None:
            return rms_norm(x, self.weight, self.eps)
        return add_rms_norm(x, residual, self.weight, self.eps)


class ColumnParallelLinear(nn.Module):
    """y = x W^T with W's output rows split across ranks; `out_sizes` are the per-rank sizes of
    the fused outputs (e.g. q, k, v), each loaded from its own checkpoint tensor; `tp`: the ranks
    the rows are split over (default: the TP group)."""

    def __init__(self, in_features: int, out_sizes: list[int], bias: bool = False, tp: TPGroup | None = None):
        super().__init__()
        self.out_sizes = out_sizes
        self.tp = tp or tp_group()
        self.weight = nn.Parameter(torch.empty(sum(out_sizes), in_features))
        self.bias = nn.Parameter(torch.empty(sum(out_sizes))) if bias else None
        self.weight_scale_inv = None  # FP8 block scales when fp8.quantize_linears converted the weight
        self.gemv_plan = None  # small decode batches: the Triton GEMV's configs (gemv.prepare_gemv)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight_scale_inv is not None:
            y = fp8_linear(self, x)
            return y if self.bias is None else y + self.bias
        return linear(x, self.weight, self.bias, self.gemv_plan)


class RowParallelLinear(nn.Module):
    """y = sum over ranks of x_r W_r^T: the input dim is split, one all-reduce joins the parts."""

    def __init__(self, in_features_per_rank: int, out_features: int, bias: bool = False, reduce: bool = True,
                 tp: TPGroup | None = None):  # fmt: skip
        super().__init__()
        self.tp = tp or tp_group()
        self.weight = nn.Parameter(torch.empty(out_features, in_features_per_rank))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self.reduce = reduce
        self.weight_scale_inv = None  # FP8 block scales when fp8.quantize_linears converted the weight
        self.gemv_plan = None  # small decode batches: the Triton GEMV's configs (gemv.prepare_gemv)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight_scale_inv is None:
            y = linear(x, self.weight, None, self.gemv_plan)
        else:
            y = fp8_linear(self, x)
        if self.reduce:
            y = all_reduce(y, self.tp)
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(nn.Module):
    """Each rank of `tp` (default: the TP group) holds a contiguous slice of the vocabulary; the
    all-reduce fills in the rest."""

    def __init__(self, vocab_size: int, dim: int, tp: TPGroup | None = None):
        super().__init__()
        self.tp = tp or tp_group()
        self.vocab_per_rank = (vocab_size + self.tp.size - 1) // self.tp.size
        self.start = self.tp.rank * self.vocab_per_rank
        self.weight = nn.Parameter(torch.empty(self.vocab_per_rank, dim))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.start
        inside = (local >= 0) & (local < self.vocab_per_rank)
        out = F.embedding(local.clamp(0, self.vocab_per_rank - 1), self.weight)
        out = out * inside.unsqueeze(-1).to(out.dtype)
        return all_reduce(out, self.tp)

    def logits(self, hidden: torch.Tensor, vocab_size: int) -> torch.Tensor:
        """LM head over this rank's vocabulary slice, gathered to the full vocabulary."""
        return all_gather_last_dim(F.linear(hidden, self.weight), self.tp)[..., :vocab_size]


class RotaryEmbedding(nn.Module):
    """RoPE with the HF rope types (default, llama3, yarn, linear, ...) via transformers' init functions."""

    def __init__(self, config, head_dim: int, max_positions: int):
        super().__init__()
        params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
        rope_type = params.get("rope_type", params.get("type", "default"))
        theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
        scaling = 1.0
        # NOTE: tables are computed on the CPU in float32 exactly as transformers does (bitwise-equal
        # cos/sin), then moved to the device the model is being built on
        if rope_type == "default":
            dims = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float()
            inv_freq = 1.0 / (theta ** (dims / head_dim))
        else:
            from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

            inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, torch.device("cpu"))
        t = torch.arange(max_positions, dtype=torch.float32, device="cpu")
        freqs = torch.outer(t, inv_freq.float().cpu())
        device = torch.get_default_device()
        cos, sin = (freqs.cos() * scaling).float(), (freqs.sin() * scaling).float()
        self.register_buffer("cos", cos.to(device), persistent=False)  # [max_pos, D/2] float32
        self.register_buffer("sin", sin.to(device), persistent=False)
        # the fused CUDA kernels' table: [max_pos, D] = cos | sin
        self.register_buffer(
            "cos_sin",
            torch.cat([cos, sin], -1).to(device) if device.type == "cuda" else None,
            persistent=False,
        )

    def table(self) -> torch.Tensor:
        """[max_pos, D] float32 cos | sin, fused_rope_kv's table (on the CPU, Triton's interpreter:
        built on first use)."""
        if self.cos_sin is None:
            self.cos_sin = torch.cat([self.cos, self.sin], -1)
        return self.cos_sin

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """q [T, Hq, D], k [T, Hkv, D] -> rotated (in place on CUDA)."""
        return apply_rope(positions, q, k, self.cos, self.sin, self.cos_sin)
