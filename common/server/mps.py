"""NVIDIA's Multi-Process Service for servers that share a GPU (launch_local, pd_sweep).

Without MPS two processes on one GPU time-slice it: a prefill's kernels wait out the decode's graph
replays and back. Under MPS their kernels run side by side, each process on at most the SM share
its `CUDA_MPS_ACTIVE_THREAD_PERCENTAGE` allows. The daemon here is private (its own pipe directory):
an MPS daemon of the machine's own is left alone, and `quit` stops ours.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from pathlib import Path

from disagg.common.config import MPS_SM_PERCENT_VAR

logger = logging.getLogger(__name__)


class MpsDaemon:
    def __init__(self, root: Path):
        root = Path(root).resolve()
        # the variables every client of this daemon needs in its environment
        self.env = {
            "CUDA_MPS_PIPE_DIRECTORY": str(root / "pipe"),
            "CUDA_MPS_LOG_DIRECTORY": str(root / "log"),
        }
        self.running = False

    def client_env(self, sm_percent: int | None = None) -> dict[str, str]:
        """The environment a client process of this daemon needs: the daemon's directories, and its SM
        share where given (CUDA_MPS_ACTIVE_THREAD_PERCENTAGE; the server checks its GEMMs under it)."""
        env = dict(self.env)
        if sm_percent:
            env[MPS_SM_PERCENT_VAR] = str(sm_percent)
        return env

    def start(self, required: bool = True) -> bool:
        """Start the daemon; where it cannot start (no `nvidia-cuda-mps-control`, a failure): raise if
        `required`, else log why and return False (the clients then time-slice the GPU)."""
        for d in self.env.values():
            Path(d).mkdir(parents=True, exist_ok=True)
        try:
            if shutil.which("nvidia-cuda-mps-control") is None:
                raise FileNotFoundError("nvidia-cuda-mps-control is not on PATH")
            subprocess.run(
                ["nvidia-cuda-mps-control", "-d"], env={**os.environ, **self.env}, check=True, timeout=60
            )
        except (OSError, subprocess.SubprocessError) as e:
            if required:
                raise
            logger.warning("NVIDIA MPS did not start (%s): the servers time-slice the GPU", e)
            return False
        self.running = True
        return True

    def stop(self) -> None:
        if self.running:
            subprocess.run(["nvidia-cuda-mps-control"], input=b"quit\n", env={**os.environ, **self.env},
                           check=False, timeout=60)  # fmt: skip
            self.running = False

    def __enter__(self) -> MpsDaemon:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
