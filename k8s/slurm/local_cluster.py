"""Run k8s/slurm/disagg-pd.sh on this one machine: the srun/scontrol stand-ins of ./local, both
"nodes" = 127.0.0.1, OS-assigned free ports. Used by tests/test_k8s_monitoring.py and
k8s/monitoring/render_dashboard.py; also handy by hand:

    python k8s/slurm/local_cluster.py      # prints the URLs, Ctrl-C stops everything
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import tomllib
import urllib.request
from pathlib import Path

from disagg.common.net import free_port

SLURM_DIR = Path(__file__).resolve().parent
REPO = SLURM_DIR.parents[1]
SCRIPT = SLURM_DIR / "disagg-pd.sh"
SCRIPTS = ("launch_prefill", "launch_decode", "launch_router")


def _entry_point_shims(bin_dir: Path) -> None:
    """launch_* wrappers from pyproject's [project.scripts], for checkouts whose venv predates them."""
    with open(REPO / "pyproject.toml", "rb") as f:
        scripts = tomllib.load(f)["project"].get("scripts", {})
    bin_dir.mkdir(parents=True, exist_ok=True)
    for name in SCRIPTS:
        if name not in scripts:
            raise RuntimeError(f"entry point {name} is not in pyproject.toml")
        module, func = scripts[name].split(":")
        shim = bin_dir / name
        shim.write_text(
            f'#!/bin/sh\nexec "{sys.executable}" -c "from {module} import {func}; {func}()" "$@"\n'
        )
        shim.chmod(0o755)


def _get(url: str, timeout: float = 5.0) -> int:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status
    except OSError:
        return 0


class LocalPDCluster:
    """Prefill + decode + router from disagg-pd.sh; `extra_args` go to both servers (EXTRA_ARGS)."""

    def __init__(self, workdir: Path, extra_args: str = "--max-total-tokens 4096"):
        self.workdir = Path(workdir)
        self.extra_args = extra_args
        self.ports = {name: free_port() for name in ("prefill", "decode", "bootstrap", "router")}
        self.proc: subprocess.Popen | None = None

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.ports[name]}"

    @property
    def log_dir(self) -> Path:
        return self.workdir / "logs"

    def start(self, timeout: float = 600.0) -> LocalPDCluster:
        shims = self.workdir / "bin"
        _entry_point_shims(shims)
        env = {
            **os.environ,
            # the venv's bin (activate) goes first, then these: shims win only where the venv lacks one
            "PATH": f"{SLURM_DIR / 'local'}:{shims}:{os.environ['PATH']}",
            "VENV": str(Path(sys.executable).parent.parent),
            "SLURM_JOB_NODELIST": "127.0.0.1,127.0.0.1",
            "SLURM_JOB_ID": "local",
            "TP": "1",
            "PREFILL_PORT": str(self.ports["prefill"]),
            "DECODE_PORT": str(self.ports["decode"]),
            "BOOTSTRAP_PORT": str(self.ports["bootstrap"]),
            "ROUTER_PORT": str(self.ports["router"]),
            "LOG_DIR": str(self.log_dir),
            "STARTUP_TIMEOUT": str(int(timeout)),
            "EXTRA_ARGS": self.extra_args,
        }
        self.proc = subprocess.Popen(
            ["bash", str(SCRIPT)],
            env=env,
            cwd=self.workdir,
            stdout=open(self.workdir / "script.log", "w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,  # one process group: stop() ends the script and every step
        )
        deadline = time.monotonic() + timeout
        while _get(self.url("router") + "/readiness") != 200:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                logs = self.logs()
                self.stop()
                raise RuntimeError(f"the local PD cluster did not come up:\n{logs}")
            time.sleep(1.0)
        return self

    def logs(self, tail: int = 3000) -> str:
        parts = []
        for path in [self.workdir / "script.log", *sorted(self.log_dir.glob("*.log"))]:
            if path.exists():
                parts.append(f"--- {path.name}\n{path.read_text(errors='replace')[-tail:]}")
        return "\n".join(parts)

    def stop(self) -> None:
        """SIGTERM to the whole process group (script, steps, their children), SIGKILL after 30 s."""
        if self.proc is None:
            return
        pgid, deadline = self.proc.pid, time.monotonic() + 30
        try:
            os.killpg(pgid, signal.SIGTERM)
            while time.monotonic() < deadline:
                self.proc.poll()  # reap the script, or its zombie keeps the group alive
                os.killpg(pgid, 0)  # raises once no process of the group is left
                time.sleep(0.5)
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        self.proc = None

    def __enter__(self) -> LocalPDCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as tmp, LocalPDCluster(Path(tmp)) as cluster:
        for name in ("router", "prefill", "decode"):
            print(f"{name}: {cluster.url(name)}")
        try:
            signal.pause()
        except KeyboardInterrupt:
            pass
