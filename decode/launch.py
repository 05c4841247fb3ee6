"""`launch_decode`: a decode server (also `launch_server --disaggregation-mode decode`).

    launch_decode --port 30001
    launch_router --pd-disaggregation --prefill http://127.0.0.1:30000 8998 --decode http://127.0.0.1:30001

The same front end as launch_server (HTTP, detokenizer), with `DecodeScheduler` and the KV
receiver of every TP rank behind it. See docs/pd.md.
"""

from __future__ import annotations

from disagg.common.server.launch_server import run_role

# NOTE: the scheduler and the KV receiver are imported where they run (the scheduler process, the
# worker ranks): spawn re-imports this module in every child, and importing torch here would cost
# the HTTP process and the detokenizer ~250 MB each


def make_scheduler(config, disagg):
    from disagg.decode.scheduler import create_decode_scheduler  # noqa: PLC0415

    return create_decode_scheduler(config, disagg)


def make_worker_hook(disagg, engine, runner):
    from disagg.decode.ranks import make_worker_hook as make  # noqa: PLC0415

    return make(disagg, engine, runner)


def main(argv: list[str] | None = None) -> None:
    run_role("decode", argv, make_scheduler, make_worker_hook)


if __name__ == "__main__":
    main()
