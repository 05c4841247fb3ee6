"""`launch_decode`: a decode server (also `launch_server --disaggregation-mode decode`).

    launch_decode --port 30001
    launch_router --pd-disaggregation --prefill http://127.0.0.1:30000 8998 --decode http://127.0.0.1:30001

The same front end as launch_server (HTTP, detokenizer), with `DecodeScheduler` and the KV
receiver of every TP rank behind it. See docs/pd.md.
"""

from __future__ import annotations

from disagg.common.server.launch_server import run_role
from disagg.decode.ranks import make_worker_hook
from disagg.decode.scheduler import DecodeScheduler


def main(argv: list[str] | None = None) -> None:
    run_role("decode", argv, DecodeScheduler, make_worker_hook)


if __name__ == "__main__":
    main()
