"""Concurrency limit with a bounded FIFO queue (--max-concurrent-requests, --queue-size,
--queue-timeout-secs): a full queue answers 429, a request that waited too long answers 408."""

from __future__ import annotations

import asyncio
from collections import deque

from disagg.router import metrics


class Rejected(Exception):
    def __init__(self, status: int, reason: str, message: str):
        super().__init__(message)
        self.status = status
        self.reason = reason


class AdmissionGate:
    def __init__(self, max_concurrent: int, queue_size: int, queue_timeout_secs: float):
        self.max_concurrent = max_concurrent  # -1: unlimited
        self.queue_size = queue_size
        self.queue_timeout_secs = queue_timeout_secs
        self.active = 0
        self._waiters: deque[asyncio.Future] = deque()

    async def acquire(self) -> None:
        if self.max_concurrent < 0 or (self.active < self.max_concurrent and not self._waiters):
            self.active += 1
            return
        if len(self._waiters) >= self.queue_size:
            raise Rejected(429, "queue_full", "too many requests: the router's queue is full")
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        metrics.QUEUE_SIZE.set(len(self._waiters))
        try:
            # NOTE: on success the releasing request handed its slot over; `active` already counts us
            await asyncio.wait_for(asyncio.shield(waiter), self.queue_timeout_secs)
        except (TimeoutError, asyncio.CancelledError) as exc:
            if waiter.done() and not waiter.cancelled():  # the slot arrived as we gave up: pass it on
                self.release()
            else:
                waiter.cancel()
                self._waiters.remove(waiter)
            if isinstance(exc, asyncio.CancelledError):
                raise
            raise Rejected(408, "queue_timeout", "request timed out waiting in the router's queue") from None
        finally:
            metrics.QUEUE_SIZE.set(len(self._waiters))

    def release(self) -> None:
        if self.max_concurrent < 0:
            self.active -= 1
            return
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self.active -= 1

    @property
    def queued(self) -> int:
        return len(self._waiters)
