"""Prefetch a decode step's next dense weight into L2 while attention leaves HBM idle (Hopper).

At a few tokens a layer's attention (RoPE + K/V write, the split-KV decode and its merge: ~8–11 us
at ctx 1024) reads ~2 MB of KV, so HBM sits nearly idle, and the o_proj GEMV that follows then
streams its 8–17 MB from HBM. `prefetch_l2(w)`, launched right after the QKV projection, issues
Hopper's bulk L2 prefetch (`cp.async.bulk.prefetch.L2.global`: fire and forget, no registers, no
wait) over the weight's bytes: the copy engine pulls them into L2 during attention, and o_proj
reads them from there. A hint only: nothing reads its result, so a prefetch that is evicted or
late costs time, never tokens. At most PREFETCH_MAX_BYTES (the H100's and H200's L2 is 50 MB, and
the KV and activations pass through it too).

Used by the attention layers for decode batches of at most PREFETCH_MAX_TOKENS tokens on CUDA
devices of compute capability 9.0+, where a start-up launch ran; `DISAGG_L2_PREFETCH=0` turns it off
(A/B runs).
"""

from __future__ import annotations

import functools
import logging

import torch
from disagg.common.config import l2_prefetch_requested
from disagg.common.models.pdl import pdl_args, pdl_begin

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU image: no prefetch
    triton = None

logger = logging.getLogger(__name__)

PREFETCH_MAX_TOKENS = 16
PREFETCH_MAX_BYTES = 24 << 20
_CHUNK = 32 << 10  # bytes one bulk prefetch instruction asks for (a multiple of 16)
_PER_PROGRAM = 128  # chunks a program issues (one a thread at 4 warps)


def prefetch_l2(weight: torch.Tensor, max_bytes: int = PREFETCH_MAX_BYTES) -> None:
    """Ask L2 for the first min(max_bytes, weight's bytes) of a contiguous weight (rounded down to 16)."""
    data = weight.detach().reshape(-1).view(torch.uint8)
    nbytes = min(data.numel(), max_bytes) // 16 * 16
    chunks = triton.cdiv(nbytes, _CHUNK)
    _prefetch_kernel[(triton.cdiv(chunks, _PER_PROGRAM),)](
        data, nbytes, CHUNK=_CHUNK, PER_PROGRAM=_PER_PROGRAM, num_warps=4, **pdl_args(weight.device)
    )


@functools.cache
def prefetch_ok(device: torch.device) -> bool:
    """Whether prefetch_l2 launches here: CUDA, compute capability 9.0+ (the bulk prefetch is Hopper's),
    not turned off, and a launch on a small tensor ran (on an error: no prefetch, loudly)."""
    if triton is None or device.type != "cuda" or not l2_prefetch_requested():
        return False
    if torch.cuda.get_device_capability(device) < (9, 0):
        return False
    try:
        w = torch.zeros(3 * _CHUNK + 48, dtype=torch.uint8, device=device)
        prefetch_l2(w)
        torch.cuda.synchronize(device)
    except Exception:  # noqa: BLE001 - any failure: no prefetch, loudly
        logger.exception("the L2 prefetch failed its start-up launch: off")
        return False
    return True


if triton is not None:

    @triton.jit
    def _prefetch_kernel(data, nbytes, CHUNK: tl.constexpr, PER_PROGRAM: tl.constexpr, PDL: tl.constexpr):
        """Program p asks L2 for chunks [p * PER_PROGRAM, (p + 1) * PER_PROGRAM) of CHUNK bytes (the
        last one cut at nbytes), one bulk prefetch a thread."""
        pdl_begin(PDL)  # first: its predecessor done, so the prefetch runs in the window after it
        first = tl.program_id(0).to(tl.int64) * PER_PROGRAM * CHUNK
        offs = first + tl.arange(0, PER_PROGRAM).to(tl.int64) * CHUNK
        size = tl.maximum(tl.minimum(nbytes - offs, CHUNK), 0).to(tl.int32)
        tl.inline_asm_elementwise(
            "{ .reg .pred p; setp.gt.s32 p, $2, 0; @p cp.async.bulk.prefetch.L2.global [$1], $2; mov.u32 $0, 0; }",
            "=r,l,r",
            [data + offs, size],
            dtype=tl.int32,
            is_pure=False,
            pack=1,
        )
