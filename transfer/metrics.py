"""Prometheus metrics of the KV transfer, labelled by role ("prefill" sends, "decode" receives)."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

KV_TRANSFER_BYTES = Counter(
    "disagg_kv_transfer_bytes_total", "KV cache bytes moved between prefill and decode", ["role"]
)
KV_TRANSFER_DURATION = Histogram(
    "disagg_kv_transfer_duration_seconds",
    "Time from a room's first KV chunk to its completion",
    ["role"],
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 30),
)
KV_TRANSFER_SPEED = Histogram(
    "disagg_kv_transfer_speed_gb_per_s",
    "Bytes of a room divided by its transfer duration, in GB/s",
    ["role"],
    buckets=(0.1, 0.5, 1, 2, 5, 10, 20, 50, 100, 200, 300, 400),
)
KV_TRANSFER_STEP = Histogram(
    "disagg_kv_transfer_step_seconds",
    "Where a room's hand-off time goes: wait_request (prefill: first chunk ready until the decode said "
    "where its pages are), gather / copy / scatter (one chunk's device or host copy: UCX staging, "
    "direct into the peer's pool, out of staging; on CUDA the copy's GPU time), wait_ready (CUDA: a copy "
    "posted until the forward that wrote its pages finished, plus the hop back), send (one UCX data message), to_scheduler (a "
    "finished room until the server's scheduler polled it), first_token (decode: a finished room until "
    "its first token left the scheduler for the client)",
    ["role", "step"],
    buckets=(0.00005, 0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5, 2, 10),
)
KV_TRANSFER_FAILURES = Counter(
    "disagg_kv_transfer_failures_total", "Rooms whose KV transfer failed", ["role", "reason"]
)


def observe_success(role: str, nbytes: int, seconds: float) -> None:
    KV_TRANSFER_BYTES.labels(role).inc(nbytes)
    KV_TRANSFER_DURATION.labels(role).observe(seconds)
    if seconds > 0 and nbytes > 0:
        KV_TRANSFER_SPEED.labels(role).observe(nbytes / seconds / 1e9)


def observe_step(role: str, step: str, seconds: float) -> None:
    KV_TRANSFER_STEP.labels(role, step).observe(max(0.0, seconds))


def observe_failure(role: str, reason: str) -> None:
    # the label is the reason's kind ("timeout", "peer_died", ...), not its free text
    KV_TRANSFER_FAILURES.labels(role, reason.split(":", 1)[0]).inc()


def metrics_text() -> str:
    """The transfer engine's Prometheus series of this process (a PD server's HTTP process
    appends them to its own /metrics)."""
    from prometheus_client import CollectorRegistry, disable_created_metrics, generate_latest

    disable_created_metrics()
    registry = CollectorRegistry()
    for metric in (
        KV_TRANSFER_BYTES,
        KV_TRANSFER_DURATION,
        KV_TRANSFER_SPEED,
        KV_TRANSFER_STEP,
        KV_TRANSFER_FAILURES,
    ):
        registry.register(metric)
    return generate_latest(registry).decode()
