"""Prometheus metrics of a serving front end (`/metrics`), all named disagg_* with a `role` label.

The HTTP process observes request timings as outputs stream by; the gauges are refreshed from the
scheduler's `stats()` each time /metrics is scraped. The prefill and decode servers reuse this
class with role="prefill" / role="decode". With `--dp-size N` (N > 1) the scheduler gauges carry a
`dp_rank` label (one series per replica) and two series per replica come from the dispatcher:
`disagg_dp_dispatched_requests_total` and `disagg_dp_replica_up`.
"""

from __future__ import annotations

from disagg.common.engine.request import SchedulerStats
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

disable_created_metrics()  # the *_created series only add noise to a scrape

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0,
                    1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)  # fmt: skip
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1,
                0.15, 0.2, 0.3, 0.5, 1.0, 2.0, 5.0)  # fmt: skip

# scheduler stats() key -> gauge name, help
_GAUGES = {
    "num_running": ("disagg_num_running_requests", "Requests in the running (decoding) batch"),
    "num_waiting": ("disagg_num_queue_requests", "Requests waiting to be scheduled"),
    "kv_usage": ("disagg_kv_usage_ratio", "Fraction of KV pool pages in use (token usage), 0..1"),
    "cache_hit_rate": (
        "disagg_prefix_cache_hit_rate",
        "Fraction of prompt tokens served from the prefix cache",
    ),
    "num_used_pages": ("disagg_num_used_pages", "KV pool pages in use (by requests or the prefix cache)"),
    "num_total_pages": ("disagg_num_total_pages", "KV pool pages in total"),
    "num_free_pages": ("disagg_num_free_pages", "KV pool pages free"),
    "num_request_pages": ("disagg_num_request_pages", "KV pool pages held by requests"),
    "num_cached_pages": ("disagg_num_cached_pages", "KV pool pages held by the prefix cache"),
    "num_open_rooms": ("disagg_num_open_rooms", "PD servers: bootstrap rooms the KV transfer still tracks"),
}


class ServerMetrics:
    CONTENT_TYPE = CONTENT_TYPE_LATEST

    def __init__(self, role: str = "server", dp_size: int = 1):
        self.role, self.dp_size = role, dp_size
        self.registry = CollectorRegistry()
        r, lbl = self.registry, ["role"]
        self.ttft = Histogram("disagg_time_to_first_token_seconds", "Time to first token", lbl,
                              buckets=_LATENCY_BUCKETS, registry=r).labels(role)  # fmt: skip
        self.itl = Histogram("disagg_inter_token_latency_seconds", "Time between output tokens", lbl,
                             buckets=_ITL_BUCKETS, registry=r).labels(role)  # fmt: skip
        self.e2e = Histogram("disagg_e2e_request_latency_seconds", "Request latency, arrival to finish", lbl,
                             buckets=_LATENCY_BUCKETS, registry=r).labels(role)  # fmt: skip
        self.prompt_tokens = Counter("disagg_prompt_tokens", "Prompt tokens of finished requests", lbl,
                                     registry=r).labels(role)  # fmt: skip
        self.generation_tokens = Counter("disagg_generation_tokens", "Generated tokens", lbl,
                                         registry=r).labels(role)  # fmt: skip
        self.cached_tokens = Counter("disagg_cached_prompt_tokens", "Prompt tokens served from the prefix cache",
                                     lbl, registry=r).labels(role)  # fmt: skip
        self.requests = Counter("disagg_requests", "Finished requests by finish reason",
                                ["role", "finish_reason"], registry=r)  # fmt: skip
        # NOTE: one series per replica with --dp-size > 1; a single server keeps its labels as they were
        glbl = ["role", "dp_rank"] if dp_size > 1 else ["role"]
        self.gauges = {key: Gauge(name, doc, glbl, registry=r) for key, (name, doc) in _GAUGES.items()}
        # PD servers: requests per stage (prealloc/bootstrap, transfer, waiting, running)
        self.queues = Gauge("disagg_queue_requests", "Requests in each stage of the server", [*glbl, "stage"],
                            registry=r)  # fmt: skip
        self.replicas: list[dict] = []  # the dispatcher's last view of the replicas (dp_size > 1)
        if dp_size > 1:
            r.register(_ReplicaCollector(self))
        self.scheduler_text = ""  # series kept by the scheduler process (KV transfer), appended to ours
        self.expert_tokens = _ExpertTokens(role)  # MoE: --enable-expert-distribution-metrics
        r.register(self.expert_tokens)

    def observe_first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def observe_generated(self, num_tokens: int) -> None:
        self.generation_tokens.inc(num_tokens)

    def observe_itl(self, seconds: float, num_tokens: int) -> None:
        """`num_tokens` new tokens arrived `seconds` after the previous ones."""
        for _ in range(num_tokens):
            self.itl.observe(seconds / num_tokens)

    def observe_finish(
        self, e2e_seconds: float, finish_reason: str, prompt_tokens: int, cached_tokens: int
    ) -> None:
        self.e2e.observe(e2e_seconds)
        self.requests.labels(self.role, finish_reason or "unknown").inc()
        self.prompt_tokens.inc(prompt_tokens)
        self.cached_tokens.inc(cached_tokens)

    def set_stats(self, stats: SchedulerStats | None) -> None:
        if stats is None:
            return
        if self.dp_size == 1:
            self._set_gauges(stats, ())
        else:  # per replica; a dead replica keeps its last values (and dp_replica_up 0)
            self.replicas = stats.dp_replicas
            for entry in stats.dp_replicas:
                if entry["stats"] is not None:
                    self._set_gauges(entry["stats"], (str(entry["dp_rank"]),))
        self.scheduler_text = stats.metrics_text or self.scheduler_text
        self.expert_tokens.counts = stats.expert_tokens or self.expert_tokens.counts

    def _set_gauges(self, stats: SchedulerStats, dp_label: tuple[str, ...]) -> None:
        for key, gauge in self.gauges.items():
            gauge.labels(self.role, *dp_label).set(float(getattr(stats, key)))
        for stage, n in stats.queues.items():
            self.queues.labels(self.role, *dp_label, stage).set(float(n))

    def render(self) -> bytes:
        return generate_latest(self.registry) + self.scheduler_text.encode()


class _ReplicaCollector:
    """The dispatcher's counts per replica, as of the last stats (kept in the scheduler side's
    controller, so a counter here is exported as read, not incremented)."""

    def __init__(self, metrics: ServerMetrics):
        self.metrics = metrics

    def collect(self):
        dispatched = CounterMetricFamily("disagg_dp_dispatched_requests", "Requests the dispatcher sent to each "
                                         "data parallel replica", labels=["role", "dp_rank"])  # fmt: skip
        up = GaugeMetricFamily("disagg_dp_replica_up", "1 while the data parallel replica runs, 0 once it died",
                               labels=["role", "dp_rank"])  # fmt: skip
        for entry in self.metrics.replicas:
            labels = [self.metrics.role, str(entry["dp_rank"])]
            dispatched.add_metric(labels, float(entry["num_dispatched"]))
            up.add_metric(labels, 1.0 if entry["alive"] else 0.0)
        yield dispatched
        yield up


class _ExpertTokens:
    """disagg_moe_expert_tokens_total{role, layer, expert}: routed (token, slot) pairs per MoE layer
    and logical expert since start, as the scheduler counted them (layers x experts series, only
    with --enable-expert-distribution-metrics; `python -m disagg.common.models.eplb` reads them)."""

    def __init__(self, role: str):
        self.role, self.counts = role, {}

    def collect(self):
        if not self.counts:
            return
        family = CounterMetricFamily("disagg_moe_expert_tokens", "Routed tokens per MoE layer and expert",
                                     labels=["role", "layer", "expert"])  # fmt: skip
        for layer, row in sorted(self.counts.items()):
            for expert, n in enumerate(row):
                family.add_metric([self.role, str(layer), str(expert)], float(n))
        yield family
