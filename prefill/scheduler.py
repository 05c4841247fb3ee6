"""The prefill server's scheduler: prefill only, KV pages handed to the transfer engine chunk by chunk.

A request with a bootstrap room goes through
    [bootstrap] (only under pressure: waiting until the decode server has said where its pages are)
    waiting -> running (PREFILLING: chunked, batched with others, prefix cache on)
    TRANSFERRING (last chunk sent with the first token; pages held until the decode side acked)
and finishes with a short completion record (its first token) once the transfer engine reports
the room. Every room gets exactly one result from the transfer engine; the request's pages are
freed only then (a gather may still read them before). A request without a room (a health check)
is prefilled and answered with its first token, nothing sent.
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
from disagg.prefill.ranks import create_sender
from disagg.transfer import TransferResult
from disagg.transfer.coordinator import DPRankTransfer, TransferCoordinator, transfer_error
from disagg.transfer.protocol import prompt_fingerprint

logger = logging.getLogger(__name__)


def create_prefill_scheduler(config: EngineConfig, disagg: DisaggConfig):
    """The prefill server's scheduler: a `PrefillScheduler`, or under DP attention one per DP rank
    inside a `DPAttentionScheduler` (room r is prefilled on DP rank r % D, whose ranks send its
    pages; they register with the bootstrap as that DP rank's, where the decode asks for them)."""

    def make_transfer(runner) -> TransferCoordinator:
        return TransferCoordinator(create_sender(disagg, runner, config), get_parallel().world_size)

    make = functools.partial(PrefillScheduler, config, disagg)
    return create_pd_scheduler(config, make, make_transfer, DPRankTransfer, by_room=True)


class PrefillScheduler(Scheduler):
    ROLE = "prefill"

    def __init__(self, config: EngineConfig, disagg: DisaggConfig, runner=None, transfer=None):
        """`runner`, `transfer`: DP attention's (one DP rank's view and its DPRankTransfer)."""
        super().__init__(config, runner)
        self.bootstrap_timeout = 2 * disagg.transfer_timeout + 5.0  # see _start_bootstrapped
        self.transfer = transfer or TransferCoordinator(
            create_sender(disagg, self.runner, config), get_parallel().world_size
        )
        self.bootstrap: deque[Req] = deque()  # held back until the decode side asks (see _may_start_now)
        self.rooms: dict[int, Req] = {}  # every room given to the transfer engine -> its request
        self.sent_pages: dict[int, int] = {}  # room -> pages handed to the transfer engine so far
        self.first_outs: dict[int, TokenOut] = {}  # room -> its first token, sent with the completion

    # ---- public interface -------------------------------------------------------------
    def abort_request(self, rid: str) -> None:
        req = next((r for r in self.rooms.values() if r.rid == rid), None)
        if req is None:
            super().abort_request(rid)
            return
        if req.is_finished:
            return
        self._fail_request(req, "aborted")

    def _fail_request(self, req: Req, error: str) -> None:
        """End a request with `error`; a PD one's room is aborted (its result comes through poll, and
        its pages are freed then)."""
        if req.bootstrap_room not in self.rooms:
            super()._fail_request(req, error)
            return
        self._drop(req)
        self.transfer.abort(req.bootstrap_room)
        self._finish(req, "abort", ReqStatus.ABORTED, error=error)

    def has_work(self) -> bool:
        return super().has_work() or bool(self.rooms)

    def stats(self) -> SchedulerStats:
        stats = super().stats()
        transferring = sum(r.status == ReqStatus.TRANSFERRING for r in self.rooms.values())
        stats.queues = dict(bootstrap=len(self.bootstrap), waiting=len(self.waiting), running=len(self.running),
                            transfer=transferring)  # fmt: skip
        stats.num_transferring, stats.num_open_rooms = transferring, len(self.transfer.open_rooms)
        stats.metrics_text += self.transfer.metrics_text()
        return stats

    # ---- role hooks -------------------------------------------------------------------
    def _check_role_request(self, req: Req) -> str | None:
        if req.bootstrap_room is not None and req.bootstrap_room in self.rooms:
            return f"bootstrap_room {req.bootstrap_room} is already in use on this prefill server"
        return None

    def _enqueue(self, req: Req) -> None:
        if req.bootstrap_room is None:  # not a PD request (a health check): prefill and answer
            super()._enqueue(req)
            return
        request_stages.enter(req, "bootstrap_queue", self.ROLE, req.arrival_time)
        room = req.bootstrap_room
        self.rooms[room] = req
        # NOTE: an empty first chunk opens the room in the transfer engine now: its timeout covers a
        # decode side that never asks for it, and an abort before any page reaches the decode side
        self.transfer.send(room, [], 0, False, fingerprint=prompt_fingerprint(req.input_ids))
        if self._may_start_now(req):
            request_stages.enter(req, "wait_queue", self.ROLE)
            self.waiting.append(req)
        else:
            self.bootstrap.append(req)

    def _has_held_requests(self) -> bool:
        return bool(self.bootstrap)  # retried: a decode's ask is no transfer result

    def _admit_held_requests(self) -> None:
        self._start_bootstrapped()

    def _pages_at_admission(self, req: Req, num_cached: int, n: int) -> int:
        # NOTE: a PD request gets pages for its whole prompt at admission: pages already handed to
        # the transfer engine must never be retracted to make room for a later chunk
        return len(req.input_ids) if req.bootstrap_room is not None else num_cached + n

    def _on_chunk_computed(self, req: Req) -> None:
        if req.bootstrap_room is not None:
            # the KV of this chunk travels while the next one computes; the last chunk's while its
            # first token is sampled (the token follows alone, with the room's done)
            self._send_pages(req)

    def _on_token_sampled(self, req: Req, token: int, lp: float | None, top: list[list] | None) -> None:
        """The prompt is computed: hand the request to the decode side (or answer a health check)."""
        self.sampler.forget(req.rid)
        request_stages.enter(req, "transfer_queue" if req.bootstrap_room is not None else None, self.ROLE)
        out = self._token_out(req, token, lp, top)
        if req.bootstrap_room is None:  # nothing to hand over: the first token is the answer
            self._release(req)
            req.finish_reason, req.status = "length", ReqStatus.FINISHED
            out.finished, out.finish_reason = True, "length"
            self._fill_usage(out, req)
            self._pending_outs.append(out)
            return
        meta = {
            "first_token": token,
            "logprob": lp,
            "top_logprobs": top,
            "cached_tokens": req.num_cached_tokens,
        }
        if req.sampling.prompt_logprobs:  # echo + logprobs: the decode side answers them (only if asked)
            meta["prompt_logprobs"] = req.prompt_logprobs
        self._send_pages(req, metadata=meta)
        self.running.remove(req)  # keeps its pages until the transfer is acknowledged
        req.status = ReqStatus.TRANSFERRING
        # NOTE: answered only with the completion record: streaming the token now would put a
        # detokenizer/HTTP/router pass on the CPUs the transfer needs, for nobody
        self.first_outs[req.bootstrap_room] = out

    # ---- stages -----------------------------------------------------------------------
    def _may_start_now(self, req: Req) -> bool:
        """Prefill at once, before the decode side asked for the room (its chunks wait in the
        transfer engine until it does), unless that would let rooms fill the pool.

        NOTE: the decode's ask costs a round trip (its pre-allocation, then the room request) that
        would otherwise sit on the critical path of every request. Rooms started early hold pages
        the decode side may take long to ask for (its pool full); so only while every open room
        together needs at most half of this pool, and no older request waits in bootstrap (FIFO).
        A room never asked for times out in the transfer engine, which frees its pages.
        """
        if self.bootstrap:
            return False
        committed = sum(pages_for_tokens(len(r.input_ids), self.page_size) for r in self.rooms.values())
        return committed <= self.pool.num_pages // 2

    def _start_bootstrapped(self) -> None:
        """Rooms the decode side asked for (its pages are reserved) may be prefilled now."""
        if not self.bootstrap:
            return
        asked = self.transfer.requested_rooms([r.bootstrap_room for r in self.bootstrap])
        for req in [r for r in self.bootstrap if r.bootstrap_room in asked]:
            self.bootstrap.remove(req)
            request_stages.enter(req, "wait_queue", self.ROLE)
            self.waiting.append(req)
        # NOTE: the transfer engine's timeout normally fails a room nobody asks for; a room the
        # decode side asked for (and that timed out) long before this request arrived is not
        # reported again, so a last deadline of our own ends such a request
        now = time.monotonic()
        for req in [r for r in self.bootstrap if now - r.arrival_time > self.bootstrap_timeout]:
            self.bootstrap.remove(req)
            del self.rooms[req.bootstrap_room]
            self.transfer.forget(req.bootstrap_room)
            error = f"timeout: the decode server did not ask for room {req.bootstrap_room}"
            self._finish(req, "abort", ReqStatus.ABORTED, error=f"KV transfer failed: {error}")

    def _send_pages(self, req: Req, metadata: dict | None = None) -> None:
        """Hand the pages computed since the last call to the transfer engine (all of them with
        the metadata of the last chunk)."""
        room, last = req.bootstrap_room, metadata is not None
        sent = self.sent_pages.get(room, 0)
        whole = last or req.num_computed_tokens >= len(req.input_ids)  # the prompt's every page is final
        upto = len(req.page_table) if whole else req.num_computed_tokens // self.page_size
        if upto > sent or last:
            self.transfer.send(room, req.page_table[sent:upto], sent, last, metadata)
            self.sent_pages[room] = upto

    def _on_transfer_done(self, result: TransferResult) -> None:
        req = self.rooms.pop(result.room, None)
        self.sent_pages.pop(result.room, None)
        if req is not None and result.ok:
            request_stages.leave(req, "transfer_queue", self.ROLE)
        if result.room in self.transfer.open_rooms:
            # NOTE: the room failed while its last chunk went out at launch, and its first token's
            # send (sampled before this result was handled) opened it again: nothing will ever
            # report it (the engine ended it), so stop tracking it or it leaks
            self.transfer.forget(result.room)
        out = self.first_outs.pop(result.room, None)
        if req is None:
            return
        if not req.is_finished:
            self._drop(req)
        if req.page_table:
            self._free_pages(req)
        if req.is_finished:
            return  # aborted here earlier: the client has its answer
        if result.ok:
            req.finish_reason, req.status = "length", ReqStatus.FINISHED
            out = out or TokenOut(req.rid, [])
            out.finished, out.finish_reason = True, "length"
            self._fill_usage(out, req)
            self._pending_outs.append(out)
        else:
            logger.warning("request %s: KV transfer failed: %s", req.rid, result.reason)
            self._finish(req, "abort", ReqStatus.ABORTED, error=transfer_error(result))

    def _drop(self, req: Req) -> None:
        """Take a PD request out of whichever queue holds it (its pages stay with it)."""
        for queue in (self.bootstrap, self.waiting, self.running):
            if req in queue:
                queue.remove(req)
