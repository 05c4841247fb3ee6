"""CPU tensors in a memfd: memory another process of this host can map (transfer/direct.py does, to
copy KV pages straight into a decode server's pool). The memory goes away with the last process
that maps it: nothing is left behind in /dev/shm when a server is killed."""

from __future__ import annotations

import mmap
import os
import uuid

import torch

_memfds: dict[int, tuple[int, str]] = {}  # data_ptr of a shareable tensor -> (fd, memfd name)


def shareable_zeros(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A zeroed CPU tensor in a memfd (see `memfd_of`). Its pages are allocated on first touch, as
    with any anonymous memory. Falls back to torch.zeros where there is no memfd (not Linux)."""
    nbytes = torch.Size(shape).numel() * dtype.itemsize
    if not hasattr(os, "memfd_create") or nbytes == 0:
        return torch.zeros(shape, dtype=dtype)
    name = f"disagg-kv-{uuid.uuid4().hex[:12]}"
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    os.ftruncate(fd, nbytes)
    t = torch.frombuffer(mmap.mmap(fd, nbytes), dtype=torch.uint8).view(dtype).view(shape)
    _memfds[t.data_ptr()] = (fd, name)
    return t


def memfd_of(t: torch.Tensor) -> tuple[int, str] | None:
    """(fd, name) of the memfd holding `t` if shareable_zeros made it, else None."""
    return _memfds.get(t.data_ptr())
