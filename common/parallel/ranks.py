"""Distributed start-up (one process per rank) and the per-step broadcast of batch plans.

Rank 0's scheduler decides every batch and broadcasts its plan (a typed message: the engine's
`BatchPlan`, a PD server's `TransferOpsMsg`, or `StopMsg`; msgpack-encoded) over a gloo group;
the other ranks run the same forward on their shard. NCCL (GPU) or gloo
(CPU) carries the activations. A rank that dies breaks the gloo connection: the others raise,
log it and exit non-zero instead of hanging.
"""

from __future__ import annotations

import datetime
import logging
import multiprocessing as mp
import sys
import time
from typing import Any

import torch
import torch.distributed as dist
from disagg.common.config import EngineConfig, set_default_cpu_threads
from disagg.common.messages import StopMsg, decode, encode
from disagg.common.net import free_port
from disagg.common.parallel.state import ParallelState, get_parallel, set_parallel

logger = logging.getLogger(__name__)
_IDLE_TIMEOUT = datetime.timedelta(days=365)  # workers wait for the next batch as long as rank 0 lives


def ranks_per_node(config: EngineConfig) -> int:
    if config.world_size % config.nnodes:
        pp = f" x --pp-size {config.pp_size}" if config.pp_size > 1 else ""
        raise ValueError(f"--tp {config.tp}{pp} must be divisible by --nnodes {config.nnodes}")
    return config.world_size // config.nnodes


def init_distributed(config: EngineConfig, rank: int) -> ParallelState:
    """Join the TP group as `rank` (blocks until all ranks arrive, at most --dist-timeout)."""
    local_rank = rank % ranks_per_node(config)
    use_cuda = config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available())
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not config.dist_init_addr:
        raise ValueError("--dist-init-addr HOST:PORT is required with --tp > 1")
    timeout = datetime.timedelta(seconds=config.dist_timeout)
    try:
        dist.init_process_group(
            "nccl" if use_cuda else "gloo",
            init_method=f"tcp://{config.dist_init_addr}",
            rank=rank,
            world_size=config.world_size,
            timeout=timeout,
        )
    except Exception as e:  # noqa: BLE001 - re-raised with the layout the user asked for
        raise RuntimeError(
            f"rank {rank}: the TP group of {config.world_size} ranks at {config.dist_init_addr} did not form within "
            f"--dist-timeout {config.dist_timeout}s ({e})"
        ) from e
    cpu_group = dist.new_group(backend="gloo", timeout=_IDLE_TIMEOUT)
    tp_rank, pp_rank = rank % config.tp, rank // config.tp
    ep = max(1, config.ep)
    moe_tp = config.tp // ep if config.tp % ep == 0 else 1
    state = ParallelState(
        tp_rank=tp_rank,
        tp_size=config.tp,
        ep_rank=tp_rank // moe_tp,
        ep_size=ep,
        group=dist.group.WORLD if config.pp_size == 1 else stage_group(config, pp_rank),
        cpu_group=cpu_group,
        pp_rank=pp_rank,
        pp_size=config.pp_size,
    )
    if config.enable_dp_attention:
        from disagg.common.parallel.dp_attention import init_dp_attention

        init_dp_attention(config, state)
    set_parallel(state)
    return state


def stage_group(config: EngineConfig, pp_rank: int):
    """The TP group of pipeline stage `pp_rank` (every rank creates every stage's group, in order)."""
    groups = [dist.new_group(list(range(s * config.tp, (s + 1) * config.tp))) for s in range(config.pp_size)]
    return groups[pp_rank]


def broadcast_plan(plan: Any) -> Any:
    """Rank 0 sends `plan` (a message); every other rank receives and returns it."""
    group = get_parallel().cpu_group
    if get_parallel().rank == 0:
        payload = torch.frombuffer(bytearray(encode(plan)), dtype=torch.uint8)
        size = torch.tensor([payload.numel()], dtype=torch.long)
        dist.broadcast(size, 0, group=group)
        dist.broadcast(payload, 0, group=group)
        return plan
    size = torch.empty(1, dtype=torch.long)
    dist.broadcast(size, 0, group=group)
    payload = torch.empty(int(size.item()), dtype=torch.uint8)
    dist.broadcast(payload, 0, group=group)
    return decode(payload.numpy().tobytes())


def gather_to_rank0(obj) -> list | None:
    """Every rank contributes `obj` (msgpack-encodable); rank 0 gets the list by rank, others None."""
    group, state = get_parallel().cpu_group, get_parallel()
    payload = torch.frombuffer(bytearray(encode(obj)), dtype=torch.uint8)
    sizes = [torch.zeros(1, dtype=torch.long) for _ in range(state.world_size)]
    dist.all_gather(sizes, torch.tensor([payload.numel()], dtype=torch.long), group=group)
    longest = max(int(s.item()) for s in sizes)
    padded = torch.zeros(longest, dtype=torch.uint8)
    padded[: payload.numel()] = payload
    parts = [torch.empty(longest, dtype=torch.uint8) for _ in range(state.world_size)]
    dist.all_gather(parts, padded, group=group)
    if state.rank != 0:
        return None
    return [decode(p[: int(s.item())].numpy().tobytes()) for p, s in zip(parts, sizes, strict=True)]


_LEFT_KEY = "disagg/ranks_left"  # in the group's store: how many ranks > 0 have left the group


def stop_workers(timeout: float = 10.0) -> None:
    """Rank 0: tell the other ranks to stop, then wait (at most `timeout` s) until each has left
    the process group, so rank 0 closes its connections last, into a quiet group: when both ends
    of a gloo connection close at once, gloo now and then aborts one of the two processes (a
    rank of a second node exited with SIGABRT after a clean stop)."""
    state = get_parallel()
    if state.world_size == 1 or state.rank != 0:
        return
    store = dist.distributed_c10d._get_default_store()
    broadcast_plan(StopMsg())
    deadline, left = time.monotonic() + timeout, 0
    while (left := store.add(_LEFT_KEY, 0)) < state.world_size - 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    if left < state.world_size - 1:
        logger.warning("%d of %d ranks left the group within %.0fs", left, state.world_size - 1, timeout)


def _leave_group() -> None:
    """A rank > 0: leave the process group, then count itself out in the group's store (which
    rank 0 serves until it has left too; see stop_workers). At most 5 s: rank 0's node may be gone."""
    store = dist.distributed_c10d._get_default_store()
    dist.destroy_process_group()
    try:
        store.set_timeout(datetime.timedelta(seconds=5))
        store.add(_LEFT_KEY, 1)
    except Exception:  # noqa: BLE001 - rank 0 gone: nobody waits for the count
        pass


def worker_main(config: EngineConfig, rank: int, plan_hook_factory=None) -> None:
    """Entry point of a rank > 0: run every forward that rank 0 broadcasts, until told to stop.

    `plan_hook_factory(runner)` (picklable; optional) builds a callable that gets every message
    other than a batch plan: the PD servers run their per-rank KV transfer operations there."""
    logging.basicConfig(level=logging.INFO, format=f"[rank {rank}] %(asctime)s %(levelname)s %(message)s")
    try:
        init_distributed(config, rank)
        from disagg.common.engine.model_runner import BatchPlan, ModelRunner
        from disagg.common.models.eplb import RebalanceMsg
        from disagg.common.parallel.dp_attention import DPBatchPlan, run_dp_plan

        runner = ModelRunner(config)
        hook = plan_hook_factory(runner) if plan_hook_factory is not None else None
        while True:
            msg = broadcast_plan(None)
            if isinstance(msg, StopMsg):
                break
            if isinstance(msg, BatchPlan):
                runner.forward_plan(msg)
            elif isinstance(msg, DPBatchPlan):  # DP attention: this rank's DP rank's batch
                run_dp_plan(runner, msg)
            elif isinstance(msg, RebalanceMsg):  # EPLB: rank 0 re-placed the experts
                runner.eplb.apply(msg)
            elif hook is not None:
                hook(msg)
    except Exception as e:  # noqa: BLE001 - any failure takes the group down loudly
        logger.exception("rank %d exiting: %s", rank, e)  # with the traceback: the cause on a GPU run
        sys.exit(1)
    finally:
        if dist.is_initialized():
            _leave_group()


def spawn_workers(config: EngineConfig, ranks: list[int], plan_hook_factory=None) -> list[mp.Process]:
    ctx = mp.get_context("spawn")
    procs = []
    for rank in ranks:
        args = (config, rank, plan_hook_factory)
        p = ctx.Process(target=worker_main, args=args, daemon=True, name=f"disagg-rank{rank}")
        p.start()
        procs.append(p)
    return procs


def with_local_init_addr(config: EngineConfig) -> EngineConfig:
    """Single-node default for --dist-init-addr: a free loopback port."""
    if config.world_size > 1 and not config.dist_init_addr:
        return config.replace(dist_init_addr=f"127.0.0.1:{free_port()}")
    return config


def cpu_threads_env(config: EngineConfig) -> None:
    set_default_cpu_threads(ranks_per_node(config))


def check_layout(config: EngineConfig) -> None:
    """Fail before any process starts when the model cannot be split as asked."""
    from disagg.common.models.decoder import check_tp_layout
    from disagg.common.models.model_files import resolve_model_path
    from disagg.common.models.weights import PRESETS, load_config

    path = config.model_path if config.model_path in PRESETS else resolve_model_path(config.model_path)
    ranks_per_node(config)
    if not 0 <= config.node_rank < config.nnodes:
        raise ValueError(f"--node-rank {config.node_rank} must be in [0, --nnodes {config.nnodes})")
    if config.nnodes > 1 and not config.dist_init_addr:
        raise ValueError("--dist-init-addr HOST:PORT (rank 0's node) is required with --nnodes > 1")
    if config.enable_dp_attention:
        from disagg.common.parallel.dp_attention import check_dp_attention

        check_dp_attention(config)
    check_tp_layout(load_config(path), config.tp, config.ep, config.attn_tp_size)
    if config.pp_size > 1:
        from disagg.common.parallel.pipeline import check_pp_layout

        check_pp_layout(load_config(path), config)


def local_ranks(config: EngineConfig) -> list[int]:
    n = ranks_per_node(config)
    return list(range(config.node_rank * n, (config.node_rank + 1) * n))


def run_node(config: EngineConfig, plan_hook_factory=None) -> int:
    """A node other than 0: run its ranks until they stop; non-zero if any failed.
    `plan_hook_factory`: see worker_main (the PD servers' ranks run their KV transfers there)."""
    check_layout(config)
    cpu_threads_env(config)
    procs = spawn_workers(config, local_ranks(config), plan_hook_factory)
    code = 0
    for p in procs:
        p.join()
        if p.exitcode:
            logger.error("%s exited with code %s", p.name, p.exitcode)
            code = code or p.exitcode
            for other in procs:  # one rank down takes the node down
                if other.is_alive():
                    other.terminate()
    return code


def main() -> None:
    import argparse

    from disagg.common.config import add_engine_args

    parser = argparse.ArgumentParser(
        description="Run this node's ranks of a multi-node TP group (node rank > 0)"
    )
    add_engine_args(parser)
    config = EngineConfig.from_args(parser.parse_args())
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    sys.exit(run_node(config))


if __name__ == "__main__":
    main()
