"""On a CUDA GPU with FlashInfer: an engine started on an empty FlashInfer cache builds every module
it uses ahead (common/engine/kernel_prebuild.py), concurrently, with progress lines; FlashInfer
itself builds no module cold (its "Building JIT module" line never shows), no object is compiled
twice, and the cache holds exactly the modules the prebuild listed (the names match what the
wrappers ask for). A second start on the same cache builds nothing. The default model: head_dim 64,
3 query heads per KV head (FlashInfer's batch-decode module, the sm90 prefill module on an H100/H200).
Slow: the first start compiles the kernels (~1-2 min on an H200's 16 cores)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.slow,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

START_ENGINE = """
import logging, threading
logging.basicConfig(level=logging.INFO)
from disagg.common.engine import Engine
engine = Engine(max_total_tokens=4096)
print(engine.generate(["The capital of France is"], {"max_new_tokens": 8, "temperature": 0})[0]["output_ids"])
for t in threading.enumerate():  # the closing line is logged after the last module's lock is released
    if t.name == "kernel-prebuild":
        t.join()
"""


def _start(cache_base: Path) -> str:
    env = dict(os.environ, FLASHINFER_WORKSPACE_BASE=str(cache_base))
    proc = subprocess.run(
        [sys.executable, "-c", START_ENGINE], env=env, capture_output=True, text=True, timeout=540
    )
    assert proc.returncode == 0, proc.stderr[-5000:]
    return proc.stderr


def test_a_fresh_cache_is_built_ahead_once(tmp_path):
    pytest.importorskip("flashinfer")
    first = _start(tmp_path)
    listed = re.search(r"FlashInfer kernels: checking/building (.*)", first)[1].split(", ")
    assert re.search(rf"{len(listed)} modules built, 0 already built, 0 failed", first), first[-3000:]
    assert "compile steps" in first  # progress while it built
    assert "Building JIT module" not in first  # FlashInfer's own first use built nothing cold
    ops = next(tmp_path.glob(".cache/flashinfer/*/*/cached_ops"))
    assert sorted(p.name for p in ops.iterdir() if p.name != "tmp") == sorted(listed)
    for module in listed:  # ninja logs each output once per build of it
        entries = [line.split("\t")[3] for line in (ops / module / ".ninja_log").read_text().splitlines()[1:]]
        assert not [out for out, n in Counter(entries).items() if n > 1], module

    second = _start(tmp_path)
    assert re.search(rf"0 modules built, {len(listed)} already built, 0 failed", second), second[-3000:]
