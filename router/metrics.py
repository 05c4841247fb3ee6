"""Prometheus metrics of the router (served on its /metrics and on --prometheus-port)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

REGISTRY = CollectorRegistry()

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)

REQUESTS = Counter(
    "disagg_router_requests", "Requests answered by the router", ["route", "status_code"], registry=REGISTRY
)
REQUEST_DURATION = Histogram(
    "disagg_router_request_duration_seconds",
    "Time from request arrival to the last byte sent",
    ["route"],
    buckets=_LATENCY_BUCKETS,
    registry=REGISTRY,
)
TTFT = Histogram(
    "disagg_router_ttft_seconds",
    "Time from request arrival to the first response byte from the worker",
    ["route"],
    buckets=_LATENCY_BUCKETS,
    registry=REGISTRY,
)
RETRIES = Counter("disagg_router_retries", "Attempts beyond the first one", ["route"], registry=REGISTRY)
WORKER_ERRORS = Counter(
    "disagg_router_worker_errors",
    "Failed attempts per worker (connection error, timeout, 408/429/5xx)",
    ["worker"],
    registry=REGISTRY,
)
CIRCUIT_BREAKER_STATE = Gauge(
    "disagg_router_circuit_breaker_state", "0 closed, 1 open, 2 half-open", ["worker"], registry=REGISTRY
)
WORKER_HEALTHY = Gauge(
    "disagg_router_worker_healthy",
    "1 if the worker passes health checks",
    ["worker", "role"],
    registry=REGISTRY,
)

WORKER_MARKED_DOWN = Counter(
    "disagg_router_worker_marked_down",
    "Workers taken out of rotation, by why (health_refused, health_failures, stream_stall)",
    ["reason"],
    registry=REGISTRY,
)
STREAM_ERRORS = Counter(
    "disagg_router_stream_errors",
    "Client streams the router ended with an error event (the upstream broke, stalled or truncated)",
    ["code"],
    registry=REGISTRY,
)
MIGRATIONS = Counter(
    "disagg_router_migrations",
    "Broken streams continued on another worker (outcome: ok, failed)",
    ["outcome"],
    registry=REGISTRY,
)
LEG_ABORTS = Counter(
    "disagg_router_leg_aborts",
    "POST /abort_request sent to a worker for a leg of a failed or cancelled attempt",
    ["role"],
    registry=REGISTRY,
)

# NOTE: the failure series exist from the start at 0 (a dashboard shows "none yet", not "no data")
for _reason in ("health_refused", "health_failures", "stream_stall"):
    WORKER_MARKED_DOWN.labels(_reason)
for _code in ("upstream_unavailable", "worker_timeout"):
    STREAM_ERRORS.labels(_code)
for _outcome in ("ok", "failed"):
    MIGRATIONS.labels(_outcome)


class _ActiveRequests(Collector):
    """disagg_router_active_requests{worker}, read from the workers at scrape time (no per-request cost)."""

    def __init__(self) -> None:
        self.workers = list  # set by the router: a callable returning its workers

    def collect(self):
        family = GaugeMetricFamily(
            "disagg_router_active_requests", "Requests in flight per worker", labels=["worker"]
        )
        for worker in self.workers():
            family.add_metric([worker.url], worker.outstanding)
        yield family


ACTIVE_REQUESTS = _ActiveRequests()
REGISTRY.register(ACTIVE_REQUESTS)
INCOMPATIBLE_PAIRS = Gauge(
    "disagg_router_incompatible_pairs",
    "Healthy prefill/decode pairs the router will not pair: their KV layouts or models differ",
    registry=REGISTRY,
)
QUEUE_SIZE = Gauge("disagg_router_queue_size", "Requests waiting for a concurrency slot", registry=REGISTRY)
REJECTED = Counter("disagg_router_rejected", "Requests refused before routing", ["reason"], registry=REGISTRY)


_children: dict[tuple, object] = {}


def labelled(metric, *values: str):
    """`metric.labels(*values)`, cached: prometheus_client's labels() costs microseconds per call."""
    key = (metric, values)
    child = _children.get(key)
    if child is None:
        child = _children[key] = metric.labels(*values)
    return child


def render() -> bytes:
    return generate_latest(REGISTRY)


def forget_worker(url: str, role: str) -> None:
    """Drop a removed worker's labelled series so /metrics does not list it forever."""
    for key in [k for k in _children if url in k[1]]:
        del _children[key]
    for gauge, labels in (
        (CIRCUIT_BREAKER_STATE, (url,)),
        (WORKER_HEALTHY, (url, role)),
    ):
        try:
            gauge.remove(*labels)
        except KeyError:
            pass
