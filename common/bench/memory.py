"""Memory of a whole deployment: RSS and PSS summed over the process tree of a command.

    python -m disagg.common.bench.memory                          # launch_local, the default model
    python -m disagg.common.bench.memory -- launch_server --port 8100

Starts the command (default: `launch_local` on --port), waits until a chat completion answers,
sends a few requests, reads /proc/PID/smaps_rollup of every process of the tree (and whether it
mapped libtorch), prints one line per process and the sums, then stops the tree with SIGTERM.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx


def children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry.name))
    return out


def process_tree(pid: int) -> list[int]:
    todo, seen = [pid], []
    while todo:
        seen.append(todo.pop())
        todo += children(seen[-1])
    return seen


def memory_of(pid: int) -> tuple[int, int, bool, str] | None:
    """(RSS MiB, PSS MiB, maps libtorch, command) of one process; None if it is gone."""
    proc = Path(f"/proc/{pid}")
    try:
        fields = dict(line.split(":", 1) for line in (proc / "smaps_rollup").read_text().splitlines()[1:])
        torch = "libtorch" in (proc / "maps").read_text()
        cmd = (proc / "cmdline").read_text().replace("\0", " ")[:100]
    except OSError:
        return None
    return int(fields["Rss"].split()[0]) // 1024, int(fields["Pss"].split()[0]) // 1024, torch, cmd


def wait_ready(url: str, timeout: float) -> float:
    start = time.monotonic()
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8}
    while time.monotonic() - start < timeout:
        try:
            if httpx.post(url + "/v1/chat/completions", json=body, timeout=30).status_code == 200:
                return time.monotonic() - start
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f} s")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=18777, help="where the command serves")
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument(
        "command", nargs="*", help="after --: the command (default: launch_local --port PORT)"
    )
    args = parser.parse_args(argv)
    module = {
        "launch_local": "disagg.common.server.launch_local",
        "launch_server": "disagg.common.server.launch_server",
    }
    cmd = args.command or ["launch_local", "--port", str(args.port)]
    argv_ = [sys.executable, "-m", module.get(cmd[0], cmd[0]), *cmd[1:], "--log-level", "warning"]
    proc = subprocess.Popen(
        argv_, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        url = f"http://127.0.0.1:{args.port}"
        ready = wait_ready(url, args.timeout)
        for _ in range(4):
            httpx.post(url + "/v1/completions", json={"prompt": "The capital of France is", "max_tokens": 16},
                       timeout=60)  # fmt: skip
        rows = [(pid, m) for pid in process_tree(proc.pid) if (m := memory_of(pid))]
        for pid, (rss, pss, torch, command) in rows:
            print(
                f"{pid:>8} {rss:>6} MiB RSS {pss:>6} MiB PSS {'torch   ' if torch else 'no torch'} {command}"
            )
        print(f"ready after {ready:.1f} s; {len(rows)} processes; RSS {sum(m[0] for _, m in rows)} MiB, "
              f"PSS {sum(m[1] for _, m in rows)} MiB")  # fmt: skip
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


if __name__ == "__main__":
    main()
