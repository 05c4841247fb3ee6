"""Weight prefetch into the L2 cache while a decode step's attention runs (DISAGG_L2_PREFETCH=1; off by
default until the GPU A/B of `gpu_runs.sh prefetch-ab` says it pays).

Why: at batch 1 a layer's attention (RoPE and the K/V write, the split-KV kernel and its merge) reads
~2 MB in ~8-10 µs, while DRAM sits mostly idle; the o_proj GEMV right after it then streams its
weight (Qwen3-30B-A3B: 16.8 MB, ~6 µs at the H100's 2.9 TB/s) from DRAM. One tiny launch after the
qkv product asks the memory system to bring o_proj's weight into L2 (Hopper's
`cp.async.bulk.prefetch.L2.global`: each thread one 64 KB range, no registers, no completion to wait
for), so the GEMV finds it there. 50 MB of L2 holds the 8B's 33.5 MB o_proj too. The same pattern is
Ascend's weight prefetch in vLLM-Ascend (prefetch during the vector ops) and PRESERVE's (prefetch
during collectives).

Only where the window is latency-bound and the weight fits: decode batches of at most
MAX_TOKENS tokens on compute capability >= 9 (the instruction is sm_90's). The launch is PDL-aware
(pdl.py): it waits for the qkv product like any kernel, and the next kernel waits for it; the
prefetches it issued keep going after it exits (a hint: no completion, no effect on any value, so
outputs are unchanged by construction: tests/test_l2_prefetch.py compiles it for sm_90 here and
checks its PTX; its GPU test checks a product read right after it, eagerly and in a CUDA graph).
"""

from __future__ import annotations

import functools

import torch
from disagg.common.config import l2_prefetch_requested, triton_interpret
from disagg.common.models.pdl import device_capability, pdl_args, pdl_begin

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU install: nothing to prefetch into
    triton = None

CHUNK = 64 * 1024  # bytes one thread asks for (a multiple of 16, as the instruction needs)
BLOCK = 128  # threads a program (one chunk each): 8 MB a program
MAX_TOKENS = 8  # decode batches up to this many tokens prefetch (above, attention streams KV itself)

if triton is not None:

    @triton.jit
    def _prefetch_l2_kernel(base, nbytes, CHUNK: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
        """Asks L2 for bytes [i * CHUNK, min((i + 1) * CHUNK, nbytes)) of `base` for this program's BLOCK
        chunks i (16-byte multiples: a ragged tail of under 16 bytes is left out)."""
        pdl_begin(PDL)  # first: before any global access (pdl.py)
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        offs = i.to(tl.int64) * CHUNK
        size = tl.maximum(tl.minimum(nbytes - offs, CHUNK), 0)  # 0 past the end: skipped
        size = (size // 16 * 16).to(tl.int32)
        tl.inline_asm_elementwise(
            "{ .reg .pred p; setp.gt.s32 p, $2, 0; @p cp.async.bulk.prefetch.L2.global [$1], $2; mov.u32 $0, 0; }",
            "=r,l,r",
            [base + offs, size],
            dtype=tl.int32,
            is_pure=False,
            pack=1,
        )


@functools.cache
def prefetch_enabled(device: torch.device) -> bool:
    """DISAGG_L2_PREFETCH=1, Triton (not its interpreter: no L2), a CUDA device of compute capability >= 9."""
    if not l2_prefetch_requested() or triton is None or triton_interpret() or device.type != "cuda":
        return False
    return device_capability(device) >= (9, 0)


def prefetch_l2(weight: torch.Tensor) -> None:
    """Brings `weight` (a contiguous tensor) into L2 in the background: one launch, no result."""
    if not weight.is_contiguous():
        raise ValueError("prefetch_l2 takes a contiguous tensor")
    nbytes = weight.numel() * weight.element_size()
    grid = (triton.cdiv(triton.cdiv(nbytes, CHUNK), BLOCK),)
    _prefetch_l2_kernel[grid](weight.view(torch.uint8).view(-1), nbytes, CHUNK=CHUNK, BLOCK=BLOCK,
                              num_warps=4, **pdl_args(weight.device))  # fmt: skip


def maybe_prefetch(weight: torch.Tensor, batch) -> None:
    """prefetch_l2(weight) where it is on and `batch` (a ForwardBatch) is a decode batch of at most
    MAX_TOKENS tokens (see the module's note)."""
    if prefetch_enabled(weight.device) and len(batch.q_lens) <= MAX_TOKENS and batch.is_decode_only:
        prefetch_l2(weight)
