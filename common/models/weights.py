"""Model loading: HF config, safetensors weights (sharded or not) split for this rank, or dummy weights.

Checkpoint names map onto the model's fused parameters:
    model.layers.N.self_attn.{q,k,v}_proj  -> layers.N.self_attn.qkv_proj  (rows: q | k | v)
    model.layers.N.mlp.{gate,up}_proj       -> layers.N.mlp.gate_up_proj    (rows: gate | up)
Each rank copies only its slice of each tensor (safetensors reads slices lazily), file by file.
FP8 block-quantized checkpoints (DeepSeek-V3's): where the model keeps FP8 (fp8.py) each FP8 tensor's
slice and its scales go straight into the FP8 parameters; elsewhere the slice is dequantized into
the dense parameter as it is copied (copy_weight).
"""

from __future__ import annotations

import importlib
import json
import logging
import re
import zlib
from pathlib import Path

import torch
from disagg.common.models.fp8 import (
    FP8_DTYPE,
    FP8_MAX,
    Fp8Tensor,
    block_index,
    fp8_block_size,
    fp8_gemm_backend,
    is_unallocated,
    quantize_linears,
    quantize_weight_blocks,
)
from disagg.common.parallel.state import get_parallel
from tqdm import tqdm

logger = logging.getLogger(__name__)

# Real shapes for `--load-format dummy --model-path <preset>` (no weights needed).
_LLAMA31 = dict(
    model_type="llama",
    architectures=["LlamaForCausalLM"],
    num_key_value_heads=8,
    vocab_size=128256,
    max_position_embeddings=131072,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
    rope_parameters=dict(
        rope_type="llama3",
        rope_theta=500000.0,
        factor=8.0,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_position_embeddings=8192,
    ),
)
PRESETS: dict[str, dict] = {
    "Llama-3.1-8B": dict(
        _LLAMA31, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32
    ),
    "Llama-3.1-70B": dict(
        _LLAMA31, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64
    ),
    "Qwen3-8B": dict(
        model_type="qwen3",
        architectures=["Qwen3ForCausalLM"],
        hidden_size=4096,
        intermediate_size=12288,
        num_hidden_layers=36,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        vocab_size=151936,
        max_position_embeddings=40960,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        rope_parameters=dict(rope_type="default", rope_theta=1000000.0),
    ),
    "Qwen3-30B-A3B": dict(
        model_type="qwen3_moe",
        architectures=["Qwen3MoeForCausalLM"],
        hidden_size=2048,
        intermediate_size=6144,
        moe_intermediate_size=768,
        num_experts=128,
        num_experts_per_tok=8,
        norm_topk_prob=True,
        num_hidden_layers=48,
        num_attention_heads=32,
        num_key_value_heads=4,
        head_dim=128,
        vocab_size=151936,
        max_position_embeddings=40960,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        rope_parameters=dict(rope_type="default", rope_theta=1000000.0),
    ),
}
_DEEPSEEK_YARN = dict(
    rope_type="yarn",
    rope_theta=10000.0,
    factor=40.0,
    original_max_position_embeddings=4096,
    beta_fast=32,
    beta_slow=1,
)
PRESETS["DeepSeek-V2-Lite"] = dict(
    model_type="deepseek_v2", architectures=["DeepseekV2ForCausalLM"], hidden_size=2048, intermediate_size=10944,
    moe_intermediate_size=1408, num_hidden_layers=27, num_attention_heads=16, num_key_value_heads=16,
    n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=6, first_k_dense_replace=1, topk_method="greedy",
    n_group=1, topk_group=1, routed_scaling_factor=1.0, norm_topk_prob=False, q_lora_rank=None, kv_lora_rank=512,
    qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, vocab_size=102400, max_position_embeddings=163840,
    rms_norm_eps=1e-6, tie_word_embeddings=False, rope_parameters=dict(_DEEPSEEK_YARN, mscale=0.707, mscale_all_dim=0.707),
)  # fmt: skip
PRESETS["DeepSeek-V3"] = dict(
    model_type="deepseek_v3", architectures=["DeepseekV3ForCausalLM"], hidden_size=7168, intermediate_size=18432,
    moe_intermediate_size=2048, num_hidden_layers=61, num_attention_heads=128, num_key_value_heads=128,
    n_routed_experts=256, n_shared_experts=1, num_experts_per_tok=8, first_k_dense_replace=3, n_group=8,
    topk_group=4, routed_scaling_factor=2.5, norm_topk_prob=True, q_lora_rank=1536, kv_lora_rank=512,
    qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, vocab_size=129280, max_position_embeddings=163840,
    rms_norm_eps=1e-6, tie_word_embeddings=False, rope_parameters=dict(_DEEPSEEK_YARN, mscale=1.0, mscale_all_dim=1.0),
    # as the checkpoint ships: FP8 weights, one scale per 128x128 block (dummy weights take this layout)
    quantization_config=dict(quant_method="fp8", fmt="e4m3", activation_scheme="dynamic", weight_block_size=[128, 128]),
)  # fmt: skip


def load_config(model_path: str, overrides: str | dict | None = None):
    """HF config of a folder, or of a preset name (dummy weights only), with `overrides`
    (--json-model-override-args: a JSON object, e.g. '{"num_hidden_layers": 4}') merged in."""
    if model_path in PRESETS:
        spec = dict(PRESETS[model_path])
        config = _config_class(spec.pop("model_type"))(**spec)
    else:
        path = Path(model_path) / "config.json"
        if not path.exists():
            raise FileNotFoundError(
                f"--model-path {model_path!r}: no config.json there (presets for --load-format dummy: {', '.join(PRESETS)})"
            )
        config = _config_class(json.loads(path.read_text())["model_type"]).from_pretrained(model_path)
    config.update(parse_model_overrides(overrides))
    return config


def parse_model_overrides(overrides: str | dict | None) -> dict:
    """--json-model-override-args as a dict (ValueError naming the flag if it is no JSON object)."""
    if isinstance(overrides, dict) or not overrides:
        return dict(overrides or {})
    try:
        parsed = json.loads(overrides)
    except json.JSONDecodeError as e:
        raise ValueError(f"--json-model-override-args {overrides!r}: not JSON ({e})") from None
    if not isinstance(parsed, dict):
        raise ValueError(f"--json-model-override-args {overrides!r}: expected a JSON object")
    return parsed


def _config_class(model_type: str):
    """The config class of one model type.

    NOTE: importing only that family's module; AutoConfig's lazy mapping imports dozens of
    them and costs seconds at every server start."""
    try:
        module = importlib.import_module(f"transformers.models.{model_type}.configuration_{model_type}")
    except ImportError:
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING

        return CONFIG_MAPPING[model_type]
    for value in vars(module).values():
        if isinstance(value, type) and getattr(value, "model_type", None) == model_type:
            return value
    raise ValueError(f"no config class for model_type {model_type!r}")


def load_weights(model: torch.nn.Module, model_path: str, load_format: str) -> None:
    """Real or dummy weights. For an FP8 block-quantized config on a device that runs FP8 GEMMs
    (fp8.py) the linears and experts first take their FP8 block layout (empty), then the
    checkpoint's FP8 values and scales are copied in (dummy: random FP8 values and scales)."""
    device = model_device(model)
    block = fp8_block_size(model.config)
    backend = fp8_gemm_backend(device) if block else None
    if backend:
        take_fp8_layout(model, block, backend)
    allocate_deferred(model)
    if load_format == "dummy":
        _init_dummy(model)
    else:
        _load_checkpoint(model, model_path)
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the pool is sized from what the allocator holds after this


def model_device(model: torch.nn.Module) -> torch.device:
    return next(p.device for p in model.parameters())


def take_fp8_layout(model: torch.nn.Module, block: tuple[int, int], backend: str) -> None:
    from disagg.common.models.moe import quantize_experts

    n = quantize_linears(model, block, backend)
    moes = quantize_experts(model, block, backend)
    logger.info("FP8 block GEMMs (%s, blocks %s): %d linear layers, %d MoE layers", backend, block, n, moes)


def allocate_deferred(model: torch.nn.Module) -> None:
    """Dense memory for the weights fp8.deferred_fp8_weights left unallocated that take no FP8
    layout (MLA's kv_b_proj, biases)."""
    for name, p in list(model.named_parameters()):
        if is_unallocated(p):
            module, attr = model.get_submodule(name.rpartition(".")[0]), name.rpartition(".")[2]
            setattr(module, attr, torch.nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device=p.device)))


def copy_weight(model, params: dict, pname: str, dst_index: tuple, src, src_index: tuple = ()) -> None:
    """params[pname][dst_index] = src[src_index], where src is a checkpoint tensor (a safetensors
    slice or an fp8.Fp8Tensor). An FP8 parameter (`<pname>_scale_inv` beside it) takes an FP8
    tensor's values and scales as they are (whole blocks only) and quantizes a dense tensor's
    slice; a dense parameter takes an FP8 tensor dequantized."""
    param = params[pname]
    dst = param.data[dst_index]
    scale = params.get(f"{pname}_scale_inv")
    if scale is None:
        if isinstance(src, Fp8Tensor):
            src.dequantize_into(dst, src_index)
        else:
            dst.copy_(src[src_index] if src_index else src[:])
        return
    block = model.get_submodule(pname.rpartition(".")[0]).fp8_block
    dst_scale = scale.data[block_index(dst_index, param.shape, block, f"parameter {pname}")]
    if isinstance(src, Fp8Tensor):
        src.copy_fp8_into(dst, dst_scale, src_index)
    else:  # a layer the checkpoint left unquantized: this rank's slice only, in its blocks
        q, q_scale = quantize_weight_blocks(src[src_index] if src_index else src[:], block)
        dst.copy_(q)
        dst_scale.copy_(q_scale)


def _load_checkpoint(model: torch.nn.Module, model_path: str) -> None:
    files = _safetensors_files(Path(model_path))
    params = dict(model.named_parameters())
    loaded: set[str] = set()
    from safetensors import safe_open

    scales = _fp8_scale_files(model.config, files)
    for file in tqdm(
        files, desc="Loading safetensors", disable=get_parallel().tp_rank != 0 or len(files) < 2
    ):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                if name.endswith("_scale_inv") or not _on_this_stage(model, name):
                    continue  # a scale is read with its weight; another pipeline stage's layer is not here
                tensor_slice = f.get_slice(name)
                if scales and tensor_slice.get_dtype() == "F8_E4M3":
                    tensor_slice = _fp8_tensor(model.config, name, tensor_slice, scales)
                target = _load_one(model, params, name, tensor_slice)
                if target:
                    loaded.add(target)
    missing = [n for n in params if n not in loaded and not n.endswith("_scale_inv")]
    if missing:
        raise ValueError(
            f"weights missing from {model_path}: {missing[:5]}{'...' if len(missing) > 5 else ''}"
        )


def _fp8_scale_files(config, files: list[Path]) -> dict[str, Path]:
    """FP8 block-quantized checkpoints (DeepSeek-V3's `quantization_config`): the file holding each
    `<weight>_scale_inv` (a weight's scales may sit in another shard). Empty for other checkpoints."""
    if fp8_block_size(config) is None:
        return {}
    from safetensors import safe_open

    found = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            found.update({n: file for n in f.keys() if n.endswith("_scale_inv")})
    return found


def _fp8_tensor(config, name: str, tensor_slice, scales: dict[str, Path]) -> Fp8Tensor:
    """The FP8 tensor `name` with its block scales (read whole: 1/16384 of the weight's values)."""
    from safetensors import safe_open

    scale_name = f"{name}_scale_inv"
    if scale_name not in scales:
        raise ValueError(f"FP8 tensor {name} has no {scale_name} in the checkpoint")
    with safe_open(str(scales[scale_name]), framework="pt") as f:
        scale = f.get_tensor(scale_name)
    return Fp8Tensor(name, tensor_slice, scale, fp8_block_size(config))


def _safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [path / n for n in names]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {path}")
    return files


_LAYER = re.compile(r"^layers\.(\d+)\.")
_FUSED = {
    "q_proj": ("qkv_proj", 0),
    "k_proj": ("qkv_proj", 1),
    "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}


_LAYER_INDEX = re.compile(r"(?:model\.)?layers\.(\d+)\.")


def _on_this_stage(model, name: str) -> bool:
    """False for a decoder layer's tensor outside this pipeline stage's layers (--pp-size)."""
    m = _LAYER_INDEX.match(name)
    start, end = getattr(model, "start_layer", 0), getattr(model, "end_layer", None)
    return m is None or end is None or start <= int(m.group(1)) < end


def _load_one(model, params: dict, name: str, tensor_slice) -> str | None:
    """Copy this rank's share of one checkpoint tensor into its parameter; returns the parameter name."""
    name = name.removeprefix("model.").replace("block_sparse_moe.", "mlp.")
    if name.startswith("lm_head") and getattr(model, "tie_word_embeddings", False):
        return None
    if "rotary_emb" in name:
        return None
    layer = _LAYER.match(name)
    if layer and int(layer.group(1)) >= model.config.num_hidden_layers:
        return None  # V3's MTP layer; layers past a --json-model-override-args num_hidden_layers
    from disagg.common.models.deepseek import is_mla, load_mla_weight

    if is_mla(model.config):
        handled, pname = load_mla_weight(model, params, name, tensor_slice)
        if handled:
            return pname
    from disagg.common.models.moe import load_expert_weight

    if load_expert_weight(model, params, name, tensor_slice):
        m = re.match(r"(.*\.experts)\.\d+\.(\w+)\.weight$", name)
        return f"{m.group(1)}.{'w2' if m.group(2) in ('down_proj', 'w2') else 'w13'}"
    m = re.match(r"(.*)\.(q_proj|k_proj|v_proj|gate_proj|up_proj)\.(weight|bias)$", name)
    if m:
        fused, idx = _FUSED[m.group(2)]
        pname = f"{m.group(1)}.{fused}.{m.group(3)}"
        param = params[pname]
        module = model.get_submodule(f"{m.group(1)}.{fused}")
        size = module.out_sizes[idx]
        offset = sum(module.out_sizes[:idx])
        rows = _row_range(model.config, m.group(2), size, module.tp)
        copy_weight(model, params, pname, (slice(offset, offset + size),), tensor_slice, (slice(*rows),))
        return pname
    param = params.get(name)
    if param is None:
        logger.debug("ignoring checkpoint tensor %s", name)
        return None
    # the ranks this layer is split over: the TP group, or with DP attention its attention group
    tp = getattr(model.get_submodule(name.rsplit(".", 1)[0]), "tp", None)
    if name.endswith(("o_proj.weight", "down_proj.weight")):
        cols = param.shape[1]
        mine = slice(tp.rank * cols, (tp.rank + 1) * cols)
        copy_weight(model, params, name, (), tensor_slice, (slice(None), mine))
    elif name.endswith(("embed_tokens.weight", "lm_head.weight")):
        _copy_vocab_shard(param, tensor_slice, tp.rank)
    else:
        copy_weight(model, params, name, (), tensor_slice)
    return name


def _row_range(config, proj: str, size: int, tp) -> tuple[int, int]:
    """Rows of rank `tp.rank` of the `tp.size` ranks the layer is split over."""
    if proj in ("k_proj", "v_proj"):
        head_dim = size // max(1, config.num_key_value_heads // tp.size)
        if config.num_key_value_heads >= tp.size:
            return tp.rank * size, (tp.rank + 1) * size
        head = tp.rank * config.num_key_value_heads // tp.size  # replicated head
        return head * head_dim, (head + 1) * head_dim
    return tp.rank * size, (tp.rank + 1) * size


def _copy_vocab_shard(param: torch.Tensor, tensor_slice, rank: int) -> None:
    per = param.shape[0]
    total = tensor_slice.get_shape()[0]
    start, end = rank * per, min((rank + 1) * per, total)
    param.data.zero_()
    if end > start:
        param.data[: end - start].copy_(tensor_slice[start:end])


@torch.no_grad()
def _init_dummy(model: torch.nn.Module) -> None:
    """Random weights at the real shapes: N(0, 0.02) matrices, unit norms (as SGLang/vLLM dummy);
    FP8 weights get the same distribution in FP8 blocks directly (_fill_fp8_normal)."""
    gen = torch.Generator(device=model_device(model))
    params = dict(model.named_parameters())
    for name, p in params.items():
        if name.endswith("norm.weight"):
            p.fill_(1.0)
            continue
        if name.endswith("_scale_inv"):
            continue  # filled with its weight
        # NOTE: shards differ per rank; the MoE router is replicated and must be equal on every
        # rank, or the ranks would route the same token to different experts
        replicated = ".mlp.gate." in name  # the router's weight and DeepSeek-V3's score-correction bias
        gen.manual_seed(zlib.crc32(name.encode()) + (0 if replicated else 7919 * get_parallel().tp_rank))
        if p.dtype == FP8_DTYPE:
            _fill_fp8_normal(p, params[f"{name}_scale_inv"], 0.02, gen)
        else:
            p.normal_(0.0, 0.02, generator=gen)


_DUMMY_CHUNK = 1 << 24  # values generated at a time for an FP8 weight (64 MiB of float32)


def _fill_fp8_normal(q: torch.Tensor, scale: torch.Tensor, std: float, gen: torch.Generator) -> None:
    """q, scale: FP8 values of N(0, std) in chunks of rows, at most one matrix of an expert stack at a
    time (never the whole weight in float32); every block's scale maps 4 std to FP8's largest value
    (the rare larger draws are clamped)."""
    scale.fill_(4 * std / FP8_MAX)
    rows = q.view(-1, q.shape[-1])
    step = max(1, min(q.shape[-2], _DUMMY_CHUNK // rows.shape[1]))
    for start in range(0, rows.shape[0], step):
        chunk = rows[start : start + step]
        values = torch.randn(chunk.shape, generator=gen, device=q.device) * (FP8_MAX / 4)
        chunk.copy_(values.clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE))
