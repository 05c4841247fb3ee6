"""Greedy sampling's argmax over the vocabulary in two Triton launches on CUDA.

Why: torch's argmax of one row is one reduction that spreads a [1, V] row over few blocks; on an
H200 it took 8.7 us a step for Qwen3-30B-A3B's 151936 logits and 28 us for DeepSeek-V3's 129280
(tenth session's batch-1 profiles, docs/benchmarks.md), 1.8% of V3's 4-layer step. Here each row is
cut into CHUNK-wide pieces, one program each (the first launch: each piece's maximum and the first
index holding it), and one program a row picks the largest, the lowest index among equals (the
second launch). The result is torch.argmax(dim=-1)'s: the first index of each row's maximum. NaN
counts as +inf (torch ranks NaN above everything; the two differ only for a row holding both +inf
and a later NaN). The second launch also writes whether each row's maximum is finite: the sampler's
check for a numerical fault (NaN or +inf logits, or a row of -inf) at no extra launch. Everywhere else
(CPU, DISAGG_FUSED_KERNELS=0) torch's argmax runs and the flag is a gather + isfinite.
"""

from __future__ import annotations

import torch
from disagg.common.config import fused_kernels_enabled, triton_interpret
from disagg.common.models.fused_rope_kv import start_up_check
from disagg.common.models.pdl import pdl_args, pdl_begin

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU install: torch's argmax
    triton = None

CHUNK = 4096  # logits a first-launch program reads (V3's 129280: 32 programs a row)
_ENABLED = fused_kernels_enabled()

if triton is not None:

    @triton.jit
    def _chunk_max_kernel(x, part_v, part_i, V, stride, parts, CHUNK: tl.constexpr, PDL: tl.constexpr):
        """part_v / part_i[row, p]: the maximum of x[row, p * CHUNK : (p + 1) * CHUNK] and its first index."""
        pdl_begin(PDL)  # first: before any load or store (pdl.py)
        row, p = tl.program_id(0).to(tl.int64), tl.program_id(1)
        offs = p * CHUNK + tl.arange(0, CHUNK)
        v = tl.load(x + row * stride + offs, mask=offs < V, other=-float("inf")).to(tl.float32)
        v = tl.where(v != v, float("inf"), v)  # NaN ranks first, as in torch
        top = tl.max(v, axis=0)
        first = tl.min(tl.where(v == top, offs, V), axis=0)
        # a row of -inf: its first index (tl.max of -inf lanes is -inf, which equals every lane)
        tl.store(part_v + row * parts + p, top)
        tl.store(part_i + row * parts + p, first)

    @triton.jit
    def _pick_kernel(part_v, part_i, out, finite, parts, V, PARTS: tl.constexpr, PDL: tl.constexpr):
        """out[row]: the index of the largest piece maximum, the lowest index among equal ones;
        finite[row]: whether that maximum is finite (a NaN counted as +inf in the first launch)."""
        pdl_begin(PDL)  # first: before any load or store (pdl.py)
        row = tl.program_id(0).to(tl.int64)
        lanes = tl.arange(0, PARTS)
        mask = lanes < parts
        v = tl.load(part_v + row * parts + lanes, mask=mask, other=-float("inf"))
        i = tl.load(part_i + row * parts + lanes, mask=mask, other=V)
        top = tl.max(v, axis=0)
        tl.store(out + row, tl.min(tl.where(mask & (v == top), i, V), axis=0).to(tl.int64))
        tl.store(finite + row, ((top < float("inf")) & (top > -float("inf"))).to(tl.int8))


def check_argmax(logits: torch.Tensor) -> bool:
    """At start-up (the warm-up's logits, with equal maxima planted in two pieces and one row of
    -inf): the kernels against torch's argmax and isfinite; on a mismatch or a failed build the Triton path is
    turned off with a warning and torch's argmax runs. Returns whether the Triton path is on."""
    global _ENABLED
    if triton is None or not (logits.is_cuda or triton_interpret()) or not _ENABLED:
        return False
    x = logits.float().repeat(3, 1)
    x[0, 1] = x[0, -1] = x[0].max() + 1
    x[2] = float("-inf")
    want = x.argmax(dim=-1)
    want_finite = torch.isfinite(x.gather(1, want[:, None]).squeeze(1))  # row 2 (all -inf) is not
    _ENABLED = start_up_check(
        "greedy_argmax",
        "vocab",
        (x.shape[1],),
        lambda: all(
            torch.equal(got, right) for got, right in zip(argmax_finite(x), (want, want_finite), strict=True)
        ),
    )
    return _ENABLED


def greedy_argmax(logits: torch.Tensor, chunk: int = CHUNK) -> torch.Tensor:
    """logits [B, V] (rows contiguous) -> [B] int64, torch.argmax(logits, dim=-1)'s indices (`chunk`:
    a power of two, smaller in the interpreter tests)."""
    return argmax_finite(logits, chunk)[0]


def argmax_finite(logits: torch.Tensor, chunk: int = CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [B, V] -> (greedy_argmax's [B] int64 indices, [B] bool: whether each row's chosen logit is
    finite, i.e. torch.isfinite(logits[row, index]))."""
    rows, vocab = logits.shape
    runs = (logits.is_cuda and _ENABLED) or triton_interpret()
    if triton is None or not runs or rows == 0 or logits.stride(1) != 1:
        tokens = logits.argmax(dim=-1)
        return tokens, torch.isfinite(logits.gather(1, tokens[:, None]).squeeze(1))
    parts = triton.cdiv(vocab, chunk)
    part_v = torch.empty(rows, parts, dtype=torch.float32, device=logits.device)
    part_i = torch.empty(rows, parts, dtype=torch.int32, device=logits.device)
    out = torch.empty(rows, dtype=torch.int64, device=logits.device)
    finite = torch.empty(rows, dtype=torch.int8, device=logits.device)
    pdl = pdl_args(logits.device)
    _chunk_max_kernel[(rows, parts)](
        logits, part_v, part_i, vocab, logits.stride(0), parts, CHUNK=chunk, num_warps=8, **pdl
    )
    _pick_kernel[(rows,)](
        part_v, part_i, out, finite, parts, vocab, PARTS=triton.next_power_of_2(parts), num_warps=1, **pdl
    )
    return out, finite.view(torch.bool)
