"""What every TP rank of a prefill server runs beside the forward: its KV sender.

Rank 0's sender also serves the bootstrap (decode ranks ask it where each prefill rank listens);
the other ranks, on any node, register with it once it is up. Each rank registers under its
"DP rank": with --enable-dp-attention its attention DP rank (the decode asks for room r's DP rank
r % D and gets that DP rank's ranks); with --dp-size N replicas its replica, and then the
replicas' controller serves the bootstrap (it outlives any one replica), not a replica's rank 0.
"""

from __future__ import annotations

from disagg.common.config import DisaggConfig, EngineConfig, dp_replica
from disagg.common.parallel.state import get_parallel
from disagg.common.server.ipc import die_with_parent
from disagg.transfer import KVSender
from disagg.transfer.coordinator import RankTransfer, WorkerTransferHook, create_on_every_rank, kv_layout


def sender_dp_place() -> tuple[int, int, bool | None]:
    """(dp_rank, dp_size, serve_bootstrap) this rank registers with: DP attention's DP rank (rank 0
    serves), else its --dp-size replica (the controller serves; None: rank 0 of a lone engine)."""
    par = get_parallel()
    if par.attn_dp_size > 1:
        return par.attn_dp_rank, par.attn_dp_size, None
    dp_rank, dp_size = dp_replica()
    return dp_rank, dp_size, (False if dp_size > 1 else None)


def create_sender(disagg: DisaggConfig, runner, engine: EngineConfig) -> RankTransfer:
    rank0_host = engine.dist_init_addr.rsplit(":", 1)[0] if engine.nnodes > 1 else "127.0.0.1"
    dp_rank, dp_size, serve = sender_dp_place()

    def make() -> RankTransfer:
        sender = KVSender(runner.pool.kv_buffer, kv_layout(runner), rank0_host, disagg.bootstrap_port,
                          serve_bootstrap=serve, host=disagg.transfer_host, timeout_s=disagg.transfer_timeout,
                          ib_device=disagg.ib_device, dp_rank=dp_rank, dp_size=dp_size)  # fmt: skip
        return RankTransfer(sender)

    return create_on_every_rank(make)


def make_worker_hook(disagg: DisaggConfig, engine: EngineConfig, runner) -> WorkerTransferHook:
    """Runs in each worker rank (picklable through functools.partial): its sender's operations."""
    die_with_parent()  # a worker rank of a server: gone when rank 0's process is
    return WorkerTransferHook(create_sender(disagg, runner, engine))
