"""Where a request's time to its first token goes, stage by stage, as SGLang's per-stage request
latency: one Prometheus histogram, `disagg_per_stage_req_latency_seconds{role, stage}`.

    every role, first: tokenize (its HTTP process: arrival until sent to the scheduler), receive (sent
    until the scheduler took it in)
    colocated ("server"): wait_queue -> forward -> (first token)
    prefill:  bootstrap_queue -> wait_queue -> forward -> transfer_queue -> (the decode has the KV)
    decode:   prealloc_queue -> transfer_queue -> (KV and first token in; the rest is the transfer
              engine's `first_token` step: until it left the scheduler)

- tokenize: the HTTP process from the request's arrival (before its body was read) until it sent the
  tokenized request: the body, validation, the chat template, tokenization (on its worker threads)
- receive: from the HTTP process's send (after tokenizing) until the scheduler loop took it in (a
  scheduler busy in a step takes new requests at its end, or mid-step where its role may)
- bootstrap_queue: a PD request held until the decode side asked for its room (0 when started at once)
- wait_queue: queued until its first chunk was scheduled
- forward: its first chunk scheduled until its first token was on the host (every chunk's compute)
- transfer_queue: prefill: first token sampled until the transfer engine's result (the decode acked);
  decode: pages reserved and the room requested until the KV and the first token were in
- prealloc_queue: decode: arrival until pages for its whole prompt were reserved

A stage is observed when it ends; an aborted request's unfinished stage is not. The scheduler process
keeps the series; its stats carry them to the HTTP process's /metrics (as the transfer engine's).
"""

from __future__ import annotations

import time

from disagg.common.engine.request import Req
from prometheus_client import CollectorRegistry, Histogram, disable_created_metrics, generate_latest

disable_created_metrics()
_REGISTRY = CollectorRegistry()
STAGE_SECONDS = Histogram(
    "disagg_per_stage_req_latency_seconds",
    "Time a request spent in each stage before its first token (see common/engine/request_stages.py)",
    ["role", "stage"],
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 30),
    registry=_REGISTRY,
)


def enter(req: Req, stage: str | None, role: str, now: float | None = None) -> None:
    """End `req`'s current stage (observed under `role`) and start `stage` (None: stop timing)."""
    now = time.monotonic() if now is None else now
    if req.stage is not None:
        observe(role, req.stage, now - req.stage_since)
    req.stage, req.stage_since = stage, now


def observe(role: str, stage: str, seconds: float) -> None:
    STAGE_SECONDS.labels(role, stage).observe(max(0.0, seconds))


def leave(req: Req, stage: str, role: str) -> None:
    """End `req`'s stage if it is `stage` (a retried admission or a second token ends nothing)."""
    if req.stage == stage:
        enter(req, None, role)


def metrics_text() -> str:
    return generate_latest(_REGISTRY).decode()
