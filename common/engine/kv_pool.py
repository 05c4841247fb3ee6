"""The paged KV pool: one tensor holding every layer's K and V pages, and the free-page list.

Layout (shared with transfer/, which moves pages between pools):
    kv_buffer: [num_layers, num_pages, 2, page_size, num_kv_heads, head_dim]   (2 = K, V)
A page is the unit of allocation. Pages are owned by exactly one holder at a time: the free list,
a request's page table, or the radix cache (which shares them between requests by reference).
"""

from __future__ import annotations

import logging
import os

import torch
from disagg.common.shm import shareable_zeros

logger = logging.getLogger(__name__)


class OutOfPagesError(RuntimeError):
    pass


class KVPagePool:
    def __init__(
        self,
        num_pages: int,
        page_size: int,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ):
        self.num_pages = num_pages
        self.page_size = page_size
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.dtype = dtype
        self.device = device
        # NOTE: one page past the pool, `pad_page`, is never allocated: padded batch rows (CUDA
        # graphs) write their throw-away K/V there.
        shape = (num_layers, num_pages + 1, 2, page_size, num_kv_heads, head_dim)
        if torch.device(device).type == "cpu":
            # NOTE: in a memfd, so that a PD peer on this host can map it and copy pages straight in
            # (transfer/direct.py); otherwise the same zeroed memory as torch.zeros
            self.kv_buffer = shareable_zeros(shape, dtype)
        else:
            self.kv_buffer = torch.zeros(shape, dtype=dtype, device=device)
        self.pad_page = num_pages
        # NOTE: a stack, so recently freed (cache-warm) pages are reused first
        self._free: list[int] = list(range(num_pages - 1, -1, -1))
        self._is_free = [True] * num_pages

    @property
    def num_free_pages(self) -> int:
        return len(self._free)

    @property
    def bytes_per_page(self) -> int:
        return self.kv_buffer[:, 0].numel() * self.kv_buffer.element_size()

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise OutOfPagesError(f"need {n} pages, {len(self._free)} free")
        pages = [self._free.pop() for _ in range(n)]
        for p in pages:
            self._is_free[p] = False
        return pages

    def free(self, pages: list[int]) -> None:
        for p in pages:
            if self._is_free[p]:
                raise RuntimeError(f"page {p} freed twice")
            self._is_free[p] = True
        self._free.extend(pages)


def pages_for_tokens(num_tokens: int, page_size: int) -> int:
    return (num_tokens + page_size - 1) // page_size


# The CPU pool's default (no --max-total-tokens): the smallest of these. On a laptop a prefill and
# a decode server (launch_local) each hold one next to their weights and the other processes, so
# the default stays modest: 512 MiB is ~11.6k tokens for the default 135M model in float32.
CPU_POOL_MAX_BYTES = 512 << 20
CPU_POOL_MAX_TOKENS = 65536
CPU_POOL_MEM_FRACTION = 0.25  # of the memory available at start-up (activations and neighbours need the rest)
CPU_POOL_MIN_TOKENS = 1024  # below this the pool is useless: ask for an explicit size instead


def size_pool_pages(
    bytes_per_page: int,
    page_size: int,
    device: torch.device,
    max_total_tokens: int | None,
    mem_fraction: float,
) -> int:
    """Pages from --max-total-tokens, else from --mem-fraction-static (see gpu_pool_budget), else on
    the CPU from the memory available now (capped: see above)."""
    if max_total_tokens:
        return pages_for_tokens(max_total_tokens, page_size)
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        budget = gpu_pool_budget(free, total, torch.cuda.memory_reserved(device), mem_fraction)
        if budget <= bytes_per_page:
            raise RuntimeError(
                f"no GPU memory left for the KV pool: --mem-fraction-static {mem_fraction} of "
                f"{total / 2**30:.1f} GiB is {total * mem_fraction / 2**30:.1f} GiB, this server already holds "
                f"{torch.cuda.memory_reserved(device) / 2**30:.1f} GiB, {free / 2**30:.1f} GiB are free"
            )
        return int(budget // bytes_per_page)
    return _cpu_pool_pages(bytes_per_page, page_size)


GPU_CONTEXT_BYTES = 1 << 30  # the CUDA context and libraries' workspaces: outside torch's accounting
GPU_FREE_HEADROOM = 2 << 30  # left free on the device for activations, graphs and other processes


def gpu_pool_budget(free: int, total: int, held: int, mem_fraction: float) -> int:
    """KV pool bytes for --mem-fraction-static: the share of the *whole* GPU this server may hold
    (weights + KV + workspace), minus what it holds already (`held`: weights, loaded by now) and its
    context, never more than what is free. So two servers at 0.4 each fit one GPU whichever sizes
    its pool first (SGLang's formula, free - total * (1 - f), counted the other server's memory
    against the second one)."""
    share = total * mem_fraction - held - GPU_CONTEXT_BYTES
    return int(min(share, free - GPU_FREE_HEADROOM))


def _cpu_pool_pages(bytes_per_page: int, page_size: int) -> int:
    available = available_memory()
    budget = (
        CPU_POOL_MAX_BYTES
        if available is None
        else min(CPU_POOL_MAX_BYTES, available * CPU_POOL_MEM_FRACTION)
    )
    pages = min(int(budget // bytes_per_page), pages_for_tokens(CPU_POOL_MAX_TOKENS, page_size))
    if pages * page_size < CPU_POOL_MIN_TOKENS:
        raise RuntimeError(
            f"too little memory for a CPU KV pool ({(available or 0) / 2**30:.1f} GiB available): "
            "pass --max-total-tokens"
        )
    logger.info(
        "CPU KV pool: %d tokens (%.0f MiB; default: at most %d MiB, %d tokens and %.0f%% of the %s available; "
        "--max-total-tokens sets it)",
        pages * page_size,
        pages * bytes_per_page / 2**20,
        CPU_POOL_MAX_BYTES >> 20,
        CPU_POOL_MAX_TOKENS,
        100 * CPU_POOL_MEM_FRACTION,
        "unknown memory" if available is None else f"{available / 2**30:.1f} GiB",
    )
    return pages


def available_memory() -> int | None:
    """Bytes this process can still get without swapping or hitting its container's limit (Linux
    MemAvailable and cgroup v2 memory.max), None if unknown."""
    free = _meminfo_available()
    room = _cgroup_room()
    if free is None or room is None:
        return free if room is None else room
    return min(free, room)


def _meminfo_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:  # other Unixes: free pages only (a lower bound: no page cache counted)
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _cgroup_room() -> int | None:
    # NOTE: in a container /proc/meminfo shows the host's memory; the pod's limit is the cgroup's
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        with open("/sys/fs/cgroup/memory.current") as f:
            used = int(f.read())
    except (OSError, ValueError):
        return None
    return None if limit == "max" else max(0, int(limit) - used)
