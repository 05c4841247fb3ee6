"""The scheduler: continuous batching with chunked prefill over the paged KV pool.

Each `step()` builds one flattened batch: one token for every decoding request, plus prompt
chunks of prefilling requests and newly admitted ones within the prefill budget
(--chunked-prefill-size). Admission is by free pages; when a decode needs a page and none is
left (after evicting the prefix cache), the newest request is retracted (its pages freed, its
tokens kept) and recomputed later.

This one step loop and one page-reservation rule (`_reserve_pages`) serve all three roles. The
prefill and decode schedulers (prefill/scheduler.py, decode/scheduler.py) subclass it and differ
only in their hooks: `_admit_held_requests` (requests held back before `waiting`: the decode's
pre-allocation, the prefill's bootstrap queue), `_pages_at_admission`, `_on_chunk_computed` (the
prefill ships each chunk's pages), `_on_token_sampled` (the prefill hands the request over instead
of decoding it) and `_on_transfer_done` (a room's result from their `transfer` coordinator).

The overlap schedule (SGLang's; default with CUDA, --disable-overlap-schedule turns it off,
--enable-overlap-schedule turns it on for the CPU): `step()` launches step n+1's forward and
sampling before it reads step n's tokens, so the host's work (step n's tokens appended, stop
checks, outputs, pages freed; then step n+2 scheduled and planned) runs while the device computes. A request
whose token of step n is still on the device decodes at step n+1 from that device tensor
(`ModelRunner.forward`'s `pending`/`future`). Hazards, each with its rule:
- one step of lag: step n's outputs leave with step() n+1; a request that ends at step n (stop
  token, stop string, abort) has run step n+1 too, whose token is dropped;
- its pages are freed only once step n+1 completed (`_Launched.release_after`): no page is reused
  while a queued kernel may still write it;
- a request sure to end by length at step n is not scheduled at step n+1;
- whatever needs step n's tokens on the host first waits for them (`_needs_host_tokens`,
  `_RetractionNeeded`): grammars (the matcher advances through output_ids on the host), a
  retraction (it would free pages in flight). Penalties count the pending token on the device.
  Prompt logprobs are read at launch (a sync in that step only).
Roles that act on computed chunks or on the sampled token (the prefill ships pages and hands the
request over) and tp/pp > 1 (only rank 0 holds the sampled tokens) never overlap.
"""

from __future__ import annotations

import faulthandler
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from disagg.common.config import EngineConfig, step_delay_s, transfer_trace
from disagg.common.engine import request_stages
from disagg.common.engine.device_wait import (
    ForwardThread,
    log_stream_syncs,
    slow_device,
    to_device,
    wait_watching,
)
from disagg.common.engine.kv_pool import pages_for_tokens
from disagg.common.engine.model_runner import ModelRunner
from disagg.common.engine.radix_cache import RadixCache
from disagg.common.engine.request import (
    NUMERICAL_ERROR,
    Req,
    ReqStatus,
    SchedulerStats,
    TokenOut,
    prompt_logprob_rows,
)
from disagg.common.engine.sampling import DeviceSample, Sampler

logger = logging.getLogger(__name__)
# DISAGG_TRANSFER_TRACE=1: when transfer results are taken and how each step's wait went (info logs)
TRACE = transfer_trace()
# a request whose logits held NaN or +inf (a numerical fault of the model: overflow, broken weights) ends
# with this error instead of emitting noise; SGLang's --enable-nan-detection only logs and masks them
NOT_FINITE = f"{NUMERICAL_ERROR}: the model's next-token logits for this request are not finite (NaN or inf)"


@dataclass(eq=False)
class _Launched:
    """A step whose forward and sampling are queued on the device; its tokens not yet read."""

    scheduled: list[tuple[Req, int]]
    rows: dict[Req, int]  # the requests it samples a token for -> their row in `tokens`
    tokens: torch.Tensor | None = None  # [len(rows)] int64, device: the next step's future input ids
    host: DeviceSample | None = None  # the draws' copy to the host, valid once `event` completed
    event: object | None = None  # torch.cuda.Event recorded after the copy (None on the CPU)
    # requests that ended (or were aborted) while this step ran: their pages are freed once it completed
    release_after: list[Req] = field(default_factory=list)


class _RetractionNeeded(Exception):
    """Scheduling would retract a request while a step is in flight (its pages may still be written)."""


class Scheduler:
    ROLE = "server"  # the role label of its series in /metrics (the PD roles: "prefill", "decode")

    def __init__(self, config: EngineConfig, runner: ModelRunner | None = None):
        self.config = config
        self.runner = runner or ModelRunner(config)
        self.pool = self.runner.pool
        self.page_size = self.pool.page_size
        self.cache = RadixCache(self.pool, disabled=config.disable_radix_cache)
        self.sampler = Sampler(self.runner.device, config.random_seed, self.runner.tokenizer)
        self.tokenizer = self.runner.tokenizer
        self.context_length = self.runner.context_length
        self.eos_token_ids = _eos_ids(self.runner.hf_config, self.runner.model_path, self.tokenizer)
        self.waiting: deque[Req] = deque()
        self.running: list[Req] = []
        self._pending_outs: list[TokenOut] = []
        self.num_retractions = 0
        # PD roles: their transfer.coordinator.TransferCoordinator (flushed once per step)
        self.transfer = None
        self.overlap = self._may_overlap()
        logger.info("overlap schedule: %s", "on" if self.overlap else "off")
        if TRACE and self.runner.device.type == "cuda":
            log_stream_syncs(logger)
        self._inflight: _Launched | None = None  # overlap: the step on the device whose tokens are unread
        # the scheduler loop's: sends outputs to the client path at once (set_early_output_sink)
        self._early_sink: Callable[[list[TokenOut]], None] | None = None
        self._early_input: tuple[int, Callable[[], None]] | None = None  # set_early_input
        self._forward_thread: ForwardThread | None = None  # CPU: made when first needed
        self.step_delay_s = step_delay_s()  # tests only (DISAGG_STEP_DELAY_S): a slow device
        self._posted_results: list = []  # transfer results flush() gave while posting a step's operations early

    # ---- public interface -------------------------------------------------------------
    @property
    def num_free_pages(self) -> int:
        return self.pool.num_free_pages

    @property
    def num_total_pages(self) -> int:
        return self.pool.num_pages

    def add_request(self, req: Req) -> None:
        error = self._check_request(req) or self._check_role_request(req)
        if error:
            self._pending_outs.append(self._abort_out(req, error))
            return
        req.arrival_time = req.arrival_time or time.monotonic()
        if req.sent_at:
            if req.received_at:
                request_stages.observe(self.ROLE, "tokenize", req.sent_at - req.received_at)
            request_stages.observe(self.ROLE, "receive", req.arrival_time - req.sent_at)
        self._enqueue(req)

    def abort_request(self, rid: str) -> None:
        for req in list(self.waiting):
            if req.rid == rid:
                self.waiting.remove(req)
                self._finish(req, "abort", status=ReqStatus.ABORTED)
                return
        for req in self.running:
            if req.rid == rid:
                self._release(req)
                self._finish(req, "abort", status=ReqStatus.ABORTED)
                return

    def has_work(self) -> bool:
        return self.has_compute()  # the PD roles add their rooms and held requests

    def stats(self) -> SchedulerStats:
        total, free, cached = self.pool.num_pages, self.pool.num_free_pages, self.cache.num_cached_pages
        return SchedulerStats(
            num_running=len(self.running),
            num_waiting=len(self.waiting),
            num_total_pages=total,
            num_free_pages=free,
            num_used_pages=total - free,
            num_request_pages=total - free - cached,
            num_cached_pages=cached,
            kv_usage=(total - free) / total,
            cache_hit_rate=self.cache.hit_rate,
            num_retractions=self.num_retractions,
            expert_tokens=self.runner.eplb.expert_tokens() if self.runner.eplb else {},  # MoE, for /metrics
            metrics_text=request_stages.metrics_text(),
        )

    def set_early_output_sink(self, sink: Callable[[list[TokenOut]], None]) -> None:
        """The scheduler loop's way to send outputs at once. With it, while a step runs, the
        results of finished transfers are taken (where the role allows: `_takes_results_early`)
        and the outputs they make (a PD decode's first tokens) leave before the step ends."""
        self._early_sink = sink

    def set_early_input(self, fd: int, take: Callable[[], None]) -> None:
        """The scheduler loop's request socket (`fd` turns readable when messages came) and `take`,
        which adds the new requests among them at once: while a step runs, where the role admits
        requests mid-step (`_admits_early`), they are taken and admitted without waiting for the
        step's end."""
        self._early_input = (fd, take)

    def step(self) -> list[TokenOut]:
        if self.overlap:
            return self._step_overlapped()
        scheduled = self.schedule_batch()
        if scheduled:
            self.process_batch_result(scheduled, self._forward(scheduled))
        return self.finish_step()

    def _step_overlapped(self) -> list[TokenOut]:
        """Launch step n+1, then read step n's tokens while it runs (one step of lag)."""
        if self._inflight is not None and self._needs_host_tokens(self._inflight):
            self._complete_inflight()
        try:
            scheduled = self.schedule_batch()
        except _RetractionNeeded:
            self._complete_inflight()
            scheduled = self.schedule_batch()
        prev, launched = self._inflight, None
        if scheduled:
            t0 = time.monotonic()
            if TRACE:  # where a launch that waits for the device hangs: every thread's stack after 1 s
                faulthandler.dump_traceback_later(1.0)
            pending = prev.rows if prev is not None else {}
            logits = self._forward(scheduled, pending, prev.tokens if pending else None)
            t1 = time.monotonic()
            launched = self._launch(scheduled, logits, pending, prev.tokens if pending else None)
            if TRACE:  # the launch must not wait for the step in flight (docs/pd.md, "First tokens mid-step")
                faulthandler.cancel_dump_traceback_later()
                logger.info("step launched %.6f-%.6f (forward queued at %.6f)", t0, time.monotonic(), t1)
        # NOTE: set before step n is read: a request it ends that step n+1 still computes keeps its pages
        self._inflight = launched
        if prev is not None:
            self._complete(prev)
        if not (self.running or self.waiting):
            self._complete_inflight()  # only ended requests' extra tokens left in it: free their pages now
        return self.finish_step()

    def _needs_host_tokens(self, step: _Launched) -> bool:
        """Whether the next step needs `step`'s tokens on the host before it is scheduled: a
        grammar's mask comes from its matcher, advanced through the output ids on the host, so a
        step after one that sampled a grammar request never overlaps."""
        return any(r.sampling.grammar for r in step.rows)

    def _complete_inflight(self) -> None:
        step, self._inflight = self._inflight, None
        if step is not None:
            self._complete(step)

    def _may_overlap(self) -> bool:
        c = self.config
        if c.disable_overlap_schedule or not (self.runner.device.type == "cuda" or c.enable_overlap_schedule):
            return False
        # only rank 0 samples: the other ranks never hold the tokens a future input id refers to
        if c.world_size > 1:
            return False
        # a role acting on computed chunks or on the sampled token (the prefill ships each chunk's
        # pages and hands the request over at its first token) needs each step complete first
        cls = type(self)
        return (
            cls._on_chunk_computed is Scheduler._on_chunk_computed
            and cls._on_token_sampled is Scheduler._on_token_sampled
        )

    # the three parts of a step (DP attention runs several schedulers' batches in one forward)
    def schedule_batch(self) -> list[tuple[Req, int]]:
        """This step's batch: (request, new tokens) pairs, their pages reserved."""
        self._admit_held_requests()
        return self._schedule()

    def finish_step(self) -> list[TokenOut]:
        """After the forward: the finished transfers (PD roles), then this step's outputs."""
        if self.transfer is not None:
            results, self._posted_results = self._posted_results + self.transfer.flush(), []
            if TRACE and results:
                logger.info("transfer results at the step's end: rooms=%s t=%.6f", [r.room for r in results],
                            time.monotonic())  # fmt: skip
            for result in results:
                self._on_transfer_done(result)
        return self._take_outputs()

    def _take_outputs(self) -> list[TokenOut]:
        """The outputs made so far, leaving the scheduler now (the loop sends them at once)."""
        outs, self._pending_outs = self._pending_outs, []
        self._on_outputs_leaving(outs)
        return outs

    def has_compute(self) -> bool:
        return bool(self.waiting or self.running or self._pending_outs or self._inflight)

    def wait_timeout_ms(self) -> int:
        """How long the scheduler loop may block on its sockets before the next step while
        has_work(): not at all while there is something to compute; with only transfers in
        flight, as long as the transfer coordinator says (held requests are retried)."""
        if self.has_compute() or self.transfer is None:
            return 0
        return self.transfer.idle_wait_ms(retrying=self._has_held_requests())

    @property
    def wake_fd(self) -> int | None:
        """An fd that turns readable when a transfer finished (the loop blocks on it too)."""
        return None if self.transfer is None else self.transfer.wake_fd

    def on_wake(self) -> None:
        if self.transfer is not None:
            self.transfer.on_wake()

    def pd_identity(self) -> dict | None:
        """PD roles: the KV layout identity a peer must match (the router pairs on it); else None."""
        return None if self.transfer is None else self.transfer.layout.identity()

    def flush_cache(self) -> bool:
        """Empty the prefix cache (SGLang's /flush_cache); only when no request holds pages."""
        if self.has_work():
            return False
        self.cache.reset()
        return True

    # ---- role hooks (the colocated server: none of them does anything) -----------------
    def _check_role_request(self, req: Req) -> str | None:
        """Why the role refuses `req` (e.g. a bootstrap room already in use), or None."""
        return None

    def _enqueue(self, req: Req) -> None:
        """Queue an accepted request (the PD roles hold theirs in their own queue first)."""
        request_stages.enter(req, "wait_queue", self.ROLE, req.arrival_time)
        self.waiting.append(req)

    def _admit_held_requests(self) -> None:
        """Move requests held back in a role's own queue into `waiting` or `running`."""

    def _has_held_requests(self) -> bool:
        return False

    def _pages_at_admission(self, req: Req, num_cached: int, n: int) -> int:
        """Tokens of `req` to have pages for when it is admitted with `n` new tokens after
        `num_cached` cached ones (default: the first chunk; later chunks get theirs as they run)."""
        return num_cached + n

    def _on_chunk_computed(self, req: Req) -> None:
        """A chunk of `req`'s prompt was computed (queued on the device), the last one included."""

    def _on_token_sampled(self, req: Req, token: int, lp: float | None, top: list[list] | None) -> None:
        """`token` was sampled for `req` and appended to its output: decode on."""
        request_stages.leave(req, "forward", self.ROLE)
        req.status = ReqStatus.DECODING
        self._emit_token(req, token, lp, top)

    def _on_transfer_done(self, result) -> None:
        raise NotImplementedError("only the PD roles have transfers")

    def _on_outputs_leaving(self, outs: list[TokenOut]) -> None:
        """`outs` leave the scheduler for the client now (the decode times its first tokens)."""

    def _takes_results_early(self) -> bool:
        """Whether transfer results may be handled while a step runs: only where they touch no
        request of a batch in flight (the decode's rooms: requests not yet running) and some are due."""
        return False

    def _admits_early(self) -> bool:
        """Whether new requests may be admitted while a step runs (`_admit_held_requests` then): only
        where admitting touches no batch in flight (the decode's page reservations for rooms)."""
        return False

    # ---- waiting for the device ---------------------------------------------------------
    def _forward(self, scheduled: list[tuple[Req, int]], pending=None, future=None):
        """The batch's logits (ModelRunner.forward). On the CPU, while transfers are watched, the
        forward runs on the forward thread and this one waits watching them (device_wait.py)."""

        def run():
            logits = self.runner.forward(scheduled, pending, future)
            if self.step_delay_s:
                slow_device(self.step_delay_s, self.runner.device)  # tests only
            return logits

        if self.runner.device.type == "cuda" or not self._watches_transfers():
            return run()
        if self._forward_thread is None:
            self._forward_thread = ForwardThread()
        running = self._forward_thread.submit(run)
        self._wait_watching(running.done, self._forward_thread.done_fd)
        return running.result()

    def _watches_transfers(self) -> bool:
        """Whether this step's wait for the device also takes transfer results or new requests (tp 1:
        the waker)."""
        if self._early_sink is None or self.wake_fd is None:
            return False
        return self._takes_results_early() or self._takes_requests_early()

    def _post_transfer_ops(self) -> None:
        """tp 1: the chunk sends this step queued reach the transfer engine now, before its sampling
        is queued (each send's CUDA event orders its copy after this forward only), not at
        finish_step; their results are handled at finish_step as before (or at once where the role
        takes them early)."""
        if self.wake_fd is None or not self.transfer.ops:  # wake_fd: a TransferCoordinator of tp 1
            return
        if self._watches_transfers():
            self._take_results_early()
        else:
            self._posted_results += self.transfer.flush()

    def _wait_watching(self, done: Callable[[], bool], done_fd: int | None) -> None:
        # NOTE: the operations this step queued (a decode's room requests) go out now, not after it
        self._take_results_early()
        watchers = {self.wake_fd: self._on_wake_early}
        if self._takes_requests_early():
            fd = self._early_input[0]
            watchers[fd] = self._admit_early
            self._admit_early()  # what came since the loop last drained the socket
        wait_watching(done, done_fd, watchers)

    def _takes_requests_early(self) -> bool:
        """Whether this wait also takes new requests (the loop gave its socket, the role admits early)."""
        return self._early_input is not None and self._admits_early()

    def _admit_early(self) -> None:
        """New requests while a step runs: added (the loop's `take`), admitted, and the transfer
        operations that made (a decode's room requests) sent at once."""
        self._early_input[1]()
        self._admit_held_requests()
        self._take_results_early()

    def _on_wake_early(self) -> None:
        self.on_wake()
        self._take_results_early()

    def _take_results_early(self) -> None:
        """Finished transfers now (the role allows it while a step runs), their outputs out at once.
        NOTE: every output made so far leaves, in the order made: nothing of this step is among
        them yet (its tokens are appended after the wait), so no request's tokens are reordered."""
        results = self.transfer.flush()
        if TRACE and results:
            logger.info(
                "transfer results mid-step: rooms=%s t=%.6f", [r.room for r in results], time.monotonic()
            )
        for result in results:
            self._on_transfer_done(result)
        if self._pending_outs:
            self._early_sink(self._take_outputs())

    # ---- scheduling -------------------------------------------------------------------
    def _schedule(self) -> list[tuple[Req, int]]:
        budget = (
            self.config.chunked_prefill_size
            if self.config.chunked_prefill_size > 0
            else self.config.max_prefill_tokens
        )
        scheduled: dict[str, tuple[Req, int]] = {}
        for req in list(self.running):
            if req not in self.running:  # retracted to make room for an older request
                continue
            pending = self._has_pending_token(req)
            if pending and self._ends_by_length(req, 1):
                continue  # its token on the device is its last: nothing to compute for it
            n = req.seq_len + pending - req.num_computed_tokens
            if n > 1:  # still prefilling: a chunk of its prompt
                n = min(n, budget)
                if n <= 0:
                    continue
            if self._ensure_pages(req, req.num_computed_tokens + n, scheduled):
                scheduled[req.rid] = (req, n)
                if req.status == ReqStatus.PREFILLING and not pending:
                    budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.config.max_running_requests:
            req = self.waiting[0]
            n = self._admit(req, budget)
            if n == 0:
                break
            self.waiting.popleft()
            scheduled[req.rid] = (req, n)
            budget -= n
        return list(scheduled.values())

    def _admit(self, req: Req, budget: int) -> int:
        """Match the prefix cache, reserve pages for the first chunk; returns its length (0: no room)."""
        ps = self.page_size
        all_ids = req.all_ids
        limit = (len(all_ids) - 1) // ps * ps  # keep at least one token to compute (for the logits)
        if req.sampling.prompt_logprobs:  # every prompt position's logits are wanted: none from the cache
            limit, req.prompt_logprobs = 0, []
        pages, node = self.cache.match_prefix(all_ids[:limit])
        self.cache.lock(node)
        n = min(len(all_ids) - len(pages) * ps, budget)
        need = pages_for_tokens(self._pages_at_admission(req, len(pages) * ps, n), ps) - len(pages)
        # a page of head-room for each running request
        new_pages = self._reserve_pages(need, headroom=len(self.running))
        if new_pages is None:
            self.cache.unlock(node)
            return 0
        req.page_table = pages + new_pages
        req.cache_node = node
        req.num_computed_tokens = req.num_cached_tokens = len(pages) * ps
        req.status = ReqStatus.PREFILLING
        self.running.append(req)
        if req.stage == "wait_queue":  # its first admission (a retracted request's next one is not timed)
            request_stages.enter(req, "forward", self.ROLE)
        return n

    def _reserve_pages(self, need: int, headroom: int) -> list[int] | None:
        """The one admission rule: `need` new pages if they fit while keeping `headroom` pages
        for requests already running (evicting prefix-cache pages if needed); else None."""
        if need + headroom > self.pool.num_free_pages + self.cache.num_evictable_pages:
            return None
        if need > self.pool.num_free_pages:
            self.cache.evict(need - self.pool.num_free_pages)
        return self.pool.allocate(need)

    def _has_pending_token(self, req: Req) -> bool:
        """Overlap: the step in flight samples `req`'s next token (still on the device)."""
        return self._inflight is not None and req in self._inflight.rows

    def _ends_by_length(self, req: Req, more: int) -> bool:
        """Whether `req` reaches max_new_tokens or the context length after `more` more tokens."""
        return (
            len(req.output_ids) + more >= req.sampling.max_new_tokens
            or req.seq_len + more >= self.context_length
        )

    def _ensure_pages(self, req: Req, num_tokens: int, scheduled: dict) -> bool:
        """Give `req` pages for `num_tokens`, evicting cache and retracting newer requests if needed."""
        need = pages_for_tokens(num_tokens, self.page_size) - len(req.page_table)
        while need > self.pool.num_free_pages:
            if self.cache.evict(need - self.pool.num_free_pages):
                continue
            if self._inflight is not None:
                raise _RetractionNeeded  # step() reads the step in flight first, then schedules again
            victim = self.running[-1]
            scheduled.pop(victim.rid, None)
            self._retract(victim)
            if victim is req:
                return False
        if need > 0:
            req.page_table += self.pool.allocate(need)
        return True

    def _retract(self, req: Req) -> None:
        logger.info("retracting %s (%d tokens) to free KV pages", req.rid, req.seq_len)
        self.num_retractions += 1
        self._release(req)
        req.status = ReqStatus.WAITING
        self.waiting.appendleft(req)

    # ---- running a batch --------------------------------------------------------------
    def process_batch_result(self, scheduled: list[tuple[Req, int]], logits) -> None:
        """Advance the batch's requests past its forward; sample those whose logits it computed."""
        self._complete(self._launch(scheduled, logits, {}))

    def _launch(
        self,
        scheduled: list[tuple[Req, int]],
        logits,
        pending: dict[Req, int],
        future: torch.Tensor | None = None,
    ) -> _Launched:
        """Advance the batch's requests past its forward (queued on the device) and queue the
        sampling of those whose last position it computes; nothing here waits for the device
        (except prompt logprobs, read at once). pending: requests whose input was a future token,
        their row in `future` (the previous step's draws, on the device)."""
        sampled = [
            req for req, n in scheduled if req.num_computed_tokens + n == req.seq_len + (req in pending)
        ]
        if any(req.sampling.prompt_logprobs for req, _ in scheduled):
            logits = self._take_prompt_logprobs(scheduled, logits, set(sampled))
        for req, n in scheduled:
            req.num_computed_tokens += n
            if req.num_computed_tokens < req.seq_len or req.status == ReqStatus.PREFILLING:
                self._on_chunk_computed(req)
        self._post_transfer_ops()
        step = _Launched(scheduled, {req: i for i, req in enumerate(sampled)})
        if sampled:
            num_pending = [int(req in pending) for req in sampled]
            draws = self.sampler.sample_on_device(
                logits, sampled, num_pending, self._pending_tokens(sampled, pending, future)
            )
            step.tokens, step.host = draws.tokens, draws.to_host()
        if self.runner.device.type == "cuda":
            step.event = torch.cuda.Event()
            step.event.record()
        return step

    def _pending_tokens(self, sampled: list[Req], pending: dict[Req, int], future) -> torch.Tensor | None:
        """Per row of `sampled`, its token still on the device (the step in flight's draw), for the
        penalties; None when no pending request has one (gathered on the device: no sync)."""
        if not any(
            r in pending and (r.sampling.frequency_penalty or r.sampling.presence_penalty) for r in sampled
        ):
            return None
        rows = to_device([pending.get(r, 0) for r in sampled], torch.long, self.runner.device)
        return future[rows]

    def _complete(self, step: _Launched) -> None:
        """Wait for `step`, append its tokens (dropping those of requests that ended meanwhile) and
        free the pages of requests that ended while it ran."""
        if step.event is not None:
            t0, watching = time.monotonic(), self._watches_transfers()
            if watching:
                self._wait_watching(step.event.query, None)
            step.event.synchronize()
            if TRACE:
                logger.info("step waited %.6f-%.6f, transfers watched: %s", t0, time.monotonic(), watching)
        result = step.host.result() if step.host is not None else None
        now = time.monotonic()
        for req, i in step.rows.items():
            if req.is_finished:  # ended (stop, abort) at the step before: this extra token is dropped
                continue
            if result.bad and result.bad[i]:
                self._fail_request(req, NOT_FINITE)
                continue
            token = result.token_ids[i]
            req.output_ids.append(token)
            req.first_token_time = req.first_token_time or now
            self._on_token_sampled(req, token, *self._logprobs_of(result, i, req))
        for req in step.release_after:
            self._free_pages(req)

    @staticmethod
    def _take_prompt_logprobs(scheduled: list[tuple[Req, int]], logits, sampled: set[Req]):
        """Record the prompt logprobs of the rows ModelRunner.build_plan added for them; return the
        rows to sample from (one per request in `sampled`, those whose last position was computed)."""
        keep, row = [], 0
        for req, n in scheduled:
            k = prompt_logprob_rows(req, n)
            if k:
                start = req.num_computed_tokens
                lp = torch.log_softmax(logits[row : row + k].float(), dim=-1)
                targets = torch.tensor(req.input_ids[start + 1 : start + 1 + k], device=lp.device)
                chosen = lp.gather(1, targets[:, None]).squeeze(1).tolist()
                tops: list = [None] * k
                if req.sampling.top_logprobs_num:
                    vals, ids = lp.topk(req.sampling.top_logprobs_num, dim=-1)
                    tops = [[[i, v] for i, v in zip(row_ids, row_vals, strict=True)]
                            for row_ids, row_vals in zip(ids.tolist(), vals.tolist(), strict=True)]  # fmt: skip
                req.prompt_logprobs += [[c, t] for c, t in zip(chosen, tops, strict=True)]
                row += k
            if req in sampled:
                keep.append(row)
                row += 1
        return logits[keep]

    @staticmethod
    def _logprobs_of(result, i: int, req: Req) -> tuple[float | None, list[list] | None]:
        """Row i's logprob and top logprobs ([[token_id, logprob], ...]), each only if `req` asked."""
        lp = result.logprobs[i] if result.logprobs and req.sampling.return_logprob else None
        top = result.top_logprobs[i] if result.top_logprobs and req.sampling.top_logprobs_num else None
        return lp, None if top is None else [list(t) for t in top]

    @staticmethod
    def _token_out(req: Req, token: int, lp: float | None, top: list[list] | None) -> TokenOut:
        return TokenOut(req.rid, [token], logprobs=None if lp is None else [lp],
                        top_logprobs=None if top is None else [top])  # fmt: skip

    def _emit_token(self, req: Req, token: int, lp: float | None, top: list[list] | None) -> None:
        """`token` was just appended to req.output_ids: finish the request if it ends it, queue the output."""
        if lp is not None:
            req.output_logprobs.append(lp)
        if top is not None:
            req.output_top_logprobs.append(top)
        out = self._token_out(req, token, lp, top)
        if req.sampling.prompt_logprobs and len(req.output_ids) == 1:  # with the first token, once
            out.prompt_logprobs = [None] + [p for p, _ in req.prompt_logprobs]
            if req.sampling.top_logprobs_num:
                out.prompt_top_logprobs = [None] + [t for _, t in req.prompt_logprobs]
        reason = self._finish_reason(req)
        if reason:
            self._release(req)
            self.sampler.forget(req.rid)
            req.finish_reason, req.status = reason, ReqStatus.FINISHED
            out.finished, out.finish_reason, out.matched_stop = True, reason, req.matched_stop
        self._fill_usage(out, req)
        self._pending_outs.append(out)

    def _finish_reason(self, req: Req) -> str | None:
        s, token = req.sampling, req.output_ids[-1]
        if (token in self.eos_token_ids and not s.ignore_eos) or token in s.stop_token_ids:
            req.matched_stop = token
            return "stop"
        if s.stop and self.tokenizer is not None:
            window = max(len(x) for x in s.stop) + 2
            tail = self.tokenizer.decode(req.output_ids[-window:])
            for stop in s.stop:
                if stop in tail:
                    req.matched_stop = stop
                    return "stop"
        if len(req.output_ids) >= s.max_new_tokens or req.seq_len >= self.context_length:
            return "length"
        return None

    # ---- pages and finishing ----------------------------------------------------------
    def _release(self, req: Req) -> None:
        self.running.remove(req)
        if self._inflight is not None and any(r is req for r, _ in self._inflight.scheduled):
            self._inflight.release_after.append(req)  # NOTE: the step in flight may still write them
            return
        self._free_pages(req)

    def _free_pages(self, req: Req) -> None:
        """Give the request's pages back: whole computed pages to the prefix cache, the rest to the pool."""
        ps = self.page_size
        full = req.num_computed_tokens // ps
        shared = req.num_cached_tokens // ps
        dup = self.cache.insert(req.all_ids[: full * ps], req.page_table[:full])
        self.pool.free(req.page_table[shared:dup] + req.page_table[full:])
        if req.cache_node is not None:
            self.cache.unlock(req.cache_node)
        # NOTE: num_cached_tokens stays: it is reported in the usage of the finished request
        req.page_table, req.cache_node, req.num_computed_tokens = [], None, 0

    def _finish(self, req: Req, reason: str, status: ReqStatus, error: str | None = None) -> None:
        req.finish_reason, req.status = reason, status
        self.sampler.forget(req.rid)
        out = TokenOut(req.rid, [], finished=True, finish_reason=reason, error=error)
        self._fill_usage(out, req)
        self._pending_outs.append(out)

    def _fail_request(self, req: Req, error: str) -> None:
        """End a running request with `error` (its pages freed once no step in flight writes them)."""
        if req in self.running:
            self._release(req)
        self._finish(req, "abort", ReqStatus.ABORTED, error=error)

    def _abort_out(self, req: Req, error: str) -> TokenOut:
        return TokenOut(
            req.rid, [], finished=True, finish_reason="abort", error=error, prompt_tokens=len(req.input_ids)
        )

    def _fill_usage(self, out: TokenOut, req: Req) -> None:
        out.prompt_tokens, out.completion_tokens = len(req.input_ids), len(req.output_ids)
        out.cached_tokens = req.num_cached_tokens

    def _check_request(self, req: Req) -> str | None:
        if not req.input_ids:
            return "the prompt is empty"
        if len(req.input_ids) >= self.context_length:
            return f"the prompt has {len(req.input_ids)} tokens; the context length is {self.context_length}"
        if pages_for_tokens(len(req.input_ids) + 1, self.page_size) > self.pool.num_pages:
            return f"the prompt ({len(req.input_ids)} tokens) does not fit in the KV pool"
        vocab = self.runner.hf_config.vocab_size
        if any(not 0 <= t < vocab for t in req.input_ids):
            return f"input token ids must be in [0, {vocab})"
        return None


def _eos_ids(hf_config, model_path: str, tokenizer) -> set[int]:
    ids: set[int] = set()
    for source in (hf_config, _generation_config(model_path)):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        ids.update(value if isinstance(value, list) else [value] if value is not None else [])
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def _generation_config(model_path: str):
    from pathlib import Path

    if not (Path(model_path) / "generation_config.json").exists():
        return None
    try:
        from transformers import GenerationConfig

        return GenerationConfig.from_pretrained(model_path)
    except (OSError, ValueError):
        return None
