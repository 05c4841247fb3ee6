"""`launch_router`: the router's entry point. Flags follow sglang_router.launch_router.

launch_router --worker-urls http://w1:30000 http://w2:30000
launch_router --pd-disaggregation --prefill http://p1:30000 8998 --decode http://d1:30001 --port 8000
"""

from __future__ import annotations

import argparse
import logging
import sys

from disagg.router.config import POLICY_NAMES, PrefillSpec, RouterConfig


def add_router_args(parser: argparse.ArgumentParser) -> None:
    """Every router flag, in --help's groups; defaults from RouterConfig."""
    d = RouterConfig()
    _add_worker_args(parser, d)
    _add_policy_args(parser, d)
    _add_health_args(parser, d)
    _add_serving_failure_args(parser, d)
    _add_retry_args(parser, d)
    _add_admission_args(parser, d)
    _add_auth_args(parser, d)
    _add_observability_args(parser, d)
    _add_discovery_args(parser, d)


def _add_worker_args(parser: argparse.ArgumentParser, d: RouterConfig) -> None:
    g = parser.add_argument_group("workers")
    g.add_argument("--host", default=d.host)
    g.add_argument("--port", type=int, default=d.port)
    g.add_argument("--worker-urls", nargs="*", default=[], help="regular (non-PD) workers")
    g.add_argument("--pd-disaggregation", action="store_true")
    g.add_argument(
        "--prefill",
        nargs="+",
        action="append",
        default=[],
        metavar=("URL", "BOOTSTRAP_PORT"),
        help="prefill server URL and optional bootstrap port (a number or 'none'); repeat per server",
    )
    g.add_argument("--decode", action="append", default=[], metavar="URL", help="decode server URL; repeat")


def _add_policy_args(parser: argparse.ArgumentParser, d: RouterConfig) -> None:
    g = parser.add_argument_group("routing policy")
    g.add_argument("--policy", default=d.policy, choices=POLICY_NAMES)
    g.add_argument("--prefill-policy", default=None, choices=POLICY_NAMES)
    g.add_argument("--decode-policy", default=None, choices=POLICY_NAMES)
    g.add_argument("--cache-threshold", type=float, default=d.cache_threshold)
    g.add_argument("--balance-abs-threshold", type=int, default=d.balance_abs_threshold)
    g.add_argument("--balance-rel-threshold", type=float, default=d.balance_rel_threshold)
    g.add_argument("--eviction-interval-secs", type=float, default=d.eviction_interval_secs)
    g.add_argument("--max-tree-size", type=int, default=d.max_tree_size)


def _add_health_args(parser: argparse.ArgumentParser, d: RouterConfig) -> None:
    g = parser.add_argument_group("health checks")
    g.add_argument("--health-check-interval-secs", type=float, default=d.health_check_interval_secs)
    g.add_argument("--health-check-timeout-secs", type=float, default=d.health_check_timeout_secs)
    g.add_argument("--health-failure-threshold", type=int, default=d.health_failure_threshold)
    g.add_argument("--health-success-threshold", type=int, default=d.health_success_threshold)
    g.add_argument("--health-check-endpoint", default=d.health_check_endpoint)


def _add_serving_failure_args(parser: argparse.ArgumentParser, d: RouterConfig) -> None:
    g = parser.add_argument_group("failures while serving")
    g.add_argument(
        "--worker-stall-timeout",
        type=float,
        default=d.worker_stall_timeout,
        help="seconds a running stream may get no byte before its worker counts as hung",
    )
    g.add_argument(
        "--max-migrations",
        type=int,
        default=d.max_migrations,
        help="times a broken /generate stream is continued on another worker (0: end it with an error)",
    )


def _add_retry_args(parser: argparse.ArgumentParser, d: RouterConfig) -> None:
    g = parser.add_argument_group("retries and circuit breaker")
    g.add_argument("--retry-max-retries", type=int, default=d.retry_max_retries, help="attempts in total")
    g.add_argument("--retry-initial-backoff-ms", type=float, default=d.retry_initial_backoff_ms)
    g.add_argument("--retry-max-backoff-ms", type=float, default=d.retry_max_backoff_ms)
    g.add_argument("--retry-backoff-multiplier", type=float, default=d.retry_backoff_multiplier)
    g.add_argument("--retry-jitter-factor", type=float, default=d.retry_jitter_factor)
    g.add_argument("--disable-retries", action="store_true")
    g.add_argument("--cb-failure-threshold", type=int, default=d.cb_failure_threshold)
    g.add_argument("--cb-success-threshold", type=int, default=d.cb_success_threshold)
    g.add_argument("--cb-timeout-duration-secs", type=float, default=d.cb_timeout_duration_secs)
    g.add_argument("--disable-circuit-breaker", action="store_true")


def _add_admission_args(parser: argparse.ArgumentParser, d: RouterConfig) -> None:
    g = parser.add_argument_group("admission")
    g.add_argument(
        "--max-concurrent-requests", type=int, default=d.max_concurrent_requests, help="-1: no limit"
    )
    g.add_argument("--queue-size", type=int, default=d.queue_size)
    g.add_argument("--queue-timeout-secs", type=float, default=d.queue_timeout_secs)
    g.add_argument("--request-timeout-secs", type=float, default=d.request_timeout_secs)
    g.add_argument("--max-payload-size", type=int, default=d.max_payload_size, help="bytes")
    g.add_argument("--shutdown-grace-period-secs", type=float, default=d.shutdown_grace_period_secs)


def _add_auth_args(parser: argparse.ArgumentParser, d: RouterConfig) -> None:
    g = parser.add_argument_group("auth")
    g.add_argument("--api-key", default=None, help="clients must send 'Authorization: Bearer KEY'")
    g.add_argument("--worker-api-key", default=None, help="key sent to workers (default: --api-key)")
    g.add_argument("--admin-api-key", default=None, help="key for /workers management (default: --api-key)")


def _add_observability_args(parser: argparse.ArgumentParser, d: RouterConfig) -> None:
    g = parser.add_argument_group("observability")
    g.add_argument("--log-level", default=d.log_level, choices=["debug", "info", "warn", "warning", "error"])
    g.add_argument(
        "--prometheus-port",
        type=int,
        default=None,
        help="also serve /metrics on this port (always served on --port)",
    )
    g.add_argument("--prometheus-host", default=d.prometheus_host)
    g.add_argument("--request-id-headers", nargs="*", default=list(d.request_id_headers))


def _add_discovery_args(parser: argparse.ArgumentParser, d: RouterConfig) -> None:
    g = parser.add_argument_group("Kubernetes service discovery")
    g.add_argument("--service-discovery", action="store_true")
    g.add_argument("--selector", nargs="+", default=[], metavar="KEY=VALUE")
    g.add_argument("--prefill-selector", nargs="+", default=[], metavar="KEY=VALUE")
    g.add_argument("--decode-selector", nargs="+", default=[], metavar="KEY=VALUE")
    g.add_argument("--service-discovery-port", type=int, default=d.service_discovery_port)
    g.add_argument("--service-discovery-namespace", default=None)
    g.add_argument("--bootstrap-port-annotation", default=d.bootstrap_port_annotation)


def config_from_args(args: argparse.Namespace) -> RouterConfig:
    values = dict(vars(args))
    values["prefill"] = tuple(_prefill_spec(p) for p in args.prefill)
    values["decode"] = tuple(args.decode)
    values["worker_urls"] = tuple(args.worker_urls)
    values["request_id_headers"] = tuple(h.lower() for h in args.request_id_headers)
    for name in ("selector", "prefill_selector", "decode_selector"):
        values[name] = _selector(getattr(args, name))
    return RouterConfig(**values)


def _prefill_spec(values: list[str]) -> PrefillSpec:
    if len(values) > 2:
        raise ValueError(f"--prefill takes URL [BOOTSTRAP_PORT], got {' '.join(values)}")
    port = values[1] if len(values) == 2 else None
    if port is not None and port.lower() == "none":
        port = None
    try:
        return PrefillSpec(values[0], int(port) if port is not None else None)
    except ValueError:
        raise ValueError(
            f"--prefill {values[0]}: bootstrap port {port!r} is not a number or 'none'"
        ) from None


def _selector(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"selector {pair!r} is not KEY=VALUE")
        out[key] = value
    return out


_LOG_LEVELS = {"debug": "debug", "info": "info", "warn": "warning", "warning": "warning", "error": "error"}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="launch_router", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_router_args(parser)
    args = parser.parse_args(argv)
    try:
        config = config_from_args(args)
        config.validate()
    except ValueError as exc:
        parser.error(str(exc))
    logging.basicConfig(
        level=_LOG_LEVELS[config.log_level].upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    serve(config)


def serve(config: RouterConfig) -> None:
    import uvicorn
    from disagg.router.app import create_app

    if config.prometheus_port is not None:
        from disagg.router.metrics import REGISTRY
        from prometheus_client import start_http_server

        start_http_server(config.prometheus_port, addr=config.prometheus_host, registry=REGISTRY)
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(config),
            host=config.host,
            port=config.port,
            log_level=_LOG_LEVELS[config.log_level],
            access_log=False,
            proxy_headers=False,
            timeout_graceful_shutdown=config.shutdown_grace_period_secs,
        )
    )
    server.run()


if __name__ == "__main__":
    sys.exit(main())
