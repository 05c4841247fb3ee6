"""`launch_local`: a whole PD deployment on this machine — router, one prefill and one decode server.

    launch_local                                   # embedded default model, router on 127.0.0.1:8000
    launch_local --port 9000 --prefill-tp 1 --decode-tp 2 -- --max-running-requests 64

Everything after `--` goes to both servers. The servers pick free ports; the router's URL is
printed once everything answers. With GPUs, prefill gets the first --prefill-tp of them and decode
the next --decode-tp (CUDA_VISIBLE_DEVICES). With fewer GPUs than that (one GPU, say) the two share:
decode takes the first --decode-tp GPUs too, each server holds `--mem-fraction-static 0.4` of a GPU
unless the arguments after `--` give a budget, and both run under a private NVIDIA MPS daemon
(their kernels side by side; `--no-mps`: time-sliced), the prefill on --prefill-sm-percent of the SMs
if given (docs/pd.md, "Prefill and decode on one GPU"). Ctrl-C (or SIGTERM) stops all three; so does
any of them dying.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from disagg.common.config import cuda_visible_devices, env_cpu_threads, share_of_cores
from disagg.common.net import free_port
from disagg.common.server.mps import MpsDaemon

READY_TIMEOUT_S = 600.0
SHARED_MEM_FRACTION = "0.4"  # each server's share of a GPU the two share (weights, KV pool, workspace)


def _die_with_us() -> None:
    try:
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _interrupt(*_) -> None:
    # NOTE: the first SIGTERM starts the shutdown; a second one (a child's group-wide signal, an
    # impatient supervisor) must not escape from the clean-up in `finally` and kill us mid-stop
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise KeyboardInterrupt


def build_commands(args: argparse.Namespace, extra: list[str]) -> dict[str, tuple[list[str], str]]:
    """name -> (argv, URL answering once it is ready)."""
    py, host = sys.executable, args.host
    prefill_port, decode_port, bootstrap = free_port(), free_port(), free_port()
    model = ["--model-path", args.model_path] if args.model_path else []
    server = [*model, "--host", host, "--log-level", args.log_level, *extra]
    prefill = [py, "-m", "disagg.prefill.launch", "--port", str(prefill_port), "--tp", str(args.prefill_tp),
               "--disaggregation-bootstrap-port", str(bootstrap), *server]  # fmt: skip
    decode = [
        py,
        "-m",
        "disagg.decode.launch",
        "--port",
        str(decode_port),
        "--tp",
        str(args.decode_tp),
        *server,
    ]
    router = [py, "-m", "disagg.router.launch_router", "--pd-disaggregation", "--host", host, "--port", str(args.port),
              "--prefill", f"http://{host}:{prefill_port}", str(bootstrap), "--decode", f"http://{host}:{decode_port}"]  # fmt: skip
    return {
        "prefill": (prefill, f"http://{host}:{prefill_port}/health"),
        "decode": (decode, f"http://{host}:{decode_port}/health"),
        "router": (router, f"http://{host}:{args.port}/readiness"),
    }


def server_env(args: argparse.Namespace) -> dict[str, str]:
    # NOTE: on a CPU the two servers' ranks share the cores: oversubscribed torch kernels crawl
    ranks = args.prefill_tp + args.decode_tp
    return {**env_cpu_threads(share_of_cores(ranks)), **os.environ}


def visible_gpus() -> list[str]:
    visible = cuda_visible_devices()
    if visible is not None:
        return visible
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [str(i) for i, line in enumerate(out.splitlines()) if line.startswith("GPU ")]


def gpu_envs(args: argparse.Namespace) -> dict[str, dict[str, str]]:
    """Prefill gets the first --prefill-tp GPUs, decode the next --decode-tp; with fewer GPUs than
    both need, decode takes the first --decode-tp (they share). None on a CPU machine."""
    gpus, p, d = visible_gpus(), args.prefill_tp, args.decode_tp
    if not gpus:
        return {"prefill": {}, "decode": {}}
    if max(p, d) > len(gpus):
        raise RuntimeError(f"--prefill-tp {p} and --decode-tp {d} need {max(p, d)} GPUs, {len(gpus)} visible")
    decode = gpus[p : p + d] if len(gpus) >= p + d else gpus[:d]
    return {"prefill": {"CUDA_VISIBLE_DEVICES": ",".join(gpus[:p])},
            "decode": {"CUDA_VISIBLE_DEVICES": ",".join(decode)}}  # fmt: skip


def shared_gpus(envs: dict[str, dict[str, str]]) -> list[str]:
    """The GPUs both servers use."""
    ids = [
        set(filter(None, envs[n].get("CUDA_VISIBLE_DEVICES", "").split(","))) for n in ("prefill", "decode")
    ]
    return sorted(ids[0] & ids[1])


def with_memory_budget(extra: list[str]) -> list[str]:
    """The servers' arguments with SHARED_MEM_FRACTION each where they set no memory budget."""
    if any(a.split("=")[0] in ("--mem-fraction-static", "--max-total-tokens") for a in extra):
        return extra
    return [*extra, "--mem-fraction-static", SHARED_MEM_FRACTION]


def share(args: argparse.Namespace, envs: dict[str, dict[str, str]], root: Path) -> MpsDaemon | None:
    """Where the servers share GPUs: a started MPS daemon of our own (None with --no-mps or where it
    cannot start), its variables added to both environments and the prefill's SM share to its own."""
    if args.no_mps:
        if args.prefill_sm_percent:
            raise RuntimeError("--prefill-sm-percent needs MPS (drop --no-mps)")
        return None
    daemon = MpsDaemon(root / "mps")
    if not daemon.start(required=bool(args.prefill_sm_percent)):
        return None
    envs["prefill"].update(daemon.client_env(args.prefill_sm_percent))
    envs["decode"].update(daemon.client_env())
    return daemon


def wait_ready(procs: dict[str, subprocess.Popen], url: str, name: str) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        dead = [n for n, p in procs.items() if p.poll() is not None]
        if dead:
            raise RuntimeError(f"{', '.join(dead)} exited during start-up")
        try:
            if httpx.get(url, timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{name} not ready after {READY_TIMEOUT_S:.0f}s")


def stop(procs: dict[str, subprocess.Popen]) -> None:
    for p in procs.values():
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 15
    for p in procs.values():
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def run(args: argparse.Namespace, extra: list[str]) -> int:
    procs: dict[str, subprocess.Popen] = {}
    daemon: MpsDaemon | None = None
    signal.signal(signal.SIGTERM, _interrupt)
    scratch = tempfile.TemporaryDirectory(prefix="launch_local-")
    try:
        gpus = gpu_envs(args)
        shared = shared_gpus(gpus)
        if args.prefill_sm_percent and not shared:
            raise RuntimeError("--prefill-sm-percent: prefill and decode do not share a GPU here")
        if shared:
            extra = with_memory_budget(extra)
            daemon = share(args, gpus, Path(scratch.name))
            print(f"launch_local: prefill and decode share GPU {','.join(shared)} "
                  f"({'MPS' if daemon else 'time-sliced, no MPS'}"
                  f"{f', prefill on {args.prefill_sm_percent}% of the SMs' if args.prefill_sm_percent else ''})",
                  flush=True)  # fmt: skip
        commands, env = build_commands(args, extra), server_env(args)
        for name in ("prefill", "decode"):
            procs[name] = subprocess.Popen(
                commands[name][0], env={**env, **gpus[name]}, preexec_fn=_die_with_us
            )
        for name in ("prefill", "decode"):
            wait_ready(procs, commands[name][1], name)
        procs["router"] = subprocess.Popen(commands["router"][0], env=env, preexec_fn=_die_with_us)
        wait_ready(procs, commands["router"][1], "router")
        url = commands["router"][1].removesuffix("/readiness")
        print(f"\ndisagg PD deployment ready: {url}  (prefill {commands['prefill'][1].removesuffix('/health')}, "
              f"decode {commands['decode'][1].removesuffix('/health')})", flush=True)  # fmt: skip
        print(f"try: curl -s {url}/v1/chat/completions -d '{{\"messages\": [{{\"role\": \"user\", "
              f"\"content\": \"Hi\"}}], \"max_tokens\": 32}}'\n", flush=True)  # fmt: skip
        while all(p.poll() is None for p in procs.values()):
            time.sleep(0.5)
        dead = [n for n, p in procs.items() if p.poll() is not None]
        print(f"{', '.join(dead)} exited: stopping", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        return 0
    except (RuntimeError, OSError, subprocess.SubprocessError) as e:
        print(f"launch_local: {e}", file=sys.stderr, flush=True)
        return 1
    finally:
        stop(procs)
        if daemon is not None:
            daemon.stop()
        scratch.cleanup()


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    ours = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(prog="launch_local", description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=8000, help="the router's port (the URL clients use)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--model-path", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    parser.add_argument("--prefill-tp", type=int, default=1)
    parser.add_argument("--decode-tp", type=int, default=1)
    parser.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    parser.add_argument("--no-mps", action="store_true",
                        help="servers sharing a GPU: no MPS daemon (they time-slice it)")  # fmt: skip
    parser.add_argument("--prefill-sm-percent", type=int, default=None, choices=range(1, 101), metavar="1-100",
                        help="servers sharing a GPU under MPS: the prefill's share of the SMs (it checks its matrix "
                             "products under the cap at start-up: cuBLAS gave NaN at 85 on an H100; docs/pd.md)")  # fmt: skip
    sys.exit(run(parser.parse_args(ours), extra))


if __name__ == "__main__":
    main()
