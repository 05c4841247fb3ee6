"""Background health checks: GET <worker>/health every --health-check-interval-secs, per worker.

Each worker has its own schedule, so one hung worker (a probe waiting for its timeout) delays no
other. A new worker turns healthy on its first passing check (workers still starting are probed
every second, and so are workers marked down, so that one back passes its
--health-success-threshold probes within seconds). Afterwards:
- a refused or reset connection marks a healthy worker down at once (the process is gone) and
  fails every leg on it;
- a timed-out or failed probe counts: --health-failure-threshold in a row mark it down (hung or
  overloaded); then, and at each failed probe while it stays down, the legs on it that got no byte
  for --worker-stall-timeout seconds are failed (retried elsewhere, or their stream moves);
- --health-success-threshold passes in a row bring it back and close its circuit breaker;
- a passing probe while its breaker is open half-opens the breaker (trial traffic now, not after
  --cb-timeout-duration-secs).
A request that fails on a worker (`WorkerRegistry.suspect`) has it probed within one tick.
"""

from __future__ import annotations

import asyncio
import enum
import json
import logging
import time

from disagg.router.config import RouterConfig
from disagg.router.legs import fetch
from disagg.router.upstream import UPSTREAM_ERRORS, UpstreamPool
from disagg.router.workers import BreakerState, Role, Worker, WorkerRegistry

logger = logging.getLogger("disagg.router")

TICK_SECS = 0.25  # how often due probes are started (and the delay of a probe asked for by a request)
FAST_INTERVAL_SECS = 1.0  # workers still starting, or marked down: probed more often


class Probe(enum.Enum):
    OK = "ok"
    FAILED = "failed"  # non-200 answer or timeout: may be a busy worker, counts toward the threshold
    REFUSED = "refused"  # connection refused or reset: the process is gone


class HealthChecker:
    def __init__(
        self,
        config: RouterConfig,
        registry: WorkerRegistry,
        client: UpstreamPool,
        headers: dict[str, str],
    ):
        self.config = config
        self.registry = registry
        self.client = client
        self.headers = headers
        self._due: dict[Worker, float] = {}  # monotonic time of each worker's next probe
        self._probing: set[Worker] = set()
        self._tasks: set[asyncio.Task] = set()
        registry.on_suspect(self.probe_soon)

    async def run(self) -> None:
        try:
            while True:
                await asyncio.sleep(TICK_SECS)
                self._start_due(time.monotonic())
        finally:
            for task in list(self._tasks):
                task.cancel()

    def probe_soon(self, worker: Worker) -> None:
        """Probe `worker` at the next tick (a request just failed on it)."""
        self._due[worker] = 0.0

    async def check_all(self) -> None:
        workers = self.registry.all()
        if workers:
            await asyncio.gather(*(self.check(w) for w in workers))

    def _start_due(self, now: float) -> None:
        workers = self.registry.all()
        for worker in workers:
            if worker not in self._probing and self._due.get(worker, 0.0) <= now:
                self._probing.add(worker)
                task = asyncio.create_task(self.check(worker))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        if len(self._due) > len(workers):  # forget removed workers
            alive = set(workers)
            for worker in [w for w in self._due if w not in alive]:
                del self._due[worker]

    async def check(self, worker: Worker) -> bool:
        try:
            outcome = await self._probe(worker)
            if outcome is Probe.OK and worker.role is not Role.REGULAR and worker.pd_identity is None:
                await self._read_identity(worker)  # before it turns healthy: pairs are checked from the start
            self.record(worker, outcome)
        finally:
            self._probing.discard(worker)
            interval = self.config.health_check_interval_secs
            self._due[worker] = time.monotonic() + (
                interval if worker.healthy else min(interval, FAST_INTERVAL_SECS)
            )
        return outcome is Probe.OK

    async def _read_identity(self, worker: Worker) -> None:
        """The PD server's KV layout identity from /server_info (what the router pairs on)."""
        try:
            status, body, _ = await fetch(self.client, "GET", worker.url, "/server_info", self.headers,
                                          self.config.health_check_timeout_secs)  # fmt: skip
            identity = json.loads(body).get("pd_identity") if status == 200 else None
        except (*UPSTREAM_ERRORS, TimeoutError, ValueError, AttributeError):
            return  # read again at its next passing probe
        # NOTE: {} = read, none published (e.g. SGLang's servers): not asked again until it is marked down
        worker.pd_identity = identity if isinstance(identity, dict) else {}
        self.registry.check_pairs()

    async def _probe(self, worker: Worker) -> Probe:
        c = self.config
        try:
            status, _, _ = await fetch(
                self.client,
                "GET",
                worker.url,
                c.health_check_endpoint,
                self.headers,
                c.health_check_timeout_secs,
            )
        except TimeoutError:
            return Probe.FAILED
        except UPSTREAM_ERRORS:
            return Probe.REFUSED
        except Exception:  # a router bug must not end the health checks: count it as a failure
            logger.exception("health check of %s failed", worker.url)
            return Probe.FAILED
        return Probe.OK if status == 200 else Probe.FAILED

    def record(self, worker: Worker, outcome: Probe | bool) -> None:
        if isinstance(outcome, bool):
            outcome = Probe.OK if outcome else Probe.FAILED
        if outcome is Probe.OK:
            self._passed(worker)
        else:
            self._failed(worker, outcome)

    def _passed(self, worker: Worker) -> None:
        worker.health_successes += 1
        worker.health_failures = 0
        if not worker.healthy and (
            not worker.was_healthy or worker.health_successes >= self.config.health_success_threshold
        ):
            logger.info("worker %s is healthy", worker.url)
            worker.set_healthy(True)
            if worker.was_healthy:
                worker.breaker.reset()  # back from the dead: a fresh process deserves fresh trust
            worker.was_healthy = True
        elif worker.healthy and worker.breaker.state is BreakerState.OPEN:
            logger.info("worker %s passes its probe: circuit breaker half-open", worker.url)
            worker.breaker.probe_passed()

    def _failed(self, worker: Worker, outcome: Probe) -> None:
        worker.health_failures += 1
        worker.health_successes = 0
        stall = self.config.worker_stall_timeout
        if outcome is Probe.REFUSED:
            if worker.healthy:
                logger.warning("worker %s is down: its connection was refused", worker.url)
            worker.mark_down("health_refused", "upstream_unavailable")  # the process is gone
        elif worker.healthy and worker.health_failures >= self.config.health_failure_threshold:
            logger.warning(
                "worker %s is down after %d failed health checks", worker.url, worker.health_failures
            )
            worker.mark_down("health_failures", "worker_timeout", silent_for=stall)
        elif not worker.healthy and worker.was_healthy:
            worker.fail_silent_legs(stall, "worker_timeout")  # still failing: legs sent before it went quiet
