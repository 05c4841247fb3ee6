"""k8s/slurm/disagg-pd.sh: valid bash, and every flag it passes exists in our entry points.
(tests/test_k8s_monitoring.py runs the script for real, with a stand-in srun on this machine.)"""

from __future__ import annotations

import re
import subprocess

import pytest

from tests.k8s_helpers import K8S, assert_flags_accepted

SCRIPT = K8S / "slurm" / "disagg-pd.sh"


def _commands(text: str) -> dict[str, list[str]]:
    """launch_* -> the --flags on its (backslash-continued) command line; SERVER_ARGS count for servers."""
    server_args = [
        flag
        for line in re.findall(r"SERVER_ARGS\+?=\(([^)]*)\)", text)
        for flag in re.findall(r"(?<![\w-])(--[a-z0-9-]+)", line)
    ]
    out: dict[str, list[str]] = {}
    for match in re.finditer(r"\b(launch_[a-z]+) ((?:[^\n]*\\\n)*[^\n]*)", text):
        script, line = match.groups()
        flags = re.findall(r"(?<![\w-])(--[a-z0-9-]+)", line)
        if '"${SERVER_ARGS[@]}"' in line:
            flags += server_args
        out[script] = flags
    return out


def test_script_is_valid_bash():
    proc = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_script_starts_prefill_decode_and_router_on_two_nodes():
    text = SCRIPT.read_text()
    assert "#SBATCH --nodes=2" in text
    commands = _commands(text)
    assert set(commands) == {"launch_prefill", "launch_decode", "launch_router"}
    assert {"--pd-disaggregation", "--prefill", "--decode"} <= set(commands["launch_router"])
    assert "--disaggregation-bootstrap-port" in commands["launch_prefill"]


@pytest.mark.slow
@pytest.mark.parametrize("script", ["launch_prefill", "launch_decode", "launch_router"])
def test_every_flag_exists(script):
    assert_flags_accepted(script, _commands(SCRIPT.read_text())[script])
