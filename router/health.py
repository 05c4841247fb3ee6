"""Background health checks: GET <worker>/health every --health-check-interval-secs.

A new worker turns healthy on its first passing check; afterwards it takes
--health-failure-threshold consecutive failures to mark it down and --health-success-threshold
consecutive passes to bring it back.
"""

from __future__ import annotations

import asyncio
import logging

from disagg.router.config import RouterConfig
from disagg.router.proxy import fetch
from disagg.router.upstream import UPSTREAM_ERRORS, UpstreamPool
from disagg.router.workers import Worker, WorkerRegistry

logger = logging.getLogger("disagg.router")


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

    async def run(self) -> None:
        # NOTE: workers never seen healthy (still starting) are probed every second, not every interval
        interval = self.config.health_check_interval_secs
        tick = min(interval, 1.0)
        since_full = 0.0
        while True:
            await asyncio.sleep(tick)
            since_full += tick
            if since_full >= interval:
                since_full = 0.0
                await self.check_all()
            else:
                starting = [w for w in self.registry.all() if not w.was_healthy]
                if starting:
                    await asyncio.gather(*(self.check(w) for w in starting))

    async def check_all(self) -> None:
        workers = self.registry.all()
        if workers:
            await asyncio.gather(*(self.check(w) for w in workers))

    async def check(self, worker: Worker) -> bool:
        path = self.config.health_check_endpoint
        try:
            status, _, _ = await fetch(
                self.client, "GET", worker.url, path, self.headers, self.config.health_check_timeout_secs
            )
            ok = status == 200
        except UPSTREAM_ERRORS:
            ok = False
        except Exception:  # a router bug must not end the health-check loop: count it as a failure
            logger.exception("health check of %s failed", worker.url)
            ok = False
        self.record(worker, ok)
        return ok

    def record(self, worker: Worker, ok: bool) -> None:
        c = self.config
        if ok:
            worker.health_successes += 1
            worker.health_failures = 0
            if not worker.healthy and (
                not worker.was_healthy or worker.health_successes >= c.health_success_threshold
            ):
                logger.info("worker %s is healthy", worker.url)
                worker.set_healthy(True)
                if worker.was_healthy:
                    worker.breaker.reset()  # back from the dead: a fresh process deserves fresh trust
                worker.was_healthy = True
        else:
            worker.health_failures += 1
            worker.health_successes = 0
            if worker.healthy and worker.health_failures >= c.health_failure_threshold:
                logger.warning(
                    "worker %s is down after %d failed health checks", worker.url, worker.health_failures
                )
                worker.set_healthy(False)
