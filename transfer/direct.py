"""Direct page copies between pools of one host: the prefill writes straight into the decode's pool.

When a prefill rank and a decode rank share a machine, sending KV through UCX (gather into staging,
one tag message, scatter) costs per-message software time that dwarfs the copy itself (an 8B
1k-token request on one H200: 137 MB, ~0.07 ms as a device copy, 9-65 ms through UCX). Instead the
decode rank shares its pool once, at the handshake, and the prefill rank maps it and copies each
chunk's pages into the decode's pages itself: one copy kernel on its transfer stream (page_copy.py;
else one gather + one index_copy_), no staging message, no receive to post.

- CUDA: the pool's allocation is shared with a CUDA IPC handle (torch's `_share_cuda_`, what
  torch.multiprocessing uses); the prefill opens it on its own device of the same GPU UUID (the same
  GPU, or a peer GPU of the node: the copy then goes over NVLink/PCIe).
- CPU: the pool lives in a memfd (`common/shm.py`); the prefill opens `/proc/<pid>/fd/<fd>` and
  maps it. The memory goes away with the last process mapping it: nothing is left in /dev/shm
  when a server is killed.

Either side only uses this when both are on the same boot of the same host (`/proc/sys/kernel/random/
boot_id`) and the mapping checks out (memfd: the same inode; CUDA: the handle opens on a GPU with the
exporter's UUID); anything else falls back to UCX. The protocol side (who may write which pages
when) is in sender.py / receiver.py: a decode room with a direct source reports a failure only once
that source has released it (RoomReleasedMsg), so a late copy never lands in reused pages.
"""

from __future__ import annotations

import logging
import mmap
import os
from typing import Any

import torch
from disagg.common.shm import memfd_of
from disagg.transfer import page_copy
from disagg.transfer.base import gather_pages, wide_pages

logger = logging.getLogger(__name__)


def boot_id() -> str:
    """This host's boot: two processes with the same one can share memory (if the kernel lets them)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def export_pool(pool: torch.Tensor) -> dict[str, Any]:
    """What a local peer needs to map `pool` ({} when it cannot be shared)."""
    host = boot_id()
    if not host:
        return {}
    info: dict[str, Any] = {"boot_id": host, "shape": list(pool.shape), "dtype": str(pool.dtype)}
    if pool.is_cuda:
        try:
            storage = pool.untyped_storage()
            (_, handle, size, offset, ref_handle, ref_offset, _, _) = storage._share_cuda_()
        except Exception as e:  # noqa: BLE001 - e.g. expandable segments: UCX it is
            logger.info("KV pool not shareable over CUDA IPC (%s): local peers use UCX", e)
            return {}
        uuid_ = str(torch.cuda.get_device_properties(pool.device).uuid)
        return info | {"kind": "cuda", "uuid": uuid_, "handle": handle, "size": size, "offset": offset,
                       "elem_offset": pool.storage_offset(), "stride": list(pool.stride()),
                       "ref_handle": ref_handle, "ref_offset": ref_offset}  # fmt: skip
    found = memfd_of(pool)
    if found is None:
        return {}
    fd, name = found
    st = os.fstat(fd)
    return info | {"kind": "memfd", "pid": os.getpid(), "fd": fd, "name": name, "ino": st.st_ino,
                   "dev": st.st_dev, "size": st.st_size}  # fmt: skip


def open_pool(info: dict[str, Any], local: torch.Tensor) -> torch.Tensor | None:
    """Map a peer's exported pool into this process (None: not possible here, use UCX).
    `local` is this rank's own pool: the peer's must be on the same kind of device."""
    if not info or info.get("boot_id") != boot_id():
        return None
    shape, dtype = tuple(info["shape"]), getattr(torch, str(info["dtype"]).removeprefix("torch."))
    try:
        if info["kind"] == "cuda" and local.is_cuda:
            return _open_cuda(info, shape, dtype)
        if info["kind"] == "memfd" and not local.is_cuda:
            return _open_memfd(info, shape, dtype)
    except Exception as e:  # noqa: BLE001 - e.g. another container's process: UCX it is
        logger.info("cannot map the peer's KV pool (%s: %s): using UCX", type(e).__name__, e)
    return None


def _open_cuda(info: dict[str, Any], shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor | None:
    index = next(
        (
            i
            for i in range(torch.cuda.device_count())
            if str(torch.cuda.get_device_properties(i).uuid) == info["uuid"]
        ),
        None,
    )
    if index is None:
        return None  # the decode's GPU is not visible to this process
    with torch.cuda.device(index):
        storage = torch.UntypedStorage._new_shared_cuda(
            index,
            info["handle"],
            info["size"],
            info["offset"],
            info["ref_handle"],
            info["ref_offset"],
            b"",
            False,
        )
    t = torch.empty(0, dtype=dtype, device=f"cuda:{index}")
    return t.set_(storage, info["elem_offset"], shape, tuple(info["stride"]))


def _open_memfd(info: dict[str, Any], shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor | None:
    path = f"/proc/{info['pid']}/fd/{info['fd']}"
    # NOTE: in another PID namespace this pid is another process: check it is the very memfd
    if os.readlink(path) != f"/memfd:{info['name']} (deleted)":
        return None
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if (st.st_ino, st.st_dev, st.st_size) != (info["ino"], info["dev"], info["size"]):
            return None
        buf = mmap.mmap(fd, st.st_size)
    finally:
        os.close(fd)  # the mapping keeps the memory
    return torch.frombuffer(buf, dtype=torch.uint8).view(dtype).view(shape)


def copy_pages(
    src_pool: torch.Tensor,
    src_pages: torch.Tensor,
    src_heads: tuple[int, int],
    dst_pool: torch.Tensor,
    dst_pages: torch.Tensor,
    dst_heads: tuple[int, int],
) -> None:
    """dst_pool[:, dst_pages, ..., dst_heads] = src_pool[:, src_pages, ..., src_heads].

    Pools are [layers, pages, 2, page_size, heads, head_dim]; head ranges are local indices.
    Whole-head pages move as rows of int64 (the copy kernels are several times faster on wide
    elements than on bf16), on CUDA in one pass (page_copy.py); otherwise, and for a head slice,
    through one gathered temporary.
    """
    n = len(src_pages)
    src = src_pool[:, :, :, :, src_heads[0] : src_heads[1]]
    dst = dst_pool[:, :, :, :, dst_heads[0] : dst_heads[1]]
    whole_src = src_heads[1] - src_heads[0] == src_pool.shape[4]
    whole_dst = dst_heads[1] - dst_heads[0] == dst_pool.shape[4]
    if whole_src and whole_dst:  # each page's layer row is contiguous: one pass on CUDA (page_copy.py)
        src_rows, dst_rows = wide_pages(src, True), wide_pages(dst, True)
        if page_copy.usable(src_rows, dst_rows):
            page_copy.copy_rows(src_rows, src_pages, dst_rows, dst_pages.to(dst.device, non_blocking=True))
            return
    tmp = torch.empty((src.shape[0], n, *src.shape[2:]), dtype=src.dtype, device=src.device)
    gather_pages(wide_pages(src, whole_src), src_pages, wide_pages(tmp, whole_src))
    if tmp.device != dst.device:
        tmp = tmp.to(dst.device, non_blocking=True)
    wide_pages(dst, whole_dst).index_copy_(
        1, dst_pages.to(dst.device, non_blocking=True), wide_pages(tmp, whole_dst)
    )
