"""Router configuration: one frozen dataclass; `launch.py` builds it from SGLang-named flags."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

POLICY_NAMES = ("round_robin", "random", "power_of_two", "cache_aware")


@dataclass(frozen=True)
class PrefillSpec:
    url: str
    bootstrap_port: int | None = None  # KV bootstrap port of the prefill server; None: the server's default


@dataclass(frozen=True)
class RouterConfig:
    host: str = "0.0.0.0"
    port: int = 30000
    # workers: --worker-urls (regular mode) or --prefill/--decode (PD mode)
    worker_urls: tuple[str, ...] = ()
    pd_disaggregation: bool = False
    prefill: tuple[PrefillSpec, ...] = ()
    decode: tuple[str, ...] = ()
    # routing policy
    policy: str = "cache_aware"
    prefill_policy: str | None = None  # PD mode; None: --policy
    decode_policy: str | None = None
    cache_threshold: float = 0.3
    balance_abs_threshold: int = 64
    balance_rel_threshold: float = 1.5
    eviction_interval_secs: float = 60.0
    max_tree_size: int = 2**26  # characters per worker tree
    # health checks (SGLang's router defaults to 60 s x 3 failures: minutes to notice a dead worker;
    # here a refused connection marks it down at once, a hung one after 2 timed-out probes)
    health_check_interval_secs: float = 2.0
    health_check_timeout_secs: float = 4.0
    health_failure_threshold: int = 2
    health_success_threshold: int = 2
    health_check_endpoint: str = "/health"
    # failures while serving: a running stream that gets no byte for this long marks its worker
    # hung; a stream whose worker broke continues on another worker up to max_migrations times
    worker_stall_timeout: float = 10.0
    max_migrations: int = 1
    # retries: max_retries counts attempts in total, as SGLang's router does (1 = no retry)
    retry_max_retries: int = 5
    retry_initial_backoff_ms: float = 50.0
    retry_max_backoff_ms: float = 30000.0
    retry_backoff_multiplier: float = 1.5
    retry_jitter_factor: float = 0.2
    disable_retries: bool = False
    # circuit breaker
    cb_failure_threshold: int = 10
    cb_success_threshold: int = 3
    cb_timeout_duration_secs: float = 60.0
    disable_circuit_breaker: bool = False
    # admission
    max_concurrent_requests: int = -1  # -1: unlimited
    queue_size: int = 100
    queue_timeout_secs: float = 60.0
    request_timeout_secs: float = 1800.0
    max_payload_size: int = 512 * 1024 * 1024
    shutdown_grace_period_secs: float = 180.0
    # auth
    api_key: str | None = None  # clients must send `Authorization: Bearer <api_key>`
    worker_api_key: str | None = None  # sent to workers; None: --api-key
    admin_api_key: str | None = None  # /workers management; None: --api-key
    # observability
    log_level: str = "info"
    prometheus_port: int | None = None  # also serve /metrics on this port (it is always on the main port)
    prometheus_host: str = "0.0.0.0"
    request_id_headers: tuple[str, ...] = ("x-request-id",)
    # Kubernetes service discovery
    service_discovery: bool = False
    selector: dict[str, str] = field(default_factory=dict)
    prefill_selector: dict[str, str] = field(default_factory=dict)
    decode_selector: dict[str, str] = field(default_factory=dict)
    service_discovery_port: int = 80
    service_discovery_namespace: str | None = None
    bootstrap_port_annotation: str = "sglang.ai/bootstrap-port"

    @property
    def max_attempts(self) -> int:
        return 1 if self.disable_retries else max(1, self.retry_max_retries)

    @property
    def effective_worker_api_key(self) -> str | None:
        return self.worker_api_key if self.worker_api_key is not None else self.api_key

    @property
    def effective_admin_api_key(self) -> str | None:
        return self.admin_api_key if self.admin_api_key is not None else self.api_key

    def replace(self, **changes) -> RouterConfig:
        return dataclasses.replace(self, **changes)

    def validate(self) -> None:
        """Raise ValueError with a clear message for an unusable configuration."""
        for name in (self.policy, self.prefill_policy, self.decode_policy):
            if name is not None and name not in POLICY_NAMES:
                raise ValueError(f"unknown policy {name!r}; choose one of {', '.join(POLICY_NAMES)}")
        if self.pd_disaggregation and self.worker_urls:
            raise ValueError(
                "--worker-urls is for regular mode; use --prefill/--decode with --pd-disaggregation"
            )
        if not self.pd_disaggregation and (self.prefill or self.decode):
            raise ValueError("--prefill/--decode need --pd-disaggregation")
        if not 0.0 <= self.cache_threshold <= 1.0:
            raise ValueError("--cache-threshold must be within [0, 1]")
        if (
            self.service_discovery
            and self.pd_disaggregation
            and not (self.prefill_selector and self.decode_selector)
        ):
            raise ValueError(
                "--service-discovery with --pd-disaggregation needs --prefill-selector and --decode-selector"
            )
        if self.service_discovery and not self.pd_disaggregation and not self.selector:
            raise ValueError("--service-discovery needs --selector KEY=VALUE ...")
        if self.worker_stall_timeout <= 0 or self.max_migrations < 0:
            raise ValueError("--worker-stall-timeout must be > 0 and --max-migrations >= 0")
        if self.max_concurrent_requests == 0 or self.queue_size < 0:
            raise ValueError("--max-concurrent-requests must be -1 or > 0 and --queue-size >= 0")
