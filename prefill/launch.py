"""`launch_prefill`: a prefill server (also `launch_server --disaggregation-mode prefill`).

    launch_prefill --port 30000 --disaggregation-bootstrap-port 8998
    launch_router --pd-disaggregation --prefill http://127.0.0.1:30000 8998 --decode http://127.0.0.1:30001

The same front end as launch_server (HTTP, detokenizer), with `PrefillScheduler` and the KV
sender of every TP rank behind it. See docs/pd.md.
"""

from __future__ import annotations

from disagg.common.server.launch_server import run_role

# NOTE: the scheduler and the KV sender are imported where they run (the scheduler process, the
# worker ranks): spawn re-imports this module in every child, and importing torch here would cost
# the HTTP process and the detokenizer ~250 MB each


def make_scheduler(config, disagg):
    from disagg.prefill.scheduler import create_prefill_scheduler  # noqa: PLC0415

    return create_prefill_scheduler(config, disagg)


def make_worker_hook(disagg, engine, runner):
    from disagg.prefill.ranks import make_worker_hook as make  # noqa: PLC0415

    return make(disagg, engine, runner)


def serve_bootstrap(disagg):
    """--dp-size replicas: their controller serves the bootstrap port, so it outlives any one replica."""
    from disagg.transfer.bootstrap import serve_for_replicas  # noqa: PLC0415

    return serve_for_replicas(disagg.bootstrap_port)


def main(argv: list[str] | None = None) -> None:
    run_role("prefill", argv, make_scheduler, make_worker_hook, replica_services=serve_bootstrap)


if __name__ == "__main__":
    main()
