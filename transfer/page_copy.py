"""The direct hand-off's page copy in one pass: a Triton kernel on CUDA (transfer/direct.py).

Why: torch has no single op for dst[:, dst_pages] = src[:, src_pages]; the torch path gathers the
pages into a temporary (torch.gather) and scatters it (index_copy_), moving every byte twice. The
seventeenth and eighteenth sessions' one-GPU sweeps measured that copy at 0.7-1.4 ms of GPU time for
a 1k-token 8B request (128 MiB) beside the decode's steps, on the critical path of its first token;
one read and one write of the same bytes is half the traffic. Each program copies BLOCK 8-byte words
of one layer's row of one page pair (a page's layer slice is one contiguous row when the copy moves
all of the pool's KV heads); a head slice (heterogeneous TP) or a copy between two GPUs keeps the
torch path. Everywhere else (the CPU, DISAGG_FUSED_KERNELS=0, a failed start-up check) torch runs.
"""

from __future__ import annotations

import torch
from disagg.common.config import fused_kernels_enabled, triton_interpret
from disagg.common.models.fused_rope_kv import start_up_check

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU install: the torch path
    triton = None

BLOCK = 1024  # 8-byte words a program copies (8 KiB; an 8B page's layer row is 64 KiB: 8 programs)
_state = {"enabled": fused_kernels_enabled(), "checked": set()}  # devices whose start-up check ran

if triton is not None:

    @triton.jit
    def _copy_pages_kernel(
        src, dst, src_pages, dst_pages, row_words, stride_src_layer, stride_src_page, stride_dst_layer,
        stride_dst_page, BLOCK: tl.constexpr,
    ):  # fmt: skip
        """dst[layer, dst_pages[i], :] = src[layer, src_pages[i], :] for program (i, layer, block)."""
        i, layer, block = tl.program_id(0), tl.program_id(1).to(tl.int64), tl.program_id(2)
        s = tl.load(src_pages + i).to(tl.int64)
        d = tl.load(dst_pages + i).to(tl.int64)
        offs = block * BLOCK + tl.arange(0, BLOCK)
        mask = offs < row_words
        words = tl.load(src + layer * stride_src_layer + s * stride_src_page + offs, mask=mask)
        tl.store(dst + layer * stride_dst_layer + d * stride_dst_page + offs, words, mask=mask)


def usable(src: torch.Tensor, dst: torch.Tensor) -> bool:
    """Whether copy_rows may take these [layers, pages, words] int64 views: one device, CUDA (or the
    interpreter's CPU tensors), rows contiguous, the kernel on and checked for that device."""
    if triton is None or not _state["enabled"] or src.device != dst.device:
        return False
    if not (src.is_cuda or triton_interpret()):
        return False
    if src.dtype != torch.int64 or dst.dtype != torch.int64 or src.dim() != 3 or dst.dim() != 3:
        return False
    if (
        src.stride(2) != 1
        or dst.stride(2) != 1
        or src.shape[0] != dst.shape[0]
        or src.shape[2] != dst.shape[2]
    ):
        return False
    return check(src.device)


def copy_rows(src: torch.Tensor, src_pages: torch.Tensor, dst: torch.Tensor, dst_pages: torch.Tensor) -> None:
    """dst[:, dst_pages[i]] = src[:, src_pages[i]] on the current stream ([layers, pages, words]
    int64 views; page indices int64 on their device; see `usable`)."""
    n, layers, words = len(src_pages), src.shape[0], src.shape[2]
    if n == 0 or layers == 0 or words == 0:
        return
    grid = (n, layers, triton.cdiv(words, BLOCK))
    _copy_pages_kernel[grid](
        src, dst, src_pages, dst_pages, words, src.stride(0), src.stride(1), dst.stride(0), dst.stride(1),
        BLOCK=BLOCK, num_warps=4,
    )  # fmt: skip


def check(device: torch.device) -> bool:
    """Once per device (a server's start-up, through `usable`): the kernel against torch's indexing on
    pools of odd sizes (a row longer than one block, pages out of order, a layer slice as the
    destination); a mismatch or a failed build turns the kernel off, loudly."""
    if device in _state["checked"]:
        return _state["enabled"]
    _state["checked"].add(device)
    g = torch.Generator().manual_seed(0)

    def agrees() -> bool:
        words = BLOCK + 37
        src = torch.randint(-(2**62), 2**62, (3, 9, words), generator=g).to(device)
        pool = torch.randint(-(2**62), 2**62, (5, 11, words), generator=g).to(device)
        dst = pool[1:4]  # a pipeline stage's layers of the decode's pool
        src_pages = torch.tensor([7, 0, 3, 8], device=device)
        dst_pages = torch.tensor([2, 10, 5, 0], device=device)
        want = pool.clone()
        want[1:4, dst_pages] = src[:, src_pages]
        copy_rows(src, src_pages, dst, dst_pages)
        return torch.equal(pool, want)

    _state["enabled"] = start_up_check("page copy", "row words", (BLOCK + 37,), agrees)
    return _state["enabled"]
