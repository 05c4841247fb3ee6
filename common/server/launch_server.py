"""`launch_server`: the colocated server (HTTP + scheduler + detokenizer processes).

    launch_server                                  # embedded default model on 127.0.0.1:30000
    launch_server --model-path DIR --port 8000 --api-key KEY --max-running-requests 64

Start-up: spawn the scheduler (loads the model) and the detokenizer, wait until both say ready,
then serve HTTP in this process. SIGINT/SIGTERM: answer 503 to new requests, let running ones
finish within --grace-period seconds (then abort them), stop HTTP, stop the children. Children
die with this process (PR_SET_PDEATHSIG), so none outlives it.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import functools
import logging
import multiprocessing as mp
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import uvicorn
from disagg.common.config import (
    PD_ROLES,
    DisaggConfig,
    EngineConfig,
    add_disagg_args,
    add_engine_args,
    cuda_visible_devices_for_children,
)
from disagg.common.models.model_files import resolve_model_path
from disagg.common.server.data_parallel import (
    LOAD_BALANCE_METHODS,
    replica_gpus,
    run_data_parallel_controller,
)
from disagg.common.server.detokenizer import run_detokenizer_process
from disagg.common.server.http_server import create_app
from disagg.common.server.ipc import IpcNames
from disagg.common.server.metrics import ServerMetrics
from disagg.common.server.scheduler_process import run_scheduler_process
from disagg.common.server.serving import ServerState
from disagg.common.server.tokenizer_manager import TokenizerManager, load_tokenizer
from disagg.common.server.tool_parsers import PARSERS

logger = logging.getLogger("disagg.server")

READY_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 30000
    api_key: str | None = None
    admin_api_key: str | None = None  # /flush_cache, abort_all, aborting others' requests; None: --api-key
    served_model_name: str | None = None  # default: the model folder's name
    tokenizer_path: str | None = None  # default: the model path
    log_level: str = "info"
    max_request_body_size: int = 32 << 20  # bytes; larger bodies get 413
    grace_period: float = 30.0  # seconds running requests get to finish at shutdown
    tool_call_parser: str | None = None  # None: from the chat template (common/server/tool_parsers.py)
    # --dp-size > 1: how the dispatcher picks a replica (common/server/data_parallel.py)
    load_balance_method: str = "round_robin"
    base_gpu_id: int = 0  # the first GPU of replica 0; replica i takes tp GPUs from base + i * tp

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ServerConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in vars(args).items() if k in names})


def add_server_args(parser: argparse.ArgumentParser) -> None:
    d = ServerConfig()
    g = parser.add_argument_group("server")
    g.add_argument("--host", default=d.host)
    g.add_argument("--port", type=int, default=d.port)
    g.add_argument(
        "--api-key", default=d.api_key, help="require `Authorization: Bearer KEY` (all but /health)"
    )
    g.add_argument("--admin-api-key", default=d.admin_api_key,
                   help="the key for /flush_cache, abort_all and aborting other keys' requests (default: --api-key)")  # fmt: skip
    g.add_argument("--served-model-name", default=d.served_model_name)
    g.add_argument("--tokenizer-path", default=d.tokenizer_path)
    g.add_argument("--log-level", default=d.log_level, choices=["debug", "info", "warning", "error"])
    g.add_argument("--max-request-body-size", type=int, default=d.max_request_body_size, help="bytes")
    g.add_argument("--tool-call-parser", default=d.tool_call_parser, choices=sorted(PARSERS),
                   help="how tool calls are read from the output (default: from the chat template)")  # fmt: skip
    g.add_argument("--grace-period", "--graceful-shutdown-timeout", dest="grace_period", type=float,
                   default=d.grace_period, help="seconds running requests may finish after SIGTERM")  # fmt: skip
    g.add_argument("--load-balance-method", default=d.load_balance_method, choices=LOAD_BALANCE_METHODS,
                   help="--dp-size > 1: the replica for each request (shortest_queue: fewest requests held, "
                        "minimum_tokens: fewest tokens held)")  # fmt: skip
    g.add_argument("--base-gpu-id", type=int, default=d.base_gpu_id,
                   help="first GPU this server uses; data parallel replica i uses tp GPUs from base + i * tp")  # fmt: skip


class DrainingServer(uvicorn.Server):
    """uvicorn, except that a signal first drains: 503 for new requests, running ones finish."""

    def __init__(self, config: uvicorn.Config, state: ServerState, grace_period: float, children=()):
        super().__init__(config)
        self.state, self.grace_period, self.children = state, grace_period, list(children)
        self.drain_task: asyncio.Task | None = None
        self.exit_code = 0

    def handle_exit(self, sig, frame) -> None:
        # NOTE: runs in the signal handler; not recorded in _captured_signals, so uvicorn does not
        # re-raise it after serving and we get to stop the children ourselves.
        if self.state.draining:
            self.should_exit = True  # a second signal: stop now
            return
        logger.info("signal %s: draining (grace period %.0fs)", sig, self.grace_period)
        self.state.draining = True

    async def on_tick(self, counter: int) -> bool:
        if self.state.draining and self.drain_task is None:
            self.drain_task = asyncio.create_task(self.drain())
        if self.drain_task is not None and self.drain_task.done():
            return True
        if counter % 10 == 0:
            dead = [p.name for p in self.children if not p.is_alive()]
            if dead:
                logger.error("%s exited unexpectedly: shutting down", ", ".join(dead))
                self.exit_code = 1
                return True
        return await super().on_tick(counter)

    async def drain(self) -> None:
        deadline = time.monotonic() + self.grace_period
        while self.state.tm.num_in_flight and time.monotonic() < deadline and not self.should_exit:
            await asyncio.sleep(0.05)
        if self.state.tm.num_in_flight:
            logger.warning("grace period over: aborting %d requests", self.state.tm.abort())
            await asyncio.sleep(0.5)  # let the abort outputs reach their clients


def tokenizer_path_for(engine: EngineConfig, server: ServerConfig) -> str:
    """--tokenizer-path, else the model's folder; a dummy preset (no files) borrows the default model's."""
    if server.tokenizer_path:
        return server.tokenizer_path
    if os.path.isdir(engine.model_path):
        return engine.model_path
    # NOTE: a dummy load of a name that is no folder is a preset (the scheduler refuses any other
    # name, listing the presets). Not checked against the presets' table here: its module imports
    # torch, seconds on a GPU machine before the scheduler process could start loading the model
    if engine.load_format == "dummy":
        logger.warning("%s is a preset without a tokenizer: using the default model's", engine.model_path)
        return resolve_model_path(None)
    return engine.model_path


def num_replicas(engine: EngineConfig) -> int:
    """Engine replicas behind this server: --dp-size, unless DP attention uses it inside one engine."""
    return 1 if getattr(engine, "enable_dp_attention", False) else max(1, engine.dp_size)


def with_data_parallel(engine: EngineConfig, server: ServerConfig, scheduler_target: Callable,
                       role: str = "server", replica_services: Callable | None = None) -> Callable:  # fmt: skip
    """--dp-size N > 1 (without DP attention): the scheduler process becomes the dispatcher of N replicas
    (a prefill's: each room to replica room % N, where the decode looks for it). `replica_services()`
    runs in the controller before the replicas start (a prefill's bootstrap server)."""
    if num_replicas(engine) == 1:
        return scheduler_target
    if engine.nnodes > 1:
        raise RuntimeError("--dp-size replicas run on one node (not yet with --nnodes > 1)")
    return functools.partial(run_data_parallel_controller, scheduler_target=scheduler_target,
                             method=server.load_balance_method, base_gpu_id=server.base_gpu_id,
                             route_by_room=role == "prefill", services=replica_services)  # fmt: skip


def start_children(engine: EngineConfig, server: ServerConfig, ipc: IpcNames, scheduler_target: Callable):
    ctx = mp.get_context("spawn")
    specs = [
        ("scheduler", scheduler_target, (engine, ipc)),
        ("detokenizer", run_detokenizer_process, (server.tokenizer_path, ipc)),
    ]
    procs, conns = [], []
    # --base-gpu-id with one replica: its GPUs (dp > 1: the dispatcher gives each replica its own)
    gpus = (
        replica_gpus(engine, server.base_gpu_id, 0)
        if num_replicas(engine) == 1 and server.base_gpu_id
        else None
    )
    for name, target, args in specs:
        recv_end, send_end = ctx.Pipe(duplex=False)
        proc = ctx.Process(
            target=target, args=(*args, send_end, server.log_level), name=f"disagg-{name}", daemon=True
        )
        with cuda_visible_devices_for_children(gpus):
            proc.start()
        send_end.close()
        procs.append(proc)
        conns.append(recv_end)
    return procs, conns


def wait_ready(procs, conns) -> list[dict]:
    """Each child's ready record; raises if one fails or dies first."""
    infos, deadline = [], time.monotonic() + READY_TIMEOUT_S
    for proc, conn in zip(procs, conns, strict=True):
        while not conn.poll(0.2):
            if not proc.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"{proc.name} died or hung during start-up (exit code {proc.exitcode})")
        try:
            info = conn.recv()
        except EOFError:
            raise RuntimeError(f"{proc.name} exited during start-up (exit code {proc.exitcode})") from None
        if info.get("status") != "ready":
            raise RuntimeError(f"{proc.name} failed to start:\n{info.get('error')}")
        infos.append(info)
    return infos


def stop_children(procs, timeout: float = 5.0) -> None:
    for proc in procs:
        if proc.is_alive():
            proc.terminate()
    for proc in procs:
        proc.join(timeout)
        if proc.is_alive():
            proc.kill()
            proc.join(1.0)


def launch(engine: EngineConfig, server: ServerConfig, scheduler_target: Callable = run_scheduler_process,
           role: str = "server", extra_info: dict | None = None,
           replica_services: Callable | None = None) -> None:  # fmt: skip
    """Run a server until a signal stops it. Prefill/decode servers pass their own scheduler target."""
    engine = engine.replace(model_path=resolve_model_path(engine.model_path))
    server = dataclasses.replace(server, tokenizer_path=tokenizer_path_for(engine, server))
    ipc = IpcNames.new()
    procs, conns = start_children(
        engine, server, ipc, with_data_parallel(engine, server, scheduler_target, role, replica_services)
    )
    try:
        infos = wait_ready(procs, conns)
        tokenizer = load_tokenizer(server.tokenizer_path)
        metrics = ServerMetrics(role, num_replicas(engine))
        name = server.served_model_name or engine.model_path.rstrip("/").rsplit("/", 1)[-1]
        info = {**dataclasses.asdict(engine), **dataclasses.asdict(server), **(extra_info or {}), "api_key": None, "admin_api_key": None,
                "role": role, "pd_identity": infos[0].get("pd_identity")}  # fmt: skip
        state = ServerState(TokenizerManager(tokenizer, ipc, infos[0]["context_length"], metrics), metrics,
                            name, engine.model_path, infos[0]["context_length"], info)  # fmt: skip
        app = create_app(state, server.api_key, server.max_request_body_size, server.admin_api_key)
        config = uvicorn.Config(app, host=server.host, port=server.port, log_level=server.log_level,
                                timeout_graceful_shutdown=5, access_log=server.log_level == "debug")  # fmt: skip
        logger.info("serving %s on http://%s:%d", name, server.host, server.port)
        http = DrainingServer(config, state, server.grace_period, procs)
        http.run()
        if http.exit_code:
            raise RuntimeError("a server process died")
    finally:
        stop_children(procs)
        ipc.cleanup()
        logger.info("server stopped")


def role_parser(role: str) -> argparse.ArgumentParser:
    """The flags of `role`: the engine's and the server's; a PD role's also the disaggregation's."""
    pd = role in PD_ROLES
    parser = argparse.ArgumentParser(prog=f"launch_{role}", description=__doc__.split("\n\n")[0]
                                     if not pd else f"The {role} server of a PD deployment")  # fmt: skip
    add_engine_args(parser)
    add_server_args(parser)
    if pd:
        add_disagg_args(parser)
        parser.add_argument("--disaggregation-mode", choices=PD_ROLES, default=role, help=argparse.SUPPRESS)
    else:
        parser.add_argument("--disaggregation-mode", choices=["null", *PD_ROLES], default="null",
                            help="prefill / decode: run as a PD server (same as launch_prefill / launch_decode)")  # fmt: skip
    return parser


def run_role(role: str, argv: list[str] | None = None, scheduler_cls=None, worker_hook=None,
             replica_services=None) -> None:  # fmt: skip
    """Parse the flags of `role` and serve until stopped: the colocated server ("server") or a PD
    server ("prefill"/"decode"), whose `scheduler_cls(config, disagg=...)` runs on rank 0 and
    `worker_hook(disagg, engine, runner)` on the other ranks (the KV transfer of each rank).
    `replica_services(disagg)`: with --dp-size replicas, what their controller runs for all of them
    (data_parallel.DataParallelController: the prefill's bootstrap server)."""
    pd = role in PD_ROLES
    args = role_parser(role).parse_args(argv)
    log_name = "http" if not pd else f"{role}-http"
    logging.basicConfig(level=getattr(logging, args.log_level.upper()),
                        format=f"%(asctime)s [{log_name}] %(levelname)s %(name)s: %(message)s")  # fmt: skip
    engine = EngineConfig.from_args(args)
    make_scheduler, hook, info, services = None, None, None, None
    if pd:
        disagg = DisaggConfig.from_args(args, role)
        make_scheduler = functools.partial(scheduler_cls, disagg=disagg)
        hook = functools.partial(worker_hook, disagg, engine)
        info = {f"disaggregation_{k}": v for k, v in dataclasses.asdict(disagg).items()}
        services = functools.partial(replica_services, disagg) if replica_services else None
    if engine.node_rank != 0:  # a node other than 0 runs only its ranks; rank 0's node serves HTTP
        from disagg.common.parallel.ranks import run_node

        sys.exit(run_node(engine, hook))
    target = functools.partial(run_scheduler_process, make_scheduler=make_scheduler, name=f"{role}-scheduler",
                               **({"plan_hook_factory": hook} if hook else {}))  # fmt: skip
    try:
        server = ServerConfig.from_args(args)
        launch(engine, server, target, role=role, extra_info=info, replica_services=services)
    except RuntimeError as e:
        logger.error("%s", e)
        sys.exit(1)


def main(argv: list[str] | None = None) -> None:
    mode = argparse.ArgumentParser(add_help=False)
    mode.add_argument("--disaggregation-mode", choices=["null", *PD_ROLES], default="null")
    known, _ = mode.parse_known_args(argv)
    if known.disaggregation_mode != "null":  # SGLang's spelling of launch_prefill / launch_decode
        import importlib

        importlib.import_module(f"disagg.{known.disaggregation_mode}.launch").main(argv)
        return
    run_role("server", argv)


if __name__ == "__main__":
    main()
