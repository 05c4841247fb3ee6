"""Memory of loading a model: the weight bytes kept (by dtype) against the peak host RSS and the peak
CUDA allocation while the model is built and loaded.

    python -m disagg.common.bench.load_memory                        # a small FP8 V3 checkpoint, made in /tmp
    python -m disagg.common.bench.load_memory --model-path DIR --device cuda
    python -m disagg.common.bench.load_memory --model-path DeepSeek-V3 --load-format dummy \\
        --json-model-override-args '{"num_hidden_layers": 5}' --device cuda
    python -m disagg.common.bench.load_memory --plan --tp 8         # V3's bytes per rank, no weights

Each load runs in a fresh process (so its RSS peak is the load's): the ideal is the bytes the model
keeps; a loader that streams one tensor at a time peaks at most about one tensor above it. The
RSS counts the checkpoint's pages mapped while a shard is read (file pages, reclaimable), so
`anon` (sampled every 2 ms) is shown beside it. Without --model-path a small DeepSeek-V3-shaped
FP8 checkpoint (128x128 blocks, bf16 elsewhere; --experts, --layers) is written to a temporary
folder first. DISAGG_FP8_GEMM=torch keeps FP8 weights on the CPU (the Hopper layout).
`--plan` builds the model on the meta device at --tp/--ep with the FP8 layout Hopper keeps and
prints the bytes per rank and the KV tokens left on a GPU of --gpu-memory-gib.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

import torch
from disagg.common.config import fp8_gemm_mode

GIB, MIB = 2**30, 2**20
# the checkpoint made without --model-path: DeepSeek-V3's shapes, narrower and with fewer layers
SMALL_V3 = dict(hidden_size=1024, intermediate_size=2048, moe_intermediate_size=256, num_attention_heads=8,
                num_key_value_heads=8, q_lora_rank=384, kv_lora_rank=256, vocab_size=8192,
                max_position_embeddings=4096, first_k_dense_replace=1)  # fmt: skip


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


class PeakSampler:
    """Samples this process's RssAnon every 2 ms on a thread (torch releases the GIL in big ops)."""

    def __init__(self):
        self.peak_anon = _status_kib("RssAnon")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.002):
            self.peak_anon = max(self.peak_anon, _status_kib("RssAnon"))

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak_anon = max(self.peak_anon, _status_kib("RssAnon"))


def weight_bytes(model: torch.nn.Module) -> dict[str, int]:
    out: dict[str, int] = defaultdict(int)
    for p in model.parameters():
        out[str(p.dtype).removeprefix("torch.")] += p.numel() * p.element_size()
    return dict(out)


def measure_load(
    model_path: str, load_format: str = "auto", device: str = "auto", overrides: str = "{}"
) -> dict:
    """Build a ModelRunner (the model, then a tiny pool) and record the peaks of its model load
    above what the process held before it: host RSS and anonymous RSS, CUDA allocated."""
    from disagg.common.config import EngineConfig
    from disagg.common.engine.model_runner import ModelRunner

    # torch attention: no FlashInfer kernels to build for the warm-up forwards (only the load is measured)
    config = EngineConfig(model_path=model_path, load_format=load_format, device=device, max_total_tokens=64,
                          disable_cuda_graph=True, attention_backend="torch", json_model_override_args=overrides)  # fmt: skip
    result: dict = {}
    load = ModelRunner._load_model

    def measured(self):
        cuda = self.device.type == "cuda"
        cuda0 = torch.cuda.memory_allocated(self.device) if cuda else 0
        if cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        rss0, anon0 = _status_kib("VmRSS"), _status_kib("RssAnon")
        max0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        t0 = time.perf_counter()
        with PeakSampler() as sampler:
            model = load(self)
        max1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        # ru_maxrss is exact when the load set a new high-water mark (it did not before: imports)
        peak_rss = max1 if max1 > max0 else max(rss0, _status_kib("VmRSS"))
        result.update(seconds=time.perf_counter() - t0, weights=weight_bytes(model),
                      rss=(peak_rss - rss0) * 1024, anon=(sampler.peak_anon - anon0) * 1024,
                      cuda=torch.cuda.max_memory_allocated(self.device) - cuda0 if cuda else None)  # fmt: skip
        return model

    ModelRunner._load_model = measured
    try:
        result["device"] = str(ModelRunner(config).device)
    finally:
        ModelRunner._load_model = load
    return result


def make_checkpoint(folder: Path, layers: int, experts: int, shard_bytes: int = 128 * MIB) -> None:
    """A DeepSeek-V3-shaped FP8 checkpoint as V3 ships (FP8 linears and experts with 128x128 block
    scales, bf16 elsewhere), random values, written shard by shard with its index."""
    from disagg.common.models.fp8 import quantize_weight_blocks
    from disagg.common.models.weights import PRESETS, load_config
    from safetensors.torch import save_file

    overrides = dict(SMALL_V3, num_hidden_layers=layers, n_routed_experts=experts)
    config = load_config("DeepSeek-V3", overrides)
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    shard, size, weight_map = {}, 0, {}

    def flush():
        nonlocal shard, size
        name = f"model-{len(set(weight_map.values())) + 1:05d}.safetensors"
        save_file(shard, folder / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
        shard, size = {}, 0

    for name, shape in checkpoint_shapes(config):
        w = torch.randn(shape, generator=gen) * 0.02
        if name.endswith("_proj.weight") and len(shape) == 2:
            shard[name], shard[f"{name}_scale_inv"] = quantize_weight_blocks(w, (128, 128))
        else:
            shard[name] = w.float() if "e_score_correction_bias" in name else w.to(torch.bfloat16)
        size += shard[name].numel() * shard[name].element_size()
        if size >= shard_bytes:
            flush()
    if shard:
        flush()
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    spec = dict(PRESETS["DeepSeek-V3"], **overrides)
    (folder / "config.json").write_text(json.dumps(spec))


def checkpoint_shapes(c) -> list[tuple[str, tuple[int, ...]]]:
    """The tensor names and shapes of a DeepSeek-V3 checkpoint of config c (per-expert tensors)."""
    h, heads = c.hidden_size, c.num_attention_heads
    qk = c.qk_nope_head_dim + c.qk_rope_head_dim
    out = [
        ("model.embed_tokens.weight", (c.vocab_size, h)),
        ("model.norm.weight", (h,)),
        ("lm_head.weight", (c.vocab_size, h)),
    ]
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}"
        out += [(f"{p}.input_layernorm.weight", (h,)), (f"{p}.post_attention_layernorm.weight", (h,)),
                (f"{p}.self_attn.q_a_proj.weight", (c.q_lora_rank, h)), (f"{p}.self_attn.q_a_layernorm.weight", (c.q_lora_rank,)),
                (f"{p}.self_attn.q_b_proj.weight", (heads * qk, c.q_lora_rank)),
                (f"{p}.self_attn.kv_a_proj_with_mqa.weight", (c.kv_lora_rank + c.qk_rope_head_dim, h)),
                (f"{p}.self_attn.kv_a_layernorm.weight", (c.kv_lora_rank,)),
                (f"{p}.self_attn.kv_b_proj.weight", (heads * (c.qk_nope_head_dim + c.v_head_dim), c.kv_lora_rank)),
                (f"{p}.self_attn.o_proj.weight", (h, heads * c.v_head_dim))]  # fmt: skip
        if i < c.first_k_dense_replace:
            out += _mlp(f"{p}.mlp", h, c.intermediate_size)
            continue
        out += [
            (f"{p}.mlp.gate.weight", (c.n_routed_experts, h)),
            (f"{p}.mlp.gate.e_score_correction_bias", (c.n_routed_experts,)),
        ]
        out += _mlp(f"{p}.mlp.shared_experts", h, c.moe_intermediate_size * c.n_shared_experts)
        for e in range(c.n_routed_experts):
            out += _mlp(f"{p}.mlp.experts.{e}", h, c.moe_intermediate_size)
    return out


def _mlp(prefix: str, h: int, inter: int) -> list[tuple[str, tuple[int, int]]]:
    return [(f"{prefix}.gate_proj.weight", (inter, h)), (f"{prefix}.up_proj.weight", (inter, h)),
            (f"{prefix}.down_proj.weight", (h, inter))]  # fmt: skip


def print_load(result: dict, label: str) -> None:
    kept = sum(result["weights"].values())
    by_dtype = ", ".join(f"{d} {b / MIB:.0f}" for d, b in sorted(result["weights"].items()))
    cuda = f"{result['cuda'] / MIB:.0f}" if result["cuda"] is not None else "-"
    print(f"| {label} | {result['device']} | {by_dtype} | {kept / MIB:.0f} | {result['rss'] / MIB:.0f} "
          f"| {result['anon'] / MIB:.0f} | {cuda} | {result['seconds']:.1f} |")  # fmt: skip


def plan_weights(model_path: str, overrides: str, tp: int, ep: int) -> tuple[dict[str, int], object]:
    """(weight bytes by dtype of TP rank 0 at tp/ep with the FP8 layout Hopper keeps, the config):
    the model is built with its big weights on the meta device (no memory). Every rank holds the
    same bytes."""
    from disagg.common.models.decoder import CausalLM
    from disagg.common.models.fp8 import deferred_fp8_weights, fp8_block_size
    from disagg.common.models.weights import allocate_deferred, load_config, take_fp8_layout
    from disagg.common.parallel.state import ParallelState, get_parallel, set_parallel

    config = load_config(model_path, overrides)
    before, dtype = get_parallel(), torch.get_default_dtype()
    set_parallel(ParallelState(tp_size=tp, ep_size=ep))
    torch.set_default_dtype(torch.bfloat16)
    try:
        # NOTE: built on the CPU (RoPE tables need data) with the big weights on the meta device
        with torch.device("cpu"), deferred_fp8_weights(config, torch.device("meta"), backend="triton"):
            model = CausalLM(config, max_positions=64)
        if fp8_block_size(config):
            take_fp8_layout(model, fp8_block_size(config), "triton")
        allocate_deferred(model)
    finally:
        set_parallel(before)
        torch.set_default_dtype(dtype)
    return weight_bytes(model), config


def plan(args) -> None:
    """Print the weight bytes per rank at --tp/--ep and the KV tokens the rest of a GPU holds."""
    from disagg.common.config import EngineConfig
    from disagg.common.engine.kv_pool import GPU_CONTEXT_BYTES
    from disagg.common.models.decoder import head_dim_of, kv_heads_per_rank

    weights, config = plan_weights(args.model_path, args.json_model_override_args, args.tp, args.ep)
    kept = sum(weights.values())
    fraction = EngineConfig.mem_fraction_static
    budget = args.gpu_memory_gib * GIB * fraction - kept - GPU_CONTEXT_BYTES
    layers, heads, dim = config.num_hidden_layers, kv_heads_per_rank(config, args.tp), head_dim_of(config)
    per_token = layers * 2 * heads * dim * 2  # bfloat16 K and V (MLA: one latent)
    print(f"{args.model_path} at --tp {args.tp} --ep {args.ep}, per rank (FP8 as Hopper keeps it):")
    for dtype, b in sorted(weights.items()):
        print(f"  {dtype:>15}: {b / GIB:8.2f} GiB")
    print(f"  {'weights':>15}: {kept / GIB:8.2f} GiB of {args.gpu_memory_gib:.1f} GiB; --mem-fraction-static "
          f"{fraction} leaves {budget / GIB:.2f} GiB for KV = {max(0, int(budget // per_token)):,} tokens "
          f"({per_token / 1024:.1f} KiB/token)")  # fmt: skip
    if budget <= 0:
        sys.exit(f"does not fit: {kept / GIB:.1f} GiB of weights per rank")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model-path", default=None, help="an HF folder or a preset (default: make a small FP8 V3)"
    )
    parser.add_argument("--load-format", default="auto", choices=["auto", "dummy"])
    parser.add_argument("--json-model-override-args", default="{}")
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--layers", type=int, default=4, help="the made checkpoint's layers (the first dense)"
    )
    parser.add_argument("--experts", type=int, default=128, help="the made checkpoint's routed experts")
    parser.add_argument(
        "--save-checkpoint", default=None, help="only write the small FP8 V3 checkpoint there"
    )
    parser.add_argument(
        "--plan", action="store_true", help="bytes per rank at --tp/--ep, built on the meta device"
    )
    parser.add_argument("--tp", type=int, default=8)
    parser.add_argument("--ep", type=int, default=1)
    parser.add_argument("--gpu-memory-gib", type=float, default=139.8, help="one GPU's memory (H200: 139.8)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.plan:
        args.model_path = args.model_path or "DeepSeek-V3"
        return plan(args)
    if args.save_checkpoint:
        return make_checkpoint(Path(args.save_checkpoint), args.layers, args.experts)
    if args.child:
        result = measure_load(args.model_path, args.load_format, args.device, args.json_model_override_args)
        print(json.dumps(result))
        return
    with tempfile.TemporaryDirectory(prefix="load_memory.") as tmp:
        if args.model_path is None:
            args.model_path = str(Path(tmp) / "fp8-v3")
            make_checkpoint(Path(args.model_path), args.layers, args.experts)
        cmd = [sys.executable, os.path.abspath(__file__), "--child", "--model-path", args.model_path,
               "--load-format", args.load_format, "--device", args.device,
               "--json-model-override-args", args.json_model_override_args]  # fmt: skip
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        result = json.loads(out.strip().splitlines()[-1])
    print("| load | device | weights kept, MiB by dtype | ideal (kept), MiB | peak RSS over start, MiB "
          "| peak anon RSS, MiB | peak CUDA allocated over start, MiB | s |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    print_load(result, f"DISAGG_FP8_GEMM={fp8_gemm_mode()}")


if __name__ == "__main__":
    main()
