"""The PDL switch (common/models/pdl.py): on by default (DISAGG_PDL=0 turns it off), and only on a CUDA device
of compute capability >= 9 (the probe monkeypatched: no GPU here), never under Triton's interpreter;
a bad value is refused by name. Every PDL-aware kernel of the decode path waits first (its source;
tests/test_triton_compile.py checks the compiled PTX)."""

from __future__ import annotations

import ast
import importlib
import textwrap

import pytest
import torch
from disagg.common.models import pdl

CUDA = torch.device("cuda", 0)


@pytest.fixture(autouse=True)
def _fresh_decision(monkeypatch):
    monkeypatch.delenv("DISAGG_PDL", raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(pdl, "device_capability", lambda device: (9, 0))  # an H200
    pdl.pdl_enabled.cache_clear()
    yield
    pdl.pdl_enabled.cache_clear()


def test_on_by_default_on_hopper_off_with_the_switch(monkeypatch):
    pytest.importorskip("triton")
    assert pdl.pdl_enabled(CUDA)
    monkeypatch.setenv("DISAGG_PDL", "0")
    pdl.pdl_enabled.cache_clear()
    assert not pdl.pdl_enabled(CUDA)
    assert dict(pdl.pdl_args(CUDA)) == {"PDL": False}  # no launch option: an older Triton would refuse it


def test_on_with_the_switch_on_a_hopper_gpu(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("DISAGG_PDL", "1")
    assert pdl.triton_supports_pdl()  # the venv's Triton (the GPU image's 3.6 has it too: pdl.py)
    assert pdl.pdl_enabled(CUDA)
    assert dict(pdl.pdl_args(CUDA)) == {"PDL": True, "launch_pdl": True}


@pytest.mark.parametrize(
    "case", ["ampere", "cpu", "interpreter", "old triton"], ids=lambda c: c.replace(" ", "_")
)
def test_switch_on_but_not_here(monkeypatch, case):
    monkeypatch.setenv("DISAGG_PDL", "1")
    device = torch.device("cpu") if case == "cpu" else CUDA
    if case == "ampere":
        monkeypatch.setattr(pdl, "device_capability", lambda device: (8, 0))
    if case == "interpreter":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    if case == "old triton":
        monkeypatch.setattr(pdl, "triton_supports_pdl", lambda: False)
    assert not pdl.pdl_enabled(device)
    assert dict(pdl.pdl_args(device)) == {"PDL": False}


def test_a_bad_value_is_refused(monkeypatch):
    monkeypatch.setenv("DISAGG_PDL", "yes")
    with pytest.raises(ValueError, match="DISAGG_PDL='yes': expected 0 or 1"):
        pdl.pdl_enabled(CUDA)


KERNEL_MODULES = ["fused_rope_kv", "fused_mla_rope", "fused_moe", "fp8_kernels"]


@pytest.mark.parametrize("name", KERNEL_MODULES)
def test_every_pdl_aware_kernel_waits_first(name):
    """A kernel that takes PDL calls pdl_begin(PDL) as its first statement (after its docstring):
    a PDL launch lets it start before its predecessor has finished writing."""
    pytest.importorskip("triton")
    module = importlib.import_module(f"disagg.common.models.{name}")
    kernels = [
        k
        for k in vars(module).values()
        if hasattr(k, "arg_names") and "PDL" in k.arg_names and k is not pdl.pdl_begin
    ]
    assert kernels, name
    for kernel in kernels:
        body = ast.parse(textwrap.dedent(kernel.src)).body[0].body
        if isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
            body = body[1:]  # the docstring
        assert ast.unparse(body[0]) == "pdl_begin(PDL)", kernel.__name__
