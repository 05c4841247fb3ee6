"""FP8 block-quantized checkpoints load as they are: where the model keeps FP8 the checkpoint's FP8
values and scales land in the parameters unchanged and no 16/32-bit copy of an expert stack is
ever made; elsewhere each tensor is dequantized a block row at a time as it streams, with the
tokens of transformers on the dequantized weights. The checkpoint is split over two shards with
each weight's scales in the other shard."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from disagg.common.models import fp8
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from tests.conftest import hf_greedy
from tests.test_common_deepseek import TINY, make_tiny_deepseek

BLOCK = 16
# 64 routed experts in two MoE layers: one layer's expert stack outweighs every other tensor
CONFIG = dict(TINY["v3"], n_routed_experts=64)
EXPERT_STACK_FP8_BYTES = 64 * 2 * CONFIG["moe_intermediate_size"] * CONFIG["hidden_size"]  # one layer's w13
PROMPTS = [[7, 100, 3, 256, 41, 9], list(range(20, 41))]
PARAMS = {"max_new_tokens": 10, "temperature": 0, "ignore_eos": True}


def _save_shards(tensors: dict[str, torch.Tensor], folder: Path, config: dict) -> None:
    """Two shards, each weight's `_scale_inv` in the other one, and the index naming them."""
    from safetensors.torch import save_file

    folder.mkdir()
    weights = sorted(n for n in tensors if not n.endswith("_scale_inv"))
    shard = {n: i % 2 for i, n in enumerate(weights)}
    shard.update({f"{n}_scale_inv": 1 - shard[n] for n in weights if f"{n}_scale_inv" in tensors})
    files = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    for i, file in enumerate(files):
        save_file(
            {n: tensors[n] for n, s in shard.items() if s == i}, folder / file, metadata={"format": "pt"}
        )
    index = {"metadata": {}, "weight_map": {n: files[s] for n, s in shard.items()}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    (folder / "config.json").write_text(json.dumps(config))


@pytest.fixture(scope="module")
def fp8_checkpoint(tmp_path_factory) -> tuple[str, str]:
    """(the FP8 checkpoint, the same weights dequantized: transformers' reference)."""
    from safetensors.torch import load_file

    root = tmp_path_factory.mktemp("fp8_load")
    make_tiny_deepseek(root / "src", "v3", n_routed_experts=CONFIG["n_routed_experts"])
    config = json.loads((root / "src" / "config.json").read_text())
    quantized, dequantized = {}, {}
    for name, w in load_file(root / "src" / "model.safetensors").items():
        if w.dim() == 2 and "_proj" in name:  # every linear and expert as V3 ships them; not the router
            q, scale = fp8.quantize_weight_blocks(w, (BLOCK, BLOCK))
            quantized[name], quantized[f"{name}_scale_inv"] = q, scale
            dequantized[name] = fp8.dequantize_weight_blocks(q, scale, (BLOCK, BLOCK))
        else:
            quantized[name] = dequantized[name] = w
    quant = {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": [BLOCK] * 2,
    }
    _save_shards(quantized, root / "fp8", dict(config, quantization_config=quant))
    _save_shards(dequantized, root / "ref", config)
    return str(root / "fp8"), str(root / "ref")


class _FloatBytes(TorchDispatchMode):
    """Watches every torch op: the largest 16/32-bit float storage any op returns, and the most
    values one FP8 -> float conversion makes (a dequantization's temporary)."""

    def __init__(self):
        super().__init__()
        self.largest_storage = self.largest_dequant = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in pytree.tree_leaves(out):
            if (
                isinstance(t, torch.Tensor)
                and t.is_floating_point()
                and t.element_size() > 1
                and not t.is_meta
            ):
                self.largest_storage = max(self.largest_storage, t.untyped_storage().nbytes())
        if func is torch.ops.aten._to_copy.default and args[0].dtype == fp8.FP8_DTYPE:
            self.largest_dequant = max(self.largest_dequant, out.numel())
        return out


def _engine(path: str, monkeypatch, watch: _FloatBytes | None = None, **kw):
    """An engine on `path`; with `watch`, every op of its model's build and load goes through it."""
    from disagg.common.engine.model_runner import ModelRunner
    from disagg.common.engine.offline import Engine

    if watch is not None:
        load = ModelRunner._load_model

        def watched(self):
            with watch:
                return load(self)

        monkeypatch.setattr(ModelRunner, "_load_model", watched)
    return Engine(model_path=path, page_size=4, max_total_tokens=256, **kw)


def test_streaming_dequantization_gives_transformers_tokens(fp8_checkpoint, monkeypatch):
    """Without FP8 GEMMs (the CPU) every FP8 tensor is dequantized into its float32 parameter one
    block row at a time (never a whole tensor in float32), scales read from the other shard: the
    greedy tokens of transformers on the dequantized checkpoint."""
    path, ref = fp8_checkpoint
    watch = _FloatBytes()
    engine = _engine(path, monkeypatch, watch)
    try:
        assert engine.scheduler.runner.model.layers[1].mlp.experts.w13.dtype == torch.float32
        outs = engine.generate(PROMPTS, PARAMS)
    finally:
        engine.shutdown()
    assert [o["output_ids"] for o in outs] == [hf_greedy(ref, p, PARAMS["max_new_tokens"]) for p in PROMPTS]
    widest = max(CONFIG["hidden_size"], CONFIG["intermediate_size"])  # columns of any FP8 tensor
    assert 0 < watch.largest_dequant <= BLOCK * widest


def test_kept_fp8_is_the_checkpoints_bytes_with_no_dense_copy(fp8_checkpoint, monkeypatch):
    """DISAGG_FP8_GEMM=torch keeps FP8: the experts' and linears' FP8 values and block scales are the
    checkpoint's exactly (gate | up rows of w13), no op during the build and load returns a 16/32-bit
    storage as large as one layer's FP8 expert stack (a bfloat16 copy would be twice that), and
    the first greedy tokens are transformers' on the dequantized checkpoint."""
    from safetensors.torch import load_file

    path, ref = fp8_checkpoint
    monkeypatch.setenv("DISAGG_FP8_GEMM", "torch")
    watch = _FloatBytes()
    engine = _engine(path, monkeypatch, watch)
    try:
        model = engine.scheduler.runner.model
        out = engine.generate(PROMPTS[:1], dict(PARAMS, max_new_tokens=4))[0]
    finally:
        engine.shutdown()
    assert watch.largest_storage < EXPERT_STACK_FP8_BYTES
    ckpt = {}
    for file in Path(path).glob("*.safetensors"):
        ckpt.update(load_file(file))
    experts, prefix = model.layers[1].mlp.experts, "model.layers.1.mlp.experts.5"
    gate_up = [f"{prefix}.{p}_proj.weight" for p in ("gate", "up")]
    want = {
        "w13": torch.cat([ckpt[n] for n in gate_up]),
        "w13_scale_inv": torch.cat([ckpt[f"{n}_scale_inv"] for n in gate_up]),
        "w2": ckpt[f"{prefix}.down_proj.weight"],
        "w2_scale_inv": ckpt[f"{prefix}.down_proj.weight_scale_inv"],
    }
    for name, value in want.items():
        got = getattr(experts, name)[5]
        assert got.dtype == value.dtype and torch.equal(got.view(torch.uint8), value.view(torch.uint8)), name
    q_b = model.layers[1].self_attn.q_b_proj
    assert torch.equal(
        q_b.weight.view(torch.uint8), ckpt["model.layers.1.self_attn.q_b_proj.weight"].view(torch.uint8)
    )
    assert torch.equal(q_b.weight_scale_inv, ckpt["model.layers.1.self_attn.q_b_proj.weight_scale_inv"])
    assert out["output_ids"] == hf_greedy(ref, PROMPTS[0], 4)


@pytest.mark.slow
def test_kept_fp8_at_tp2_takes_each_ranks_blocks(fp8_checkpoint, monkeypatch):
    """--tp 2 keeping FP8: each rank copies its rows of q_b_proj and the expert gate/up stacks and its
    columns of o_proj and the expert down stacks, with the matching scale blocks: the first greedy
    tokens of transformers on the dequantized checkpoint."""
    from disagg.common.engine.offline import Engine

    path, ref = fp8_checkpoint
    monkeypatch.setenv("DISAGG_FP8_GEMM", "torch")
    engine = Engine(model_path=path, page_size=4, max_total_tokens=256, tp=2)
    try:
        outs = engine.generate(PROMPTS, dict(PARAMS, max_new_tokens=4))
    finally:
        engine.shutdown()
    assert [o["output_ids"] for o in outs] == [hf_greedy(ref, p, 4) for p in PROMPTS]


def test_dummy_fp8_draws_fp8_directly(monkeypatch):
    """--load-format dummy on the FP8 V3 preset (shrunk): FP8 experts and linears drawn in FP8, one
    expert matrix at a time at most in float32 (no op returns a 16/32-bit storage as large as one
    layer's FP8 expert stack), with the spread of N(0, 0.02)."""
    from tests.test_common_fp8 import SMALL_V3

    monkeypatch.setenv("DISAGG_FP8_GEMM", "torch")
    small = dict(SMALL_V3, n_routed_experts=32, n_group=4, topk_group=2)
    watch = _FloatBytes()
    engine = _engine(
        "DeepSeek-V3", monkeypatch, watch, load_format="dummy", json_model_override_args=json.dumps(small)
    )
    try:
        experts = engine.scheduler.runner.model.layers[1].mlp.experts
        w13 = fp8.dequantize_weight_blocks(experts.w13[3], experts.w13_scale_inv[3], (128, 128))
    finally:
        engine.shutdown()
    stack = 32 * 2 * small["moe_intermediate_size"] * small["hidden_size"]
    assert experts.w13.dtype == fp8.FP8_DTYPE
    assert watch.largest_storage < stack
    assert 0.018 < w13.std().item() < 0.022


@pytest.mark.parametrize(
    "index,shape,ok",
    [
        ((slice(16, 32),), (32, 40), True),
        ((slice(0, 20),), (20, 40), True),  # the last, partial block
        ((2, slice(32, 48), slice(None)), (4, 64, 40), True),  # expert 2's up rows
        ((slice(8, 24),), (32, 40), False),
        ((slice(None), slice(0, 24)), (32, 40), False),
    ],
)
def test_a_slice_that_cuts_blocks_is_refused(index, shape, ok):
    """A rank's slice of an FP8 tensor must be whole blocks (else its scales would not be its own):
    refused naming the rows or columns, the size and the blocks."""
    if ok:
        fp8.block_index(index, shape, (BLOCK, BLOCK), "t")
        return
    with pytest.raises(ValueError, match=r"t: (rows|columns) \[\d+, \d+\) of \d+ cut its \[16, 16\] blocks"):
        fp8.block_index(index, shape, (BLOCK, BLOCK), "t")


def test_v3_at_tp8_fits_an_h200_by_bytes():
    """The plan counts FP8 weights as kept (1 byte a value + float32 scales per 128x128 block):
    DeepSeek-V3 at --tp 8 holds ~79 GiB per rank, leaving an H200 (139.8 GiB at
    --mem-fraction-static 0.85) ~38 GiB of KV; the same weights in bfloat16 would not fit."""
    from disagg.common.bench.load_memory import plan_weights
    from disagg.common.parallel.state import get_parallel

    weights, _ = plan_weights("DeepSeek-V3", "{}", 8, 1)
    assert get_parallel().tp_size == 1  # restored
    gib = 2**30
    assert 77 * gib < weights["float8_e4m3fn"] < 80 * gib
    assert sum(weights.values()) < 0.85 * 139.8 * gib - 30 * gib
    assert 2 * weights["float8_e4m3fn"] > 0.85 * 139.8 * gib
