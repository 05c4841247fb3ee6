"""The decode server's scheduler: reserve pages, receive the prompt's KV, then decode as usual.

A request with a bootstrap room goes through
    prealloc   (waiting for free pages for its whole prompt)
    TRANSFERRING (pages reserved, the transfer engine told where they are; the prefill server
                  fills them chunk by chunk and sends the first token with the last piece)
    DECODING   (joins the running batch with num_computed_tokens = prompt length, output = [first
                token]: nothing is recomputed; stop and length checks apply from the first token)
Every room gets exactly one result from the transfer engine; pages of a failed or aborted room are
freed only then (a scatter may still write them before). A request without a room is served
like the colocated server would (prefill here too).
"""

from __future__ import annotations

import functools
import logging
import time
from collections import deque

from disagg.common.config import DisaggConfig, EngineConfig
from disagg.common.engine import request_stages
from disagg.common.engine.kv_pool import pages_for_tokens
from disagg.common.engine.request import Req, ReqStatus, SchedulerStats, TokenOut
from disagg.common.engine.scheduler import Scheduler
from disagg.common.parallel.dp_attention import create_pd_scheduler
from disagg.common.parallel.state import get_parallel
from disagg.decode.ranks import create_receiver
from disagg.transfer import TransferResult, metrics
from disagg.transfer.base import TRACE
from disagg.transfer.coordinator import DPRankTransfer, TransferCoordinator, transfer_error
from disagg.transfer.protocol import prompt_fingerprint

logger = logging.getLogger(__name__)


def create_decode_scheduler(config: EngineConfig, disagg: DisaggConfig):
    """The decode server's scheduler: a `DecodeScheduler`, or under DP attention one per DP rank
    inside a `DPAttentionScheduler` (each picks its DP rank's requests; that rank's ranks receive
    their pages: the prefill sends to those ranks' connections only)."""

    def make_transfer(runner) -> TransferCoordinator:
        return TransferCoordinator(create_receiver(disagg, runner), get_parallel().world_size)

    make = functools.partial(DecodeScheduler, config, disagg)
    return create_pd_scheduler(config, make, make_transfer, DPRankTransfer)


class DecodeScheduler(Scheduler):
    ROLE = "decode"

    def __init__(self, config: EngineConfig, disagg: DisaggConfig, runner=None, transfer=None):
        """`runner`, `transfer`: DP attention's (one DP rank's view and its DPRankTransfer)."""
        super().__init__(config, runner)
        self.transfer = transfer or TransferCoordinator(
            create_receiver(disagg, self.runner), get_parallel().world_size
        )
        self.prealloc: deque[Req] = deque()  # waiting for pages
        self.rooms: dict[int, Req] = {}  # TRANSFERRING (or aborted, pages pending) -> its request
        self.prefill_cached: dict[str, int] = {}  # rid -> prompt tokens the prefill side had cached
        # rid -> (room, time.monotonic() its transfer engine had the room) until its first token left
        self.kv_ready: dict[str, tuple[int, float]] = {}

    # ---- public interface -------------------------------------------------------------
    def abort_request(self, rid: str) -> None:
        for req in self.prealloc:
            if req.rid == rid:
                self.prealloc.remove(req)
                self._finish(req, "abort", ReqStatus.ABORTED, error="aborted")
                return
        for room, req in self.rooms.items():
            if req.rid == rid and not req.is_finished:
                self.transfer.abort(room)  # its result comes through poll; the pages are freed then
                self._finish(req, "abort", ReqStatus.ABORTED, error="aborted")
                return
        super().abort_request(rid)

    def has_work(self) -> bool:
        return super().has_work() or bool(self.prealloc or self.rooms)

    def stats(self) -> SchedulerStats:
        stats = super().stats()
        transferring = sum(not r.is_finished for r in self.rooms.values())
        stats.queues = dict(prealloc=len(self.prealloc), transfer=transferring, waiting=len(self.waiting),
                            running=len(self.running))  # fmt: skip
        stats.num_prealloc, stats.num_transferring = len(self.prealloc), transferring
        stats.num_open_rooms = len(self.transfer.open_rooms)
        stats.metrics_text += self.transfer.metrics_text()
        return stats

    # ---- role hooks -------------------------------------------------------------------
    @staticmethod
    def _is_pd(req: Req) -> bool:
        return not all(x is None for x in (req.bootstrap_host, req.bootstrap_port, req.bootstrap_room))

    def _free_pages(self, req: Req) -> None:
        # NOTE: a PD request's KV comes from the prefill, so the decode never looks its prefix
        # cache up for one: filling the cache would only hold pages (and look like a leak). Except
        # a shared prompt's helper (n > 1, shared_prompt.py): its whole pages go to the prefix
        # cache, where the n choices that follow it find them
        if not self._is_pd(req) or req.keep_prompt_cached:
            super()._free_pages(req)
            return
        self.pool.free(req.page_table)
        req.page_table, req.num_computed_tokens = [], 0

    def _check_role_request(self, req: Req) -> str | None:
        return self._check_room(req) if self._is_pd(req) else None

    def _enqueue(self, req: Req) -> None:
        # a request without a room is served like the colocated server would (prefill here too)
        if not self._is_pd(req):
            super()._enqueue(req)
            return
        request_stages.enter(req, "prealloc_queue", self.ROLE, req.arrival_time)
        self.prealloc.append(req)

    def _has_held_requests(self) -> bool:
        return bool(self.prealloc)  # retried: what frees pages is no transfer result

    def _admit_held_requests(self) -> None:
        self._preallocate()

    def _admits_early(self) -> bool:
        # a new room's pages are free pages no batch in flight reads, and asking the prefill for its
        # KV mid-step saves up to a decode step of its hand-off (the sweep's wait_request)
        return True

    def _takes_results_early(self) -> bool:
        # a room's request is in no batch until its result comes: taking it mid-step is safe, and
        # its first token then leaves while the step runs (common/engine/device_wait.py)
        return bool(self.rooms)

    # ---- stages -----------------------------------------------------------------------
    def _check_room(self, req: Req) -> str | None:
        if req.bootstrap_host is None or req.bootstrap_port is None or req.bootstrap_room is None:
            return "bootstrap_host, bootstrap_port and bootstrap_room must be given together"
        if req.bootstrap_room in self.rooms or any(
            r.bootstrap_room == req.bootstrap_room for r in self.prealloc
        ):
            return f"bootstrap_room {req.bootstrap_room} is already in use on this decode server"
        return None

    def _preallocate(self) -> None:
        """Reserve pages for whole prompts, oldest first, and tell the transfer engine where they are."""
        while self.prealloc:
            busy = len(self.running) + len(self.rooms)
            if busy >= self.config.max_running_requests:
                return
            req = self.prealloc[0]
            need = pages_for_tokens(len(req.input_ids), self.page_size)
            # a page of head-room for each running or arriving decode, as the colocated admission keeps
            pages = self._reserve_pages(need, headroom=busy)
            if pages is None:
                return
            self.prealloc.popleft()
            req.page_table = pages
            req.status = ReqStatus.TRANSFERRING
            request_stages.enter(req, "transfer_queue", self.ROLE)
            self.rooms[req.bootstrap_room] = req
            self.transfer.expect(req.bootstrap_room, req.bootstrap_host, req.bootstrap_port, req.page_table,
                                 fingerprint=prompt_fingerprint(req.input_ids))  # fmt: skip
            if TRACE:
                logger.info("room expected: room=%d t=%.6f", req.bootstrap_room, time.monotonic())

    def _on_transfer_done(self, result: TransferResult) -> None:
        req = self.rooms.pop(result.room, None)
        if req is None:
            return
        if req.is_finished or not result.ok:
            self.pool.free(req.page_table)
            req.page_table = []
            if not req.is_finished:
                logger.warning("request %s: KV transfer failed: %s", req.rid, result.reason)
                self._finish(req, "abort", ReqStatus.ABORTED, error=transfer_error(result))
            return
        request_stages.leave(req, "transfer_queue", self.ROLE)
        self.kv_ready[req.rid] = (result.room, result.ready_at or time.monotonic())
        self._start_decoding(req, result.metadata)

    def _start_decoding(self, req: Req, meta: dict) -> None:
        """The prompt's KV is in place: join the running batch with the prefill's first token."""
        token = int(meta["first_token"])
        req.num_computed_tokens = len(req.input_ids)
        req.output_ids = [token]
        req.status = ReqStatus.DECODING
        req.first_token_time = time.monotonic()
        self.prefill_cached[req.rid] = int(meta.get("cached_tokens") or 0)
        self.running.append(req)
        # the prefill computed the prompt's logprobs (echo + logprobs): _emit_token sends them with this token
        req.prompt_logprobs = list(meta.get("prompt_logprobs") or [])
        # NOTE: the prefill sends logprobs only when the request asked for them
        self._emit_token(req, token, meta.get("logprob"), meta.get("top_logprobs"))

    def _on_outputs_leaving(self, outs: list[TokenOut]) -> None:
        """Time each first token from its room's result in the transfer engine to now."""
        if not self.kv_ready:
            return
        now = time.monotonic()
        for out in outs:
            ready = self.kv_ready.pop(out.rid, None)
            if ready is not None:
                metrics.observe_step("decode", "first_token", now - ready[1])
                if TRACE:  # per-room times for python -m disagg.common.bench.first_token
                    logger.info("first token out: room=%d kv_ready=%.6f out=%.6f", ready[0], ready[1], now)

    def _fill_usage(self, out: TokenOut, req: Req) -> None:
        super()._fill_usage(out, req)
        if req.rid in self.prefill_cached:
            out.cached_tokens = self.prefill_cached[req.rid]
            if out.finished:
                del self.prefill_cached[req.rid]
