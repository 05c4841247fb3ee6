"""What every TP rank of a decode server runs beside the forward: its KV receiver."""

from __future__ import annotations

from disagg.common.config import DisaggConfig, EngineConfig
from disagg.common.server.ipc import die_with_parent
from disagg.transfer import KVReceiver
from disagg.transfer.coordinator import RankTransfer, WorkerTransferHook, create_on_every_rank, kv_layout


def create_receiver(disagg: DisaggConfig, runner) -> RankTransfer:
    def make() -> RankTransfer:
        receiver = KVReceiver(runner.pool.kv_buffer, kv_layout(runner), timeout_s=disagg.transfer_timeout,
                              ib_device=disagg.ib_device)  # fmt: skip
        return RankTransfer(receiver)

    return create_on_every_rank(make)


def make_worker_hook(disagg: DisaggConfig, engine: EngineConfig, runner) -> WorkerTransferHook:
    """Runs in each worker rank (picklable through functools.partial): its receiver's operations."""
    die_with_parent()  # a worker rank of a server: gone when rank 0's process is
    return WorkerTransferHook(create_receiver(disagg, runner))
