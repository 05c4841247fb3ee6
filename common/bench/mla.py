"""One MLA attention layer of a real DeepSeek shape (random weights) decoding a batch over paged latents:
the weight-absorbed form (what a decode-only batch runs) against the expanded form (prefill's).

    python -m disagg.common.bench.mla --model-path DeepSeek-V2-Lite --batch 8 --ctx 1024 --threads 1

Prints the time per layer step of each form and their largest difference.
"""

from __future__ import annotations

import argparse
import time

import torch
from disagg.common.engine.attention import ForwardBatch, TorchBackend
from disagg.common.models.deepseek import MLAttention, latent_half_dim
from disagg.common.models.layers import RotaryEmbedding
from disagg.common.models.weights import load_config


def decode_batch(batch_size: int, ctx: int, page_size: int) -> ForwardBatch:
    """Each request has ctx tokens cached and decodes one more, on its own pages."""
    pages = ctx // page_size + 1
    tables = [list(range(b * pages, (b + 1) * pages)) for b in range(batch_size)]

    def t(x):
        return torch.tensor(x, dtype=torch.long)

    batch = ForwardBatch(
        input_ids=t([0] * batch_size),
        positions=t([ctx] * batch_size),
        out_page=t([table[ctx // page_size] for table in tables]),
        out_offset=t([ctx % page_size] * batch_size),
        q_lens=[1] * batch_size,
        kv_lens=[ctx + 1] * batch_size,
        page_tables=tables,
        logits_index=t(list(range(batch_size))),
        page_size=page_size,
    )
    batch.k_rows = batch.out_page * (2 * page_size) + batch.out_offset
    TorchBackend().prepare(batch)
    return batch


def time_form(
    attn: MLAttention, form, q_nope, q_pe, latent, batch, repeats: int
) -> tuple[float, torch.Tensor]:
    out = form(q_nope, q_pe, latent, batch)
    t0 = time.perf_counter()
    for _ in range(repeats):
        form(q_nope, q_pe, latent, batch)
    return (time.perf_counter() - t0) / repeats, out


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-path", default="DeepSeek-V2-Lite")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--ctx", type=int, default=1024)
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = load_config(args.model_path)
    torch.manual_seed(0)
    attn = MLAttention(config, 0, RotaryEmbedding(config, config.qk_rope_head_dim, args.ctx + 1))
    for p in attn.parameters():
        p.data.normal_(0, 0.02)
    batch = decode_batch(args.batch, args.ctx, args.page_size)
    num_pages = len(batch.page_tables) * len(batch.page_tables[0])
    latent = torch.randn(num_pages, 2, args.page_size, 1, latent_half_dim(config))
    from disagg.common.models.deepseek import gather_latent

    latent = gather_latent(latent, batch)
    q_nope = torch.randn(args.batch, attn.num_heads, attn.nope)
    q_pe = torch.randn(args.batch, attn.num_heads, attn.rope_dim)
    absorbed_s, absorbed = time_form(attn, attn.absorbed_attention, q_nope, q_pe, latent, batch, args.repeats)
    expanded_s, expanded = time_form(attn, attn.expanded_attention, q_nope, q_pe, latent, batch, args.repeats)
    shape = f"{args.model_path}, batch {args.batch}, ctx {args.ctx}, {args.threads} thread(s)"
    print(f"absorbed: {absorbed_s * 1e3:.1f} ms per layer step ({shape})")
    print(f"expanded: {expanded_s * 1e3:.1f} ms per layer step")
    print(f"max |absorbed - expanded| = {(absorbed - expanded).abs().max().item():.2e}")


if __name__ == "__main__":
    main()
