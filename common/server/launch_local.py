"""`launch_local`: a whole PD deployment on this machine — router, one prefill and one decode server.

    launch_local                                   # embedded default model, router on 127.0.0.1:8000
    launch_local --port 9000 --prefill-tp 1 --decode-tp 2 -- --max-running-requests 64

Everything after `--` goes to both servers. The servers pick free ports; the router's URL is
printed once everything answers. With GPUs, prefill gets the first --prefill-tp of them and decode
the next --decode-tp (CUDA_VISIBLE_DEVICES). Ctrl-C (or SIGTERM) stops all three; so does any of them dying.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import signal
import subprocess
import sys
import time

import httpx
from disagg.common.config import cuda_visible_devices, env_cpu_threads, share_of_cores
from disagg.common.net import free_port

READY_TIMEOUT_S = 600.0


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
    """Prefill gets the first --prefill-tp GPUs, decode the next --decode-tp (none on a CPU machine)."""
    gpus, p, d = visible_gpus(), args.prefill_tp, args.decode_tp
    if not gpus:
        return {"prefill": {}, "decode": {}}
    if len(gpus) < p + d:
        raise RuntimeError(f"--prefill-tp {p} + --decode-tp {d} needs {p + d} GPUs, {len(gpus)} visible")
    return {"prefill": {"CUDA_VISIBLE_DEVICES": ",".join(gpus[:p])},
            "decode": {"CUDA_VISIBLE_DEVICES": ",".join(gpus[p : p + d])}}  # fmt: skip


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
    commands, env = build_commands(args, extra), server_env(args)
    procs: dict[str, subprocess.Popen] = {}
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        gpus = gpu_envs(args)
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
    except RuntimeError as e:
        print(f"launch_local: {e}", file=sys.stderr, flush=True)
        return 1
    finally:
        stop(procs)


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
    sys.exit(run(parser.parse_args(ours), extra))


if __name__ == "__main__":
    main()
