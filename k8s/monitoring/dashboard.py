"""The Grafana dashboard for disagg, as code: `python k8s/monitoring/dashboard.py` rewrites
k8s/monitoring/grafana/disagg-dashboard.json (checked in; a test fails when it is stale).

Every query names its metrics literally (disagg_*), so tests/test_k8s_monitoring.py can check each
one against a live /metrics scrape of our servers and router. Queries filter on the `namespace`
template variable and group by the servers' `role` label and the scrape's `pod` target label.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

DASHBOARD_PATH = Path(__file__).parent / "grafana" / "disagg-dashboard.json"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
NS = 'namespace=~"$namespace"'
RATE = "$__rate_interval"
QUANTILES = (0.5, 0.9, 0.99)


@dataclass
class Panel:
    title: str
    targets: list[tuple[str, str]]  # (PromQL, legend format)
    unit: str = "short"
    description: str = ""
    mappings: list[dict] = field(default_factory=list)


def rate(metric: str, by: str) -> str:
    return f"sum by ({by}) (rate({metric}{{{NS}}}[{RATE}]))"


def quantiles(histogram: str, by: str, legend: str) -> list[tuple[str, str]]:
    """p50/p90/p99 of a histogram over the rate window, per `by` group."""
    return [
        (
            f"histogram_quantile({q}, sum by (le, {by}) (rate({histogram}_bucket{{{NS}}}[{RATE}])))",
            f"p{round(q * 100)} {legend}",
        )
        for q in QUANTILES
    ]


def gauge(metric: str, agg: str, by: str) -> str:
    return f"{agg} by ({by}) ({metric}{{{NS}}})"


BREAKER_STATES = [
    {"type": "value", "options": {"0": {"text": "closed", "color": "green"},
                                  "1": {"text": "open", "color": "red"},
                                  "2": {"text": "half-open", "color": "orange"}}},
]  # fmt: skip

ROWS: list[tuple[str, list[Panel]]] = [
    ("Traffic", [
        Panel("Router requests/s by route and status",
              [(rate("disagg_router_requests_total", "route, status_code"), "{{route}} {{status_code}}")], "reqps"),
        Panel("Finished requests/s by role, pod and finish reason",
              [(rate("disagg_requests_total", "role, pod, finish_reason"), "{{role}} {{pod}} {{finish_reason}}")],
              "reqps"),
        Panel("Tokens/s by role",
              [(rate("disagg_prompt_tokens_total", "role"), "prompt {{role}}"),
               (rate("disagg_generation_tokens_total", "role"), "generated {{role}}")], "short"),
    ]),
    ("Latency", [
        Panel("Time to first token by role", quantiles("disagg_time_to_first_token_seconds", "role", "{{role}}"), "s"),
        Panel("Inter-token latency by role", quantiles("disagg_inter_token_latency_seconds", "role", "{{role}}"), "s"),
        Panel("End-to-end latency by role", quantiles("disagg_e2e_request_latency_seconds", "role", "{{role}}"), "s"),
        Panel("Time to first token by stage (mean)",
              [(f"{rate('disagg_per_stage_req_latency_seconds_sum', 'role, stage')} / "
                f"{rate('disagg_per_stage_req_latency_seconds_count', 'role, stage')}", "{{role}} {{stage}}")], "s",
              description="where a request waits before its first token: tokenize, receive (front end to scheduler); prefill bootstrap_queue, wait_queue, "
                          "forward, transfer_queue; decode prealloc_queue, transfer_queue; colocated wait_queue, "
                          "forward (common/engine/request_stages.py)"),
    ]),
    ("Per pod", [
        Panel("p99 time to first token by pod",
              quantiles("disagg_time_to_first_token_seconds", "role, pod", "{{role}} {{pod}}")[2:], "s"),
        Panel("Generated tokens/s by pod", [(rate("disagg_generation_tokens_total", "role, pod"), "{{role}} {{pod}}")]),
        Panel("Running and queued requests by pod",
              [(gauge("disagg_num_running_requests", "sum", "role, pod"), "running {{role}} {{pod}}"),
               (gauge("disagg_num_queue_requests", "sum", "role, pod"), "queued {{role}} {{pod}}")]),
    ]),
    ("Scheduler and KV cache", [
        Panel("Queue size per stage (PD)", [(gauge("disagg_queue_requests", "sum", "role, stage"), "{{role}} {{stage}}")],
              description="prefill: bootstrap/waiting/running/transfer; decode: prealloc/transfer/waiting/running"),
        Panel("KV pool usage by pod",
              [(gauge("disagg_kv_usage_ratio", "max", "role, pod"), "{{role}} {{pod}}")], "percentunit"),
        Panel("Prefix cache hit rate",
              [(gauge("disagg_prefix_cache_hit_rate", "avg", "role, pod"), "{{role}} {{pod}}"),
               (f"{rate('disagg_cached_prompt_tokens_total', 'role')} / {rate('disagg_prompt_tokens_total', 'role')}",
                "cached share of prompt tokens {{role}}")], "percentunit"),
    ]),
    ("KV transfer (prefill -> decode)", [
        Panel("KV transfer throughput GB/s by pod",
              [(f"{rate('disagg_kv_transfer_bytes_total', 'role, pod')} / 1e9", "{{role}} {{pod}}")]),
        Panel("KV transfer speed per request GB/s",
              quantiles("disagg_kv_transfer_speed_gb_per_s", "role", "{{role}}")),
        Panel("KV transfer duration and failures/s",
              quantiles("disagg_kv_transfer_duration_seconds", "role", "{{role}}")[1:]
              + [(rate("disagg_kv_transfer_failures_total", "role, reason"), "failures/s {{role}} {{reason}}")], "s"),
    ]),
    ("Router", [
        Panel("Router retries and rejections/s",
              [(rate("disagg_router_retries_total", "route"), "retries {{route}}"),
               (rate("disagg_router_rejected_total", "reason"), "rejected {{reason}}")], "reqps"),
        Panel("Router errors/s by worker", [(rate("disagg_router_worker_errors_total", "worker"), "{{worker}}")],
              "reqps"),
        Panel("Circuit breaker state by worker",
              [(gauge("disagg_router_circuit_breaker_state", "max", "worker"), "{{worker}}")],
              description="0 closed, 1 open, 2 half-open", mappings=BREAKER_STATES),
    ]),
    ("Failures and leaks", [
        Panel("KV pages by holder",
              [(gauge("disagg_num_free_pages", "sum", "role, pod"), "free {{role}} {{pod}}"),
               (gauge("disagg_num_request_pages", "sum", "role, pod"), "requests {{role}} {{pod}}"),
               (gauge("disagg_num_cached_pages", "sum", "role, pod"), "prefix cache {{role}} {{pod}}"),
               (gauge("disagg_num_open_rooms", "sum", "role, pod"), "open rooms {{role}} {{pod}}")],
              description="request pages or open rooms that stay up while no request runs are a leak; "
                          "cached pages are the prefix cache"),
        Panel("Router failure handling/s",
              [(rate("disagg_router_worker_marked_down_total", "reason"), "marked down {{reason}}"),
               (rate("disagg_router_stream_errors_total", "code"), "stream error {{code}}"),
               (rate("disagg_router_migrations_total", "outcome"), "migration {{outcome}}")], "reqps",
              description="see docs/failures.md"),
        Panel("Incompatible prefill/decode pairs",
              [(gauge("disagg_router_incompatible_pairs", "max", "pod"), "{{pod}}")],
              description="pairs the router refuses: model, weights or KV layout differ (its log says why)"),
    ]),
    ("Router workers", [
        Panel("Worker health (1 = healthy)",
              [(gauge("disagg_router_worker_healthy", "min", "role, worker"), "{{role}} {{worker}}")]),
        Panel("Router in-flight requests by worker and queue",
              [(gauge("disagg_router_active_requests", "sum", "worker"), "{{worker}}"),
               (gauge("disagg_router_queue_size", "sum", "pod"), "router queue {{pod}}")]),
        Panel("Router latency by route",
              quantiles("disagg_router_request_duration_seconds", "route", "total {{route}}")[::2]
              + quantiles("disagg_router_ttft_seconds", "route", "first byte {{route}}")[::2], "s"),
    ]),
]  # fmt: skip


def _panel_json(panel: Panel, panel_id: int, x: int, y: int) -> dict:
    return {
        "id": panel_id,
        "type": "timeseries",
        "title": panel.title,
        "description": panel.description,
        "datasource": DATASOURCE,
        "gridPos": {"h": 8, "w": 8, "x": x, "y": y},
        "targets": [
            {"refId": chr(ord("A") + i), "datasource": DATASOURCE, "expr": expr, "legendFormat": legend}
            for i, (expr, legend) in enumerate(panel.targets)
        ],
        "fieldConfig": {
            "defaults": {"unit": panel.unit, "mappings": panel.mappings, "custom": {"fillOpacity": 10}},
            "overrides": [],
        },
        "options": {"legend": {"displayMode": "list", "placement": "bottom"}, "tooltip": {"mode": "multi"}},
    }


def _templating() -> dict:
    return {
        "list": [
            {"name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus",
             "current": {}, "hide": 0, "refresh": 1},
            {"name": "namespace", "label": "Namespace", "type": "query", "datasource": DATASOURCE,
             "query": {"query": "label_values(disagg_num_running_requests, namespace)", "refId": "namespace"},
             "definition": "label_values(disagg_num_running_requests, namespace)",
             "includeAll": True, "allValue": ".*", "multi": True, "current": {}, "hide": 0, "refresh": 2},
        ]
    }  # fmt: skip


def build_dashboard() -> dict:
    panels, next_id, y = [], 1, 0
    for row_title, row_panels in ROWS:
        panels.append({"id": next_id, "type": "row", "title": row_title, "collapsed": False, "panels": [],
                       "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}})  # fmt: skip
        next_id, y = next_id + 1, y + 1
        for i, panel in enumerate(row_panels):
            panels.append(_panel_json(panel, next_id, x=8 * (i % 3), y=y + 8 * (i // 3)))
            next_id += 1
        y += 8 * ((len(row_panels) + 2) // 3)
    return {
        "uid": "disagg-overview",
        "title": "disagg: prefill/decode serving",
        "tags": ["disagg", "llm-serving"],
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "graphTooltip": 1,
        "time": {"from": "now-30m", "to": "now"},
        "refresh": "30s",
        "timezone": "browser",
        "templating": _templating(),
        "annotations": {"list": []},
        "panels": panels,
    }


def render_json() -> str:
    return json.dumps(build_dashboard(), indent=2) + "\n"


if __name__ == "__main__":
    DASHBOARD_PATH.write_text(render_json())
    print(f"wrote {DASHBOARD_PATH}")
