"""Waiting for a step without going deaf to finished KV transfers.

While a step runs, the scheduler thread only waits: for the step's CUDA event on a GPU, for the
forward itself on the CPU. A PD decode whose room finished meanwhile could send that request's
first token (the prefill's, carried with the KV) at once, yet heard of the room only at the step
boundary: half a decode step on average, a whole one when the room was asked for in that step.
So the scheduler waits here, watching the transfer engine's wake fd beside the step (and the
scheduler loop's request socket where the role admits requests mid-step: a PD decode reserves a
new request's pages and asks the prefill for its KV at once, not at the step's end):

- CUDA: the step's event is polled every POLL_S while the wake fd is watched (cudaEventQuery is
  cheap; a blocking synchronize could not be interrupted);
- CPU: the forward runs on `ForwardThread` (what the stream is to a CUDA step: torch's CPU ops
  release the GIL), and its end makes `done_fd` readable, so the wait needs no polling.
"""

from __future__ import annotations

import functools
import math
import os
import select
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

# NOTE: the step's end is seen up to this late while transfers are watched on a GPU (1-2% of a
# 5-8 ms decode step, and only while rooms are in flight)
POLL_S = 0.0001


class ForwardThread:
    """CPU: one worker thread running forwards in order; `done_fd` turns readable as each ends."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="disagg-forward")
        self.done_fd, self._write_fd = os.pipe()
        os.set_blocking(self.done_fd, False)

    def submit(self, fn: Callable[[], Any]) -> Future:
        future = self._pool.submit(fn)
        future.add_done_callback(lambda _: os.write(self._write_fd, b"\0"))
        return future


def drain(fd: int) -> None:
    try:
        while os.read(fd, 4096):
            pass
    except BlockingIOError:
        pass


def wait_watching(
    done: Callable[[], bool], done_fd: int | None, watchers: dict[int, Callable[[], None]]
) -> None:
    """Block until `done()`; whenever one of `watchers`' fds turns readable meanwhile, its callback
    (which must drain it). `done_fd`: readable once done() may have turned true (None: poll done()
    every POLL_S)."""
    fds = list(watchers) if done_fd is None else [*watchers, done_fd]
    timeout = POLL_S if done_fd is None else None
    while not done():
        ready, _, _ = select.select(fds, [], [], timeout)
        for fd in ready:
            if fd in watchers:
                watchers[fd]()
        if done_fd is not None and done_fd in ready:
            drain(done_fd)


def host_tensor(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A host tensor of `values` bound for `device`: pinned when that is a GPU, so a copy of it
    (ours, or a kernel planner's such as FlashInfer's `plan`) never waits for the step in flight
    (host_to_device's NOTE). Built through numpy: torch.tensor walks a Python list ~3.5x slower
    (a 2048-token prefill's ids, positions, pages and offsets: ~330 against ~90 us on the CPU)."""
    pin = device.type == "cuda"
    if dtype not in _NUMPY_DTYPES:  # bfloat16 (a logit bias in the logits' dtype): numpy has none
        return torch.tensor(values, dtype=dtype, pin_memory=pin)
    t = torch.from_numpy(np.asarray(values, dtype=_NUMPY_DTYPES[dtype]))
    return t.pin_memory() if pin else t


_NUMPY_DTYPES = {
    torch.int64: np.int64,
    torch.int32: np.int32,
    torch.bool: np.bool_,
    torch.float32: np.float32,
    torch.float64: np.float64,
    torch.uint8: np.uint8,
    torch.int8: np.int8,
}


def rows_to_device(rows: list[list], dtype: torch.dtype, device: torch.device) -> list[torch.Tensor]:
    """Host lists of one length as device tensors (views of one [len(rows), n] tensor): one numpy
    build, one pinned block and one copy for all of them, where to_device per list costs each its own
    (a prefill's per-token ids, positions, pages and offsets)."""
    return list(to_device(rows, dtype, device).unbind(0))


def to_device(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A host list as a device tensor without a stream sync: built pinned (host_tensor), then one
    async copy (not built pageable and copied into pinned memory by host_to_device: one host copy
    fewer). NOTE: torch.tensor(values, device=cuda) copies with a stream synchronize, which waits
    for every queued kernel (the overlap scheduler's step in flight)."""
    return host_tensor(values, dtype, device).to(device, non_blocking=True)


def host_to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device`, queued on the current stream without the host waiting for it.

    NOTE: through pinned memory. From pageable memory CUDA "may synchronize with the stream" before
    staging the bytes (the runtime's API sync notes), i.e. wait for the step in flight, which the
    overlap schedule and the decode's mid-step first tokens must never do. (The H200 stall of
    test_gpu_first_token that led here had another cause: docs/pd.md, "First tokens mid-step".)
    The pinned block returns to torch's host cache once the copy ran (the copy records its stream)."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def log_stream_syncs(logger) -> None:
    """DISAGG_TRANSFER_TRACE on CUDA: each operation that makes the host wait for the stream (torch's
    sync debug mode) is logged with its Python stack (a step's launch must never wait)."""
    import traceback
    import warnings

    torch.cuda.set_sync_debug_mode("warn")
    shown = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" not in str(message):
            return shown(message, category, filename, lineno, file, line)
        stack = "".join(traceback.format_stack(limit=14)[:-1])
        logger.info("stream sync at %.6f: %s\n%s", time.monotonic(), message, stack)

    warnings.showwarning = show
    warnings.filterwarnings("always", message=".*synchroniz.*")


def slow_device(seconds: float, device: torch.device) -> None:
    """DISAGG_STEP_DELAY_S (tests only): the step takes `seconds` longer on the device. On CUDA a
    sleep kernel is queued on the current stream (the host goes on, as with a real slow step);
    on the CPU the forward's own thread sleeps."""
    if device.type == "cuda":
        # NOTE: in pieces of <= 50 ms: another process's kernels on the same GPU (a PD prefill's KV
        # copy into our pool) may only get the GPU between two of ours; one 4 s kernel would hold
        # them back to the step's end, which a real step of many short kernels never does
        pieces = max(1, math.ceil(seconds / 0.05))
        cycles = int(seconds / pieces * _cycles_per_second(device.index or 0))
        for _ in range(pieces):
            torch.cuda._sleep(cycles)
    else:
        time.sleep(seconds)


@functools.cache
def _cycles_per_second(index: int) -> float:
    # NOTE: timed after a first sleep (module load, clocks ramping up), over ~50 ms: a single 5 ms
    # sleep timed cold read ~3x too few cycles per second (a 4 s delay slept 1.2 s on an H200)
    with torch.cuda.device(index):
        torch.cuda._sleep(10_000_000)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        cycles = 100_000_000
        start.record()
        torch.cuda._sleep(cycles)
        end.record()
        end.synchronize()
        return cycles / (start.elapsed_time(end) / 1e3)
