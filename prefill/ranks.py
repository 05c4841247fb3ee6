"""What every TP rank of a prefill server runs beside the forward: its KV sender.

Rank 0's sender also serves the bootstrap (decode ranks ask it where each prefill rank listens);
the other ranks, on any node, register with it once it is up. With --dp-size N replicas, replica 0's
rank 0 serves it for every replica's ranks (each registers under its replica).
"""

from __future__ import annotations

from disagg.common.config import DisaggConfig, EngineConfig, dp_replica
from disagg.common.server.ipc import die_with_parent
from disagg.transfer import KVSender
from disagg.transfer.coordinator import RankTransfer, WorkerTransferHook, create_on_every_rank, kv_layout


def create_sender(disagg: DisaggConfig, runner, engine: EngineConfig) -> RankTransfer:
    rank0_host = engine.dist_init_addr.rsplit(":", 1)[0] if engine.nnodes > 1 else "127.0.0.1"
    dp_rank, dp_size = dp_replica()  # --dp-size replicas: replica 0's rank 0 serves the bootstrap for all

    def make() -> RankTransfer:
        sender = KVSender(runner.pool.kv_buffer, kv_layout(runner), rank0_host, disagg.bootstrap_port,
                          host=disagg.transfer_host, timeout_s=disagg.transfer_timeout, ib_device=disagg.ib_device,
                          dp_rank=dp_rank, dp_size=dp_size)  # fmt: skip
        return RankTransfer(sender)

    return create_on_every_rank(make)


def make_worker_hook(disagg: DisaggConfig, engine: EngineConfig, runner) -> WorkerTransferHook:
    """Runs in each worker rank (picklable through functools.partial): its sender's operations."""
    die_with_parent()  # a worker rank of a server: gone when rank 0's process is
    return WorkerTransferHook(create_sender(disagg, runner, engine))
