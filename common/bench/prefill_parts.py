"""Two parts of a long prompt's prefill on the GPU, each beside the matmul rate measured in this run
(issue 19: Qwen3-30B-A3B's 2048-token prefill at 46-48% of that rate, its kernels alone at 51%):

1. attention of one fresh prompt (no prefix): FlashInfer's paged prefill (as the engine runs it,
   pages of `--page-size` tokens) against its ragged prefill on contiguous K/V (as SGLang runs an
   extend without prefix), each backend (fa2, and fa3 where the device has it); the outputs compared;
2. the routed experts' grouped GEMMs (fused_moe) at the prompt's length with random routing against
   the same pairs spread evenly (each expert exactly tokens * k / E): the padding of every expert's
   rows to the M tile is the difference; and at each M tile of the sweep; then the k rows of each
   token added up by a summing launch or by the down GEMM's atomics (fused_moe's COMBINE).

    python3 -m disagg.common.bench.prefill_parts                  # Qwen3-30B-A3B's shapes, 2048 tokens
    python3 -m disagg.common.bench.prefill_parts --tokens 4096 --heads 16 --kv-heads 16 \
        --experts 64 --inter 1408 --top-k 6                        # DeepSeek-V2-Lite's MoE
"""

from __future__ import annotations

import argparse

import torch
from disagg.common.bench.moe_kernels import make_layers, roofline, routing, time_layers
from disagg.common.bench.offline import graph_us_per_layer, measure_ceilings, queued_us
from disagg.common.models import fused_moe


def attention(args, ceil: dict) -> None:
    import flashinfer

    dev, dt, t = torch.device("cuda"), torch.bfloat16, args.tokens
    hq, hkv, d, ps = args.heads, args.kv_heads, args.head_dim, args.page_size
    gen = torch.Generator(device=dev).manual_seed(0)
    q = torch.randn(t, hq, d, device=dev, dtype=dt, generator=gen)
    qkv = torch.randn(t, (hq + 2 * hkv) * d, device=dev, dtype=dt, generator=gen)  # the projection's rows
    k = qkv[:, hq * d : (hq + hkv) * d].view(t, hkv, d)  # strided views, as the layer has them
    v = qkv[:, (hq + hkv) * d :].view(t, hkv, d)
    pages = t // ps
    order = torch.randperm(pages, device=dev, generator=gen)  # the pool hands out pages in any order
    cache = torch.zeros(pages, 2, ps, hkv, d, device=dev, dtype=dt)
    cache[order, 0] = k.reshape(pages, ps, hkv, d)
    cache[order, 1] = v.reshape(pages, ps, hkv, d)
    i32 = dict(dtype=torch.int32, device=dev)
    qo = torch.tensor([0, t], **i32)
    flops = 4 * t * t / 2 * d * hq  # causal: half the square, QK^T and PV

    def workspace():  # one a wrapper: a plan writes its schedule into its wrapper's workspace
        return torch.empty(128 << 20, dtype=torch.uint8, device=dev)

    backends = ["fa2"] + (["fa3"] if torch.cuda.get_device_capability(dev) >= (9, 0) else [])
    outs = {}
    print(f"attention, one fresh prompt of {t} tokens, {hq} q / {hkv} kv heads of {d}, causal:")
    print(f"{'kernel':28} {'us':>9} {'TFLOP/s':>9} {'of matmul':>10} {'max |diff|':>11}")
    for backend in backends:
        paged = flashinfer.BatchPrefillWithPagedKVCacheWrapper(workspace(), "NHD", backend=backend)
        paged.plan(qo, torch.tensor([0, pages], **i32), order.int(), torch.tensor([ps], **i32),
                   hq, hkv, d, ps, causal=True, q_data_type=dt, kv_data_type=dt)  # fmt: skip
        ragged = flashinfer.BatchPrefillWithRaggedKVCacheWrapper(workspace(), "NHD", backend=backend)
        ragged.plan(qo, qo, hq, hkv, d, causal=True, q_data_type=dt, kv_data_type=dt)
        runs = {
            f"paged {backend} (page {ps})": lambda p=paged: p.run(q, cache),
            f"ragged {backend}, strided K/V": lambda r=ragged: r.run(q, k, v),
            f"ragged {backend}, contiguous": lambda r=ragged, kc=k.contiguous(), vc=v.contiguous(): r.run(
                q, kc, vc
            ),
        }
        for name, fn in runs.items():
            try:
                out = fn()
                # back to back: a call's ~20-40 us of launch hides behind its 70-90 us of kernel
                s = queued_us(fn, iters=20) / 1e6
            except Exception as e:  # noqa: BLE001 - a backend this build lacks: say so, go on
                print(f"{name:28} failed: {type(e).__name__}: {str(e)[:80]}")
                continue
            ref = outs.setdefault("ref", out)
            diff = (out.float() - ref.float()).abs().max().item()
            tf = flops / s / 1e12
            print(
                f"{name:28} {s * 1e6:>9.1f} {tf:>9.1f} {100 * tf / ceil['matmul_tflops']:>9.1f}% {diff:>11.2e}"
            )


def rope(args, ceil: dict) -> None:
    """fused_rope_kv at the prompt's length (Qwen3's q/k norm, K rotated back in place as the ragged
    path asks) per launch shape (heads a program, warps), in a graph; bytes against the copy rate."""
    from disagg.common.models import fused_rope_kv as frk

    dev, dt, t = torch.device("cuda"), torch.bfloat16, args.tokens
    hq, hkv, d, ps = args.heads, args.kv_heads, args.head_dim, args.page_size
    qkv = torch.randn(t, (hq + 2 * hkv) * d, device=dev, dtype=dt)
    q, k, v = (p.view(t, -1, d) for p in qkv.split([hq * d, hkv * d, hkv * d], -1))  # strided, as the layer's
    pages = t // ps + 1
    kv = torch.zeros(pages, 2, ps, hkv, d, device=dev, dtype=dt)
    pos = torch.arange(t, device=dev)
    k_rows = (pos // ps) * 2 * ps + pos % ps  # page p's K rows start at row 2p * ps
    inv = 1.0 / (1e6 ** (torch.arange(0, d, 2, device=dev).float() / d))
    ang = torch.arange(t, device=dev).float()[:, None] * inv[None, :]
    cos_sin = torch.cat([ang.cos(), ang.sin()], -1)
    norm = (torch.ones(d, device=dev, dtype=dt), torch.ones(d, device=dev, dtype=dt), 1e-6)
    nbytes = t * d * 2 * (2 * hq + 5 * hkv)  # q read + written, k read + back + pool, v read + pool
    print(
        f"\nRoPE + q/k norm + K/V write, {t} tokens ({nbytes / 1e6:.1f} MB moved), per launch shape (a graph of 16):"
    )
    print(f"{'heads a program, warps':24} {'us':>7} {'GB/s':>7} {'of copy':>8}")
    default = frk.launch_shape(t, hq + hkv)
    for launch in sorted({default, (4, 2), (8, 4), (16, 4), (32, 8)}):

        def fn(_, lw=launch):
            return frk.fused_rope_kv(pos, q, k, v, kv, k_rows, cos_sin, norm, launch=lw, rotate_k=True)

        us = graph_us_per_layer(fn, [None] * 16)
        gbs = nbytes / us / 1e3
        tag = " (default)" if launch == default else ""
        print(f"{str(launch) + tag:24} {us:>7.1f} {gbs:>7.0f} {100 * gbs / ceil['copy_gb_s']:>7.1f}%")


def experts(args, ceil: dict) -> None:
    t, e, k, h, inter = args.tokens, args.experts, args.top_k, args.hidden, args.inter
    layers = make_layers(args.layers, e, h, inter)
    x = torch.randn(t, h, device="cuda", dtype=torch.bfloat16) / 4
    weights, ids = routing(t, e, k)
    even = (torch.arange(t * k, device="cuda") % e).view(t, k)  # each expert exactly t * k / e pairs
    flops = 2 * t * k * 3 * h * inter
    base = fused_moe.moe_config(e, inter, h)
    tuned = fused_moe.grouped_config(base, t)
    print(f"\nrouted experts, {t} tokens x top-{k} of {e} (hidden {h}, inter {inter}), tuned tile {tuned}:")
    print(
        f"{'routing':10} {'M tile':>6} {'padded pairs':>13} {'us/layer':>9} {'active TFLOP/s':>15} {'of matmul':>10}"
    )
    tiles = sorted({tuned["BLOCK_SIZE_M"], 64, 128})
    for name, route in (("random", ids), ("even", even)):
        counts = torch.bincount(route.flatten(), minlength=e)
        for bm in tiles:
            cfg = {**tuned, "BLOCK_SIZE_M": bm}
            config = {**base, "gemv_max_pairs": 0, "grouped_mm_min_tokens": 1 << 30, "grouped": {"1": cfg}}
            padded = int(((counts + bm - 1) // bm * bm).sum())
            s = time_layers(
                lambda x, w13, w2, sc, r=route, c=config: fused_moe.fused_experts(x, w13, w2, weights, r, c),
                layers, x, graph=False,
            )  # fmt: skip
            tf = flops / s / 1e12
            print(
                f"{name:10} {bm:>6} {padded:>13} {s * 1e6:>9.1f} {tf:>15.1f} {100 * tf / ceil['matmul_tflops']:>9.1f}%"
            )
    # the alignment alone (three launches at prefill sizes), its prefix 16 chunk rows a step (before
    # the twenty-second session) against the auto tile (all chunks at once where they fit)
    print(
        f"\nthe alignment of {t * k} pairs to the tuned M tile {tuned['BLOCK_SIZE_M']} (a graph of 16 calls):"
    )
    for rows in (16, 0):
        fused_moe._ALIGN_SCAN_ROWS = rows
        us = graph_us_per_layer(lambda _: fused_moe.align_blocks(ids, e, tuned["BLOCK_SIZE_M"]), [None] * 16)
        print(f"{'prefix rows ' + (str(rows) if rows else 'auto'):24} {us:>9.1f} us")
    fused_moe._ALIGN_SCAN_ROWS = 0
    # the k rows of a token: stored a pair then summed (one more launch over [T * k, H]) or added by the
    # down GEMM's atomics (the model dtype, or float32 then a cast); graphs: the kernels alone
    roof, _ = roofline(t, ids, h, inter, ceil)
    print(
        f"\nthe k rows' combine, tuned tile, random routing; roofline {roof * 1e6:.1f} us (the experts' bytes"
    )
    print("at the copy rate or their FLOPs at the matmul rate), max |diff| against sum over max |sum|:")
    print(
        f"{'combine':12} {'us/layer':>9} {'of roofline':>12} {'active TFLOP/s':>15} {'of matmul':>10} {'diff':>9}"
    )
    ref = None
    for mode in ("sum", "atomic", "atomic_fp32"):
        config = {**base, "gemv_max_pairs": 0, "grouped_mm_min_tokens": 1 << 30}
        config["grouped"] = {"1": {**tuned, "COMBINE": mode}}
        fn = lambda x, w13, w2, sc, c=config: fused_moe.fused_experts(x, w13, w2, weights, ids, c)  # noqa: E731
        out = fn(x, *layers[0]).float()
        ref = out if ref is None else ref
        diff = ((out - ref).abs().max() / ref.abs().max()).item()
        s = time_layers(fn, layers, x, graph=True)
        tf = flops / s / 1e12
        print(
            f"{mode:12} {s * 1e6:>9.1f} {100 * roof / s:>11.1f}% {tf:>15.1f} "
            f"{100 * tf / ceil['matmul_tflops']:>9.1f}% {diff:>9.2e}"
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--experts", type=int, default=128)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--inter", type=int, default=768)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--skip", choices=["attention", "rope", "experts"], default=None)
    args = p.parse_args()
    ceil = measure_ceilings(torch.device("cuda"), torch.bfloat16)
    print(f"{torch.cuda.get_device_name()}: ceilings {ceil}")
    if args.skip != "attention":
        attention(args, ceil)
    if args.skip != "rope":
        rope(args, ceil)
    if args.skip != "experts":
        experts(args, ceil)


if __name__ == "__main__":
    main()
