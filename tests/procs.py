"""Every process a test starts goes through here: free ports, start in its own process group,
wait until it answers, stop the whole group, and die with the test process.

`Process` runs a command (a server, a router, a fake worker, another "node"); `spawn` runs a Python
function in a fresh interpreter (multiprocessing, spawn). Both die when the test process does, even
when it is killed (PR_SET_PDEATHSIG): a pytest run cut short by `timeout` leaves no server behind
holding memory on a shared machine.
"""

from __future__ import annotations

import ctypes
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
from disagg.common.net import free_port
from disagg.router import testing as router_testing

SPAWN = mp.get_context("spawn")
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform == "linux" else None  # loaded here, not after fork
_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """In a child: SIGKILL when the thread that started it ends (Linux; elsewhere a no-op)."""
    if _LIBC is not None:
        _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _preexec() -> Callable[[], None] | None:
    # NOTE: the death signal follows the starting *thread*: a child started from a short-lived
    # thread would be killed when that thread returns, so only the main thread's children get it.
    return die_with_parent if threading.current_thread() is threading.main_thread() else None


def kill_group(pid: int, sig: int = signal.SIGKILL) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass


def wait_until(predicate: Callable[[], object], timeout: float = 30.0, interval: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return False


class Process:
    """A command in its own process group that dies with the test process.

    `url` + `ready_path`: what `wait_ready` polls. Output goes to `log` (a path, kept), else to a
    temporary file removed by `stop()` (`output()` reads its tail), or with `quiet=False` to the
    test's own stdout; `pipe=True` pipes stdout instead (`wait_for_line`) and drops stderr.
    """

    def __init__(
        self,
        argv: list[str],
        url: str | None = None,
        ready_path: str = "/health",
        env: dict | None = None,
        quiet: bool = True,
        log: Path | None = None,
        pipe: bool = False,
    ):
        self.argv, self.url, self.ready_path = argv, url, ready_path
        self.env = dict(env or {})  # on top of the test process's environment at launch
        self.quiet, self.pipe = quiet, pipe
        self.log_path = log
        self._temp_log = log is None and quiet and not pipe
        self.proc: subprocess.Popen | None = None

    def launch(self) -> Process:
        """Start it; return at once (`wait_ready` waits)."""
        if self._temp_log:
            fd, name = tempfile.mkstemp(prefix="disagg-test-", suffix=".log")
            os.close(fd)
            self.log_path = Path(name)
        out = None
        if self.pipe:
            out = subprocess.PIPE
        elif self.log_path is not None:
            out = open(self.log_path, "w")  # noqa: SIM115 - the child owns it from here
        err = subprocess.DEVNULL if self.pipe else (subprocess.STDOUT if out is not None else None)
        self.proc = subprocess.Popen(self.argv, env={**os.environ, **self.env}, stdout=out, stderr=err, text=self.pipe,
                                     start_new_session=True, preexec_fn=_preexec())  # fmt: skip
        if out not in (None, subprocess.PIPE):
            out.close()
        return self

    def start(self, timeout: float = 30.0, wait_ready: bool = True) -> Process:
        self.launch()
        if wait_ready:
            try:
                self.wait_ready(timeout)
            except BaseException:
                self.stop()
                raise
        return self

    def wait_ready(self, timeout: float = 30.0, status: int | None = None, interval: float = 0.05) -> None:
        """Until `url + ready_path` answers (with `status`, if given); raises if the process exits."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.argv} exited with {self.proc.returncode}:\n{self.output()}")
            try:
                r = httpx.get(self.url + self.ready_path, timeout=5.0)
                if status is None or r.status_code == status:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(interval)
        raise TimeoutError(f"{self.url} not ready after {timeout}s:\n{self.output()}")

    def wait_for_line(self, text: str, timeout: float) -> str:
        """With pipe=True: read stdout until a line containing `text` (returned)."""
        deadline, line = time.monotonic() + timeout, ""
        while time.monotonic() < deadline and text not in line:
            line = self.proc.stdout.readline()
            if not line and self.proc.poll() is not None:
                raise RuntimeError(f"{self.argv} exited with {self.proc.returncode} before printing {text!r}")
        return line

    def output(self) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")[-5000:]

    def stop(self, sig: int = signal.SIGKILL, grace: float = 10.0, group: bool = True) -> None:
        """Send `sig` to the whole group (to the leader alone with group=False: it stops its own
        children), wait up to `grace`, then SIGKILL whatever is left of the group. Safe twice."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            if group:
                kill_group(self.proc.pid, sig)
            else:
                self.proc.send_signal(sig)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                pass
        kill_group(self.proc.pid)  # stragglers of the group, even after the leader exited
        self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        if self._temp_log and self.log_path is not None:
            self.log_path.unlink(missing_ok=True)

    def __enter__(self) -> Process:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def fake_worker(name: str, port: int | None = None, record: bool = True) -> Process:
    """`disagg.router.fake_worker` (steered over /_fake/*), the command router/testing.py defines."""
    spec = router_testing.fake_worker(name, port or free_port(), record)
    return Process(spec.argv, spec.url, spec.ready_path)


def router(args: list[str], port: int | None = None, quiet: bool = True, env: dict | None = None) -> Process:
    """Our router on 127.0.0.1, the command router/testing.py defines."""
    spec = router_testing.router(args, port or free_port(), quiet)
    return Process(spec.argv, spec.url, spec.ready_path, env=env, quiet=quiet)


def sglang_router(args: list[str], env: dict | None = None) -> Process:
    """SGLang's router (sglang-router, a test extra) on 127.0.0.1."""
    port = free_port()
    argv = [sys.executable, "-m", "sglang_router.launch_router", *args, "--host", "127.0.0.1", "--port", str(port)]  # fmt: skip
    return Process(argv, f"http://127.0.0.1:{port}", env=env)


# ---- Python functions in spawned interpreters ------------------------------------------------------


def _run_dying_with_parent(dies: bool, target: Callable, *args) -> None:
    if dies:
        die_with_parent()
    target(*args)


def spawn(target: Callable, *args, start: bool = True) -> mp.process.BaseProcess:
    """`target(*args)` in a fresh interpreter that dies with this one (daemon: gone at exit too)."""
    dies = _preexec() is not None
    proc = SPAWN.Process(target=_run_dying_with_parent, args=(dies, target, *args), daemon=True)
    if start:
        proc.start()
    return proc


def join_or_kill(procs: list, timeout: float = 10.0) -> None:
    """Give spawned processes `timeout` to finish, then kill the rest."""
    for p in procs:
        if p.pid is None:  # never started
            continue
        p.join(timeout=timeout)
        if p.is_alive():
            p.kill()
            p.join()


# ---- what is running ------------------------------------------------------------------------------


def descendants(pid: int) -> list[int]:
    """Every live process below `pid` (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
