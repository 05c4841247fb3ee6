"""Mixture-of-Experts layers (Qwen3-MoE / Mixtral style) with expert parallelism."""

from __future__ import annotations


def make_moe(config, layer_id: int):
    raise NotImplementedError("MoE models are not supported yet")


def load_expert_weight(model, params: dict, name: str, tensor_slice) -> bool:
    """Load one expert tensor if `name` is one (and this rank holds it); False if not an expert tensor."""
    return False


MOE_ARCHITECTURES = {"Qwen3MoeForCausalLM", "MixtralForCausalLM", "Qwen2MoeForCausalLM"}
