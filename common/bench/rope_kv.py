"""The attention layer's RoPE + K/V write on the GPU: the fused Triton kernel (common/models/
fused_rope_kv.py) against the ops it replaces (decoder.Attention.rope_and_write_kv: FlashInfer's
RoPE, the two index_copy_s, the V-row add, q.contiguous(); Qwen3: the two q/k RMSNorms), each as a
CUDA graph of `--layers` layers replayed, as a decode step runs them. Prints µs per layer, kernels
per layer (torch profiler) and the fused kernel's bandwidth over the bytes it must move.

    python -m disagg.common.bench.rope_kv                    # 8B (32/8/128) and Qwen3-30B-A3B (32/4/128, q/k norm)
    python -m disagg.common.bench.rope_kv --tokens 1,64,4096 --page-size 16 --layers 32
"""

from __future__ import annotations

import argparse
import functools

import torch
from disagg.common.bench.offline import graph_us_per_layer, kernels_per_call
from disagg.common.models.fused_rope_kv import fused_rope_kv
from disagg.common.models.kernels import apply_rope, check_fused_kernels, rms_norm

SHAPES = {"llama-8b": (32, 8, 128, False), "qwen3-30b-a3b": (32, 4, 128, True)}


def make_layer(t: int, hq: int, hkv: int, d: int, qk_norm: bool, page_size: int, gen) -> dict:
    """One layer's inputs: the qkv projection's output, scattered slots, its pool view, its norms."""
    pages = t // page_size + 4
    slots = torch.randperm(pages * page_size, generator=gen, device=gen.device)[:t]
    return dict(
        qkv=torch.randn(t, (hq + 2 * hkv) * d, generator=gen, device=gen.device).bfloat16(),
        kv=torch.zeros(pages, 2, page_size, hkv, d, device=gen.device, dtype=torch.bfloat16),
        k_rows=slots // page_size * (2 * page_size) + slots % page_size,
        norm=(torch.ones(d, device=gen.device, dtype=torch.bfloat16),) * 2 + (1e-6,) if qk_norm else None,
    )


def split(layer: dict, hq: int, hkv: int, d: int):
    q, k, v = layer["qkv"].split([hq * d, hkv * d, hkv * d], -1)
    return q.view(-1, hq, d), k.view(-1, hkv, d), v.view(-1, hkv, d)


def unfused(layer: dict, positions, rope: tuple, shape: tuple) -> torch.Tensor:
    """decoder.Attention.rope_and_write_kv's ops, then the copy attention makes of the strided q."""
    hq, hkv, d, _ = shape
    q, k, v = split(layer, hq, hkv, d)
    if layer["norm"] is not None:
        q, k = rms_norm(q, layer["norm"][0], 1e-6), rms_norm(k, layer["norm"][1], 1e-6)
    q, k = apply_rope(positions, q, k, *rope)
    rows, page_size = layer["kv"].view(-1, hkv, d), layer["kv"].shape[2]
    rows.index_copy_(0, layer["k_rows"], k)
    rows.index_copy_(0, layer["k_rows"] + page_size, v)
    return q.contiguous()


def fused(layer: dict, positions, rope: tuple, shape: tuple) -> torch.Tensor:
    hq, hkv, d, _ = shape
    return fused_rope_kv(
        positions, *split(layer, hq, hkv, d), layer["kv"], layer["k_rows"], rope[2], layer["norm"]
    )


def run_layer(fn, positions, rope, shape, layer: dict) -> torch.Tensor:
    return fn(layer, positions, rope, shape)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", default="1,64,4096", help="batch token counts (decode batch or prefill)")
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument("--layers", type=int, default=32)
    args = parser.parse_args()
    print(
        f"{torch.cuda.get_device_name()}; FlashInfer ops: {check_fused_kernels(torch.device('cuda'), torch.bfloat16)}"
    )
    gen = torch.Generator(device="cuda").manual_seed(0)
    print("shape | tokens | unfused us/layer (kernels) | fused us/layer (kernels) | fused GB/s")
    for name, shape in SHAPES.items():
        hq, hkv, d, qk_norm = shape
        inv = 1.0 / (500000.0 ** (torch.arange(0, d, 2, device="cuda").float() / d))
        freqs = torch.outer(torch.arange(8192, device="cuda").float(), inv)
        rope = (freqs.cos(), freqs.sin(), torch.cat([freqs.cos(), freqs.sin()], -1))
        for t in (int(x) for x in args.tokens.split(",")):
            positions = torch.randint(0, 8192, (t,), generator=gen, device="cuda")
            layers = [make_layer(t, hq, hkv, d, qk_norm, args.page_size, gen) for _ in range(args.layers)]
            row = []
            for fn in (unfused, fused):
                per_layer = functools.partial(run_layer, fn, positions, rope, shape)
                us = graph_us_per_layer(per_layer, layers)
                row.append((us, kernels_per_call(functools.partial(per_layer, layers[0]))))
            moved = 2 * t * (hq + 2 * hkv) * d * 2  # q, k, v read once, written once (bf16)
            gbs = moved / (row[1][0] * 1e-6) / 1e9
            print(f"{name} | {t} | {row[0][0]:.2f} ({row[0][1]}) | {row[1][0]:.2f} ({row[1][1]}) | {gbs:.0f}")


if __name__ == "__main__":
    main()
