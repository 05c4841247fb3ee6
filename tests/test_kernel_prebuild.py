"""FlashInfer's kernels built ahead (common/engine/kernel_prebuild.py): the runner builds every
module concurrently, each in its own folder, logs progress and a closing line, and costs nothing
where all are built (a fake ninja: no compiler here); the module list for a model equals what a
real H200 run built (FlashInfer's cache folders after an 8B server, a head_dim-64 model and a
DeepSeek-V3 bench), where flashinfer is importable."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from disagg.common.engine.kernel_prebuild import NinjaModule, build_modules, kernel_needs, split_jobs
from disagg.common.models.weights import load_config

# A ninja stand-in: `-C dir`; a folder holding `.done` has no work, otherwise it prints one status
# line per step (as ninja does with NINJA_STATUS set and no terminal), then marks the folder done.
# STEPS in the folder: how many steps; FAIL: print an error and exit 1. `seen`: how many modules'
# ninjas had started when this one ended; `calls`: one line per run, built or nothing.
FAKE_NINJA = """#!/bin/sh
while [ $# -gt 0 ]; do [ "$1" = -C ] && dir=$2; shift; done
cd "$dir" || exit 2
if [ -e .done ]; then echo "ninja: no work to do."; echo nothing >> calls; exit 0; fi
if [ -e FAIL ]; then echo "[prebuild 1/2] nvcc -c x.cu"; echo "x.cu(3): error: boom"; exit 1; fi
touch started
n=$(cat STEPS)
i=1; while [ $i -le $n ]; do sleep 0.3; echo "[prebuild $i/$n] nvcc -c step$i.cu"; i=$((i+1)); done
ls ../*/started | wc -l > seen
touch .done
echo built >> calls
"""


@pytest.fixture
def fake_ninja(tmp_path: Path) -> str:
    path = tmp_path / "ninja"
    path.write_text(FAKE_NINJA)
    path.chmod(0o755)
    return str(path)


def _modules(root: Path, steps: dict[str, int], prepared: list[str]) -> list[NinjaModule]:
    out = []
    for name, n in steps.items():
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "STEPS").write_text(str(n))

        def prepare(folder=folder, name=name):
            (folder / "build.ninja").write_text("")
            prepared.append(name)

        out.append(NinjaModule(name, folder, folder / "build.ninja", n, prepare=prepare))
    return out


def test_modules_build_concurrently_with_progress(tmp_path, fake_ninja, caplog):
    prepared = []
    modules = _modules(tmp_path / "ops", {"norm": 2, "batch_prefill_sm90": 4}, prepared)
    with caplog.at_level(logging.INFO, logger="disagg.common.engine.kernel_prebuild"):
        result = build_modules(modules, ninja=fake_ninja, log_every=0.05)
    assert result.built == ["norm", "batch_prefill_sm90"] and not result.cached and not result.failed
    assert sorted(prepared) == ["batch_prefill_sm90", "norm"]  # each ninja file written first
    # each ninja ran in its module's own folder (where FlashInfer's later ninja finds its logs)
    assert all((m.build_dir / ".done").exists() for m in modules)
    progress = [r.message for r in caplog.records if "compile steps" in r.message]
    assert progress and all("/2 modules done" in p and "/6 compile steps" in p for p in progress)
    assert "2 modules built, 0 already built, 0 failed" in caplog.records[-1].message
    # both ran at once: each saw the other started before it ended (one after another, the first
    # would see only itself)
    assert [(m.build_dir / "seen").read_text().strip() for m in modules] == ["2", "2"]


def test_nothing_to_build_when_all_are_built(tmp_path, fake_ninja, caplog):
    modules = _modules(tmp_path / "ops", {"norm": 2, "rope": 2, "silu_and_mul": 1}, [])
    for m in modules:
        (m.build_dir / ".done").touch()
    with caplog.at_level(logging.INFO, logger="disagg.common.engine.kernel_prebuild"):
        result = build_modules(modules, ninja=fake_ninja, log_every=5.0)
    assert result.cached == ["norm", "rope", "silu_and_mul"] and not result.built
    assert "0 modules built, 3 already built, 0 failed" in caplog.records[-1].message


def test_a_failed_module_is_reported_and_the_others_still_build(tmp_path, fake_ninja, caplog):
    modules = _modules(tmp_path / "ops", {"rope": 1, "norm": 1}, [])
    (modules[0].build_dir / "FAIL").touch()
    with caplog.at_level(logging.INFO, logger="disagg.common.engine.kernel_prebuild"):
        result = build_modules(modules, ninja=fake_ninja, log_every=5.0)
    assert result.failed == ["rope"] and result.built == ["norm"]
    warning = next(r.message for r in caplog.records if r.levelno == logging.WARNING)
    assert "rope" in warning and "error: boom" in warning


def test_jobs_split_from_one_budget():
    assert split_jobs([3, 3, 2, 11, 11], 16) == [3, 3, 2, 11, 11]  # 30 <= 2 x 16: all at once
    jobs = split_jobs([11, 11, 11, 11], 4)
    assert sum(jobs) <= 8 and min(jobs) >= 1
    assert split_jobs([2, 40], 1) == [1, 1]


def test_needs_follow_the_model_and_backend():
    llama8b = load_config("Llama-3.1-8B")
    needs = kernel_needs(llama8b, torch.bfloat16, "auto", (9, 0))
    assert (needs.fused, needs.attention, needs.head_dim, needs.group) == (True, "mha", 128, 4)
    assert kernel_needs(llama8b, torch.bfloat16, "auto", (9, 0), attn_tp_size=8).group == 4  # 4 q, 1 kv
    assert kernel_needs(llama8b, torch.bfloat16, "torch", (9, 0)).attention == ""
    f32 = kernel_needs(llama8b, torch.float32, "auto", (9, 0))
    assert (f32.fused, f32.attention) == (False, "")  # float32 keeps torch ops and no guessed kernels
    v3 = kernel_needs(load_config("DeepSeek-V3"), torch.bfloat16, "auto", (9, 0))
    assert (v3.attention, v3.mla_dims) == ("mla", (512, 64))


# What FlashInfer 0.7.2 built on an H200 (its cache folders), by run
H200_8B = {
    "norm",
    "silu_and_mul",
    "rope",
    "batch_prefill_with_kv_cache_dtype_q_bf16_dtype_kv_bf16_dtype_o_bf16_dtype_idx_i32_head_dim_qk_128_head_dim_vo_128"
    "_posenc_0_use_swa_False_use_logits_cap_False_f16qk_False_kv_stride_equal",
    "batch_prefill_with_kv_cache_dtype_q_bf16_dtype_kv_bf16_dtype_o_bf16_dtype_idx_i32_head_dim_qk_128_head_dim_vo_128"
    "_posenc_0_use_swa_False_use_logits_cap_False_f16qk_False_sm90",
}
H200_HEAD_DIM_64 = {
    "norm",
    "silu_and_mul",
    "rope",
    "batch_decode_with_kv_cache_dtype_q_bf16_dtype_kv_bf16_dtype_o_bf16_dtype_idx_i32_head_dim_qk_64_head_dim_vo_64"
    "_posenc_0_use_swa_False_use_logits_cap_False",
    "batch_prefill_with_kv_cache_dtype_q_bf16_dtype_kv_bf16_dtype_o_bf16_dtype_idx_i32_head_dim_qk_64_head_dim_vo_64"
    "_posenc_0_use_swa_False_use_logits_cap_False_f16qk_False_sm90",
}
H200_V3 = {
    "norm",
    "silu_and_mul",
    "rope",
    "batch_mla_attention_dtype_q_bf16_dtype_kv_bf16_dtype_o_bf16_dtype_idx_i32_head_dim_ckv_512_head_dim_kpe_64"
    "_profiler_False_planabi2_sm90",
}

# NOTE: in a child process: FlashInfer fixes its target GPU and cache folder at import, here an
# sm_90a target (no GPU needed to list modules) and a cache under the test's tmp folder. The 8B's
# modules are then built ahead (start_prebuild, the fake ninja first on PATH) while the main thread
# builds norm as FlashInfer's first use does (JitSpec.build under the module's lock, as in
# build_and_load), once the prebuild's ninja for it has started.
LIST_MODULES = textwrap.dedent(
    """
    import json, threading, time, torch
    from filelock import FileLock
    from disagg.common.engine.kernel_prebuild import flashinfer_specs, kernel_needs, start_prebuild
    from disagg.common.models.weights import load_config
    from transformers import LlamaConfig

    head64 = LlamaConfig(hidden_size=256, num_attention_heads=4, num_key_value_heads=2, vocab_size=128)
    configs = {"8b": load_config("Llama-3.1-8B"), "head64": head64, "v3": load_config("DeepSeek-V3")}
    needs = {k: kernel_needs(c, torch.bfloat16, "auto", (9, 0)) for k, c in configs.items()}
    out = {k: [s.name for s in flashinfer_specs(n)] for k, n in needs.items()}
    thread = start_prebuild(needs["8b"])
    norm = flashinfer_specs(needs["8b"])[0]
    while not (norm.build_dir / "started").exists():
        time.sleep(0.01)
    with FileLock(norm.lock_path, thread_local=False):
        norm.build()
    thread.join()
    out["calls"] = {p.parent.name: p.read_text().split() for p in norm.build_dir.parent.glob("*/calls")}
    print(json.dumps(out))
    """
)


@pytest.mark.skipif(importlib.util.find_spec("flashinfer") is None, reason="needs flashinfer-python")
def test_module_names_are_those_flashinfer_builds_on_an_h200(tmp_path, fake_ninja):
    bin_dir = tmp_path / "bin"  # `ninja` on PATH: the fake, 2 steps in every module folder
    bin_dir.mkdir()
    (bin_dir / "ninja").write_text(
        f'#!/bin/sh\nfor a; do [ "$p" = -C ] && echo 2 > "$a/STEPS"; p=$a; done\nexec {fake_ninja} "$@"\n'
    )
    (bin_dir / "ninja").chmod(0o755)
    env = dict(os.environ, FLASHINFER_CUDA_ARCH_LIST="9.0a", FLASHINFER_WORKSPACE_BASE=str(tmp_path),
               PATH=f"{bin_dir}:{os.environ['PATH']}")  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "-c", LIST_MODULES], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(out["8b"]) == H200_8B and len(out["8b"]) == 5
    assert set(out["head64"]) == H200_HEAD_DIM_64
    assert set(out["v3"]) == H200_V3
    assert out["8b"][:3] == ["norm", "silu_and_mul", "rope"]  # first used first: the fused-kernel check
    # each module built once, in FlashInfer's own folder; FlashInfer's norm build waited for it
    # and then had nothing to do
    assert out["calls"] == {name: ["built"] for name in H200_8B} | {"norm": ["built", "nothing"]}
    assert all(p.parent.parent.name == "cached_ops" for p in tmp_path.glob(".cache/flashinfer/**/calls"))


# FlashInfer's rules: compiles with gcc-style depfiles kept in ninja's deps log, then a link
GCC_NINJA = """ninja_required_version = 1.3
rule compile
  command = gcc -MMD -MF $out.d -fPIC -c $in -o $out
  depfile = $out.d
  deps = gcc
rule link
  command = gcc -shared $in -o $out
build {d}/a.o: compile {d}/a.c
build {d}/b.o: compile {d}/b.c
build {d}/mod.so: link {d}/a.o {d}/b.o
default {d}/mod.so
"""


@pytest.mark.skipif(not (shutil.which("ninja") and shutil.which("gcc")), reason="needs ninja and gcc")
def test_a_module_built_ahead_is_up_to_date_for_its_own_ninja(tmp_path, caplog):
    """What FlashInfer's first use runs next (`ninja -C build_dir -f build.ninja`, JitSpec.build)
    has nothing left to do: the build's logs are in the module's folder."""
    d = tmp_path / "cached_ops" / "norm"
    d.mkdir(parents=True)
    (d / "a.h").write_text("#define A 1\n")
    (d / "a.c").write_text('#include "a.h"\nint a(void) { return A; }\n')
    (d / "b.c").write_text("int b(void) { return 2; }\n")
    (d / "build.ninja").write_text(GCC_NINJA.format(d=d))
    module = NinjaModule("norm", d, d / "build.ninja", 3)
    assert build_modules([module]).built == ["norm"] and (d / "mod.so").exists()
    dry = subprocess.run(["ninja", "-C", str(d), "-f", str(d / "build.ninja"), "-n", "-d", "explain"],
                         capture_output=True, text=True, check=True)  # fmt: skip
    assert "no work to do" in dry.stdout, dry.stdout + dry.stderr
    assert build_modules([NinjaModule("norm", d, d / "build.ninja", 3)]).cached == ["norm"]
