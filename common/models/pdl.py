"""Programmatic Dependent Launch (PDL) for the project's Triton kernels: where it is on, and the
launch arguments that turn it on.

Why: decode at batch 1 on an H200 is launch-bound (~13 kernels a layer inside a CUDA graph, many of
2-3 µs: Qwen3-30B-A3B ran 79 µs a layer of kernels for 32 µs of bytes). On Hopper a kernel launched
with PDL (cuLaunchKernelEx with CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION; Triton:
`kernel[grid](..., launch_pdl=True)`) is launched as soon as every program of its predecessor in the
stream has called `griddepcontrol.launch_dependents` or exited, and overlaps its launch and prologue
with the predecessor's tail; its `griddepcontrol.wait` returns once the predecessor has completed
and its writes are visible.

The contract of a kernel launched with `**pdl_args(device)`: it takes `PDL: tl.constexpr` and its
first statement is `pdl_begin(PDL)` (with PDL: `tl.extra.cuda.gdc_wait()`, then
`tl.extra.cuda.gdc_launch_dependents()`), before any load or store. NOTE: a load of the
predecessor's output above the wait reads stale memory, and a store may overwrite what the
predecessor still reads: silently, other tokens, no error. The wait runs in every program, before
any early return. At the very top it also precedes the loads Triton's pipeliner hoists out of a K
loop (a wait inside a pipelined loop is reported not to hold them back: triton-lang/triton#11905).
tests/conftest.compile_for_hopper checks the placement in each kernel's sm_90 PTX; a kernel passed
`pdl_args` without a `PDL` argument fails to launch (Triton refuses the unknown keyword).

Where it is on (`pdl_enabled`): DISAGG_PDL=1 (common/config.py; the default since the H200 A/B of
docs/benchmarks.md, eleventh session: batch-1 steps 11% faster for Qwen3-30B-A3B, 19% for the
4-layer DeepSeek-V3, DeepSeek-V2-Lite unchanged; the tenth session's MLA losses were a timing
artefact), a CUDA device of compute capability >= 9, a Triton with `tl.extra.cuda.gdc_wait` and the
`launch_pdl` launch option (triton-lang/triton#6394, April 2025: Triton >= 3.4; the GPU image has
3.6; an older one keeps plain launches), not under Triton's interpreter (no grids to overlap).
Decided once per device; a launch site pays one cached lookup.

CUDA graphs: the decode step's kernels are launched inside a graph capture. Triton's launcher
passes the attribute to cuLaunchKernelEx on the current (capturing) stream, and stream capture
records it as a programmatic edge between the two kernel nodes (CUDA >= 12.3; the GPU image's torch
is built for 13.0), so graph replays keep the overlap. Beside a kernel launched without PDL (torch's,
cuBLAS's) ordering is the plain stream order on both sides.

FlashInfer (common/models/kernels.py) is not switched here: its RMSNorm, fused add + RMSNorm and
SiLU·mul launch with PDL by default on compute capability >= 9 (`enable_pdl=None` means
`device_support_pdl`, FlashInfer 0.7.2), its RoPE never does (no argument; its kernel passes
enable_pdl=false); DISAGG_PDL=0 therefore turns off ours only.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping
from types import MappingProxyType

import torch
from disagg.common.config import pdl_requested, triton_interpret

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU image: no Triton kernel runs
    triton = None

logger = logging.getLogger(__name__)

# a kernel's extra launch arguments: the constexpr, and the launch option where PDL is on (an older
# Triton refuses the option by name, so it is only passed where it exists and is wanted)
_ON: Mapping = MappingProxyType({"PDL": True, "launch_pdl": True})
_OFF: Mapping = MappingProxyType({"PDL": False})


def pdl_args(device: torch.device) -> Mapping:
    """The keyword arguments that launch a PDL-aware kernel on `device`:
    `kernel[grid](..., **pdl_args(x.device))`."""
    return _ON if pdl_enabled(device) else _OFF


@functools.cache
def pdl_enabled(device: torch.device) -> bool:
    """DISAGG_PDL=1, a CUDA device of compute capability >= 9, a Triton that has PDL, no interpreter."""
    if not pdl_requested() or triton_interpret() or device.type != "cuda":
        return False
    if device_capability(device) < (9, 0):
        logger.info("PDL needs Hopper or newer, %s is older: plain launches", device)
        return False
    if not triton_supports_pdl():
        logger.info("this Triton has no launch_pdl / gdc_wait (PDL): plain launches")
        return False
    logger.info("Triton kernels launch with PDL on %s", device)
    return True


def device_capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


@functools.cache
def triton_supports_pdl() -> bool:
    """Triton's device intrinsics (tl.extra.cuda.gdc_wait / gdc_launch_dependents) and its NVIDIA
    launch option `launch_pdl`, both from triton-lang/triton#6394."""
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
        from triton.language.extra import cuda
    except ImportError:
        return False
    intrinsics = hasattr(cuda, "gdc_wait") and hasattr(cuda, "gdc_launch_dependents")
    return intrinsics and "launch_pdl" in getattr(CUDAOptions, "__dataclass_fields__", {})


if triton is not None:

    @triton.jit
    def pdl_begin(PDL: tl.constexpr):
        """A PDL-aware kernel's first statement: with PDL, wait for the predecessor's writes, then let
        the successor launch (it waits for this kernel's in turn)."""
        if PDL:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()

else:
    pdl_begin = None  # the CPU image: no Triton kernel is defined to call it
