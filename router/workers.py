"""Workers the router knows: URL, role, load, health and a per-worker circuit breaker."""

from __future__ import annotations

import enum
import logging
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from disagg.router import metrics

logger = logging.getLogger("disagg.router")


class Role(enum.StrEnum):
    REGULAR = "regular"
    PREFILL = "prefill"
    DECODE = "decode"


class BreakerState(enum.IntEnum):  # values are the gauge disagg_router_circuit_breaker_state
    CLOSED = 0
    OPEN = 1
    HALF_OPEN = 2


class CircuitBreaker:
    """Closed -> open after `failure_threshold` consecutive failures; open -> half-open after
    `timeout_secs` or at once when a health probe passes (`probe_passed`); half-open -> closed after
    `success_threshold` successes, back to open on a failure."""

    def __init__(
        self,
        url: str,
        failure_threshold: int,
        success_threshold: int,
        timeout_secs: float,
        enabled: bool = True,
    ):
        self.url = url
        self.failure_threshold = failure_threshold
        self.success_threshold = success_threshold
        self.timeout_secs = timeout_secs
        self.enabled = enabled
        self._state = BreakerState.CLOSED
        self._failures = 0
        self._successes = 0
        self._opened_at = 0.0
        self._publish()

    @property
    def state(self) -> BreakerState:
        if self._state is BreakerState.OPEN and time.monotonic() - self._opened_at >= self.timeout_secs:
            self._set(BreakerState.HALF_OPEN)
        return self._state

    def allows(self) -> bool:
        return not self.enabled or self.state is not BreakerState.OPEN

    def record_success(self) -> None:
        self._failures = 0
        if self.state is BreakerState.HALF_OPEN:
            self._successes += 1
            if self._successes >= self.success_threshold:
                self._set(BreakerState.CLOSED)

    def record_failure(self) -> None:
        if not self.enabled:
            return
        state = self.state
        self._failures += 1
        if state is BreakerState.HALF_OPEN or (
            state is BreakerState.CLOSED and self._failures >= self.failure_threshold
        ):
            self._opened_at = time.monotonic()
            self._set(BreakerState.OPEN)

    def reset(self) -> None:
        """Close: the worker came back (passed health checks after being down)."""
        self._set(BreakerState.CLOSED)

    def probe_passed(self) -> None:
        """A health probe passed while open: let trial traffic through now, not after the timeout
        (a restarted worker serves within one health interval instead of `timeout_secs`)."""
        if self._state is BreakerState.OPEN:
            self._set(BreakerState.HALF_OPEN)

    def _set(self, state: BreakerState) -> None:
        self._state = state
        self._successes = 0
        if state is BreakerState.CLOSED:
            self._failures = 0
        self._publish()

    def _publish(self) -> None:
        metrics.labelled(metrics.CIRCUIT_BREAKER_STATE, self.url).set(int(self._state))


@dataclass(eq=False)
class Worker:
    url: str  # "http://host:port", no trailing slash
    role: Role
    breaker: CircuitBreaker
    bootstrap_port: int | None = None  # prefill only
    healthy: bool = False
    outstanding: int = 0  # requests in flight through this router
    health_failures: int = 0  # consecutive
    health_successes: int = 0
    was_healthy: bool = False  # passed a health check at least once
    # legs in flight on this worker (legs.Leg): failed when the worker is marked down
    inflight: set = field(default_factory=set, repr=False)
    # NOTE: when any leg on it last got bytes (monotonic): a worker still sending is busy, not hung
    last_bytes: float = 0.0
    # PD servers: the KV layout identity of /server_info (model fingerprint, page size, dtype, ...),
    # read when the worker turns healthy; None: not read yet; {}: the server publishes none
    pd_identity: dict | None = None
    host: str = field(init=False)

    def __post_init__(self) -> None:
        self.url = self.url.rstrip("/")
        self.host = urlsplit(self.url).hostname or ""

    @property
    def is_available(self) -> bool:
        return self.healthy and self.breaker.allows()

    def begin(self) -> None:
        self.outstanding += 1

    def end(self) -> None:
        self.outstanding -= 1

    def set_healthy(self, healthy: bool) -> None:
        self.healthy = healthy
        metrics.labelled(metrics.WORKER_HEALTHY, self.url, self.role.value).set(int(healthy))

    def mark_down(self, reason: str, code: str, silent_for: float = 0.0) -> None:
        """Take the worker out of rotation and fail the legs on it that got no byte for `silent_for`
        seconds (0: all of them); `code` tells their clients why.

        NOTE: legs are failed now rather than left to the request timeout: those before their first
        byte are retried elsewhere, running streams migrate or end with `code`. A busy worker that
        misses its probes keeps the legs it is still serving (`silent_for`: the stall timeout)."""
        if self.healthy:
            metrics.labelled(metrics.WORKER_MARKED_DOWN, reason).inc()
        self.set_healthy(False)
        self.pd_identity = None  # a restarted process may serve another checkpoint: read it again
        self.health_successes = 0
        self.fail_silent_legs(silent_for, code)

    def fail_silent_legs(self, silent_for: float, code: str) -> None:
        now = time.monotonic()
        for leg in list(self.inflight):
            if now - leg.last_byte >= silent_for:
                leg.abort(code)

    def to_json(self) -> dict:
        return {
            "url": self.url,
            "role": self.role.value,
            "bootstrap_port": self.bootstrap_port,
            "healthy": self.healthy,
            "circuit_breaker": self.breaker.state.name.lower(),
            "outstanding_requests": self.outstanding,
            "pd_identity": self.pd_identity,
        }


def normalize_url(url: str) -> str:
    url = url.strip().rstrip("/")
    if "://" not in url:
        url = "http://" + url
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"bad worker URL {url!r}: expected http://HOST:PORT")
    return url


class WorkerRegistry:
    """All workers by URL; listeners (policies) hear about removals, the health checker about
    workers that a request found suspect (`suspect`: probe it now instead of at the next interval)."""

    def __init__(self, make_breaker):
        self._make_breaker = make_breaker  # url -> CircuitBreaker
        self._workers: dict[str, Worker] = {}
        self._removal_listeners: list = []
        self._suspect_listeners: list = []
        self._logged_mismatches: set[tuple[str, str, str]] = set()

    def add(self, url: str, role: Role, bootstrap_port: int | None = None, healthy: bool = False) -> Worker:
        url = normalize_url(url)
        if url in self._workers:
            raise KeyError(f"worker {url} is already registered")
        worker = Worker(url, role, self._make_breaker(url), bootstrap_port=bootstrap_port)
        worker.set_healthy(healthy)
        worker.was_healthy = healthy
        self._workers[url] = worker
        return worker

    def remove(self, url: str) -> Worker:
        worker = self._workers.pop(normalize_url(url))
        worker.healthy = False
        metrics.forget_worker(worker.url, worker.role.value)
        for listener in self._removal_listeners:
            listener(worker)
        return worker

    def on_remove(self, listener) -> None:
        self._removal_listeners.append(listener)

    def on_suspect(self, listener) -> None:
        self._suspect_listeners.append(listener)

    def suspect(self, worker: Worker) -> None:
        """A request failed on `worker` (connection error, broken or stalled stream)."""
        for listener in self._suspect_listeners:
            listener(worker)

    def get(self, url: str) -> Worker | None:
        return self._workers.get(normalize_url(url))

    def all(self, role: Role | None = None) -> list[Worker]:
        return [w for w in self._workers.values() if role is None or w.role is role]

    def available(self, role: Role) -> list[Worker]:
        return [w for w in self._workers.values() if w.role is role and w.is_available]

    def check_pairs(self) -> None:
        """Log each incompatible prefill/decode pair once (why) and publish how many there are."""
        bad = 0
        for p in self.all(Role.PREFILL):
            for d in self.all(Role.DECODE):
                why = pd_mismatch(p, d)
                bad += bool(why)
                if why and (p.url, d.url, why) not in self._logged_mismatches:
                    self._logged_mismatches.add((p.url, d.url, why))
                    logger.error("prefill %s and decode %s will not be paired: %s", p.url, d.url, why)
        metrics.INCOMPATIBLE_PAIRS.set(bad)


def pd_mismatch(prefill: Worker, decode: Worker) -> str:
    """Why `prefill` and `decode` cannot exchange KV pages ("" = they can, or a side's identity is
    unknown: that pair is left to the transfer handshake, which refuses it per request)."""
    a, b = prefill.pd_identity, decode.pd_identity
    if not a or not b:
        return ""
    return "; ".join(
        f"{k}: {a.get(k)!r} != {b.get(k)!r}" for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)
    )
