"""The tree is the architecture: each package imports alone, and the roles import each other only
downwards (prefill/decode -> transfer -> common; the router stands alone)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ["common", "transfer", "prefill", "decode", "router"]
# who may import whom (package level); everything else is a layering violation
ALLOWED = {
    "common": {"common"},
    "transfer": {"transfer", "common"},
    "prefill": {"prefill", "transfer", "common"},
    "decode": {"decode", "transfer", "common"},
    "router": {"router"},
}


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module, names) of every `import disagg.x` / `from disagg.x import ...` in `path`."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("disagg."):
            out.append((node.module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names if a.name.startswith("disagg.")]
    return out


def _sources(package: str) -> list[Path]:
    return [p for p in (ROOT / package).rglob("*.py") if "__pycache__" not in p.parts]


@pytest.mark.parametrize("package", PACKAGES)
def test_packages_import_only_downwards(package):
    bad = []
    for path in _sources(package):
        for module, _ in _imports(path):
            target = module.split(".")[1]
            if target not in ALLOWED[package]:
                bad.append(f"{path.relative_to(ROOT)} imports {module}")
    assert not bad, "\n".join(bad)


def test_no_module_imports_another_modules_private_names():
    bad = []
    for package in PACKAGES:
        for path in _sources(package):
            for module, names in _imports(path):
                bad += [
                    f"{path.relative_to(ROOT)}: from {module} import {n}" for n in names if n.startswith("_")
                ]
    assert not bad, "\n".join(bad)


def test_the_folder_is_the_import_path():
    """Every module's import path names its file: no package-dir remapping below the root."""
    import tomllib

    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert setuptools["package-dir"] == {"disagg": "."}
    for package in setuptools["packages"]:
        assert (ROOT / package.split(".", 1)[1].replace(".", "/") / "__init__.py").exists(), package


@pytest.mark.parametrize("module", ["disagg.transfer", "disagg.prefill.launch", "disagg.decode.launch",
                                    "disagg.router.launch", "disagg.common.server.launch_server",
                                    "disagg.common.engine.scheduler"])  # fmt: skip
def test_each_package_imports_alone(module):
    """A fresh interpreter imports it with nothing imported before (an import cycle fails here)."""
    subprocess.run([sys.executable, "-c", f"import {module}"], check=True, timeout=120)
