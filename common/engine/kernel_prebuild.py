"""FlashInfer's kernels built ahead of their first use, all at once, with progress (CUDA only).

FlashInfer compiles each module (norm, SiLU·mul, RoPE, the attention kernels) with ninja when the
code first touches it, one module after another: ~200 s on a fresh H200 for the 8B shape, none
of it overlapping the weights' load. `start_prebuild` lists, right after the model's config is
read, every module this model, backend, dtype and GPU will ask for (`flashinfer_specs`: the very
JitSpecs FlashInfer's wrappers build, so the names match) and builds the missing ones on a
background thread while the weights load. FlashInfer's first use then takes the module's file
lock, which the build holds, waits for it and finds nothing left to do.

NOTE: each module is built by its own ninja in its own folder (`-C build_dir`), as FlashInfer's
`JitSpec.build` does, not by one top-level ninja with a `subninja` per module
(`flashinfer.jit.build_jit_specs`): ninja keeps its build and deps logs in the folder it runs in,
and a module folder without them counts as dirty ("deps ... are missing"), so FlashInfer's own
ninja would have rebuilt every module once more. The modules' ninjas run concurrently instead,
their `-j` split from one budget (`split_jobs`).

The runner (`build_modules`) knows nothing of FlashInfer, so it is tested with a fake ninja.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

import torch
from disagg.common.config import build_jobs, flashinfer_jit_disabled, fused_kernels_enabled
from disagg.common.models.decoder import head_dim_of, kv_heads_per_rank
from disagg.common.models.deepseek import attention_backend_for

logger = logging.getLogger(__name__)

# ninja prints this before each finished step when its output is no terminal (its NINJA_STATUS)
NINJA_STATUS = "[prebuild %f/%t] "
_STATUS_RE = re.compile(r"^\[prebuild (\d+)/(\d+)\] ")
_NO_WORK = "ninja: no work to do."
_HALF = (torch.bfloat16, torch.float16)


@dataclass
class NinjaModule:
    """One module to build: `ninja -C build_dir -f ninja_file`. `prepare` writes the ninja file
    (run under `lock`, the lock FlashInfer's own build of the module takes); `num_steps`, the
    edges of a cold build, stands in for ninja's count until ninja reports its own."""

    name: str
    build_dir: Path
    ninja_file: Path
    num_steps: int
    prepare: Callable[[], None] | None = None
    lock: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    # filled while it builds
    done_steps: int = 0
    total_steps: int | None = None
    state: str = "waiting"  # waiting -> building -> built | cached | failed
    output_tail: list[str] = field(default_factory=list)


@dataclass
class PrebuildResult:
    built: list[str]
    cached: list[str]
    failed: list[str]
    seconds: float


def split_jobs(steps: list[int], budget: int) -> list[int]:
    """Each module's ninja -j: its own steps up to `budget`, scaled down so that all of them
    together run at most 2x `budget` jobs. NOTE: the modules' ninjas share no job pool, and a
    small module finishes early and leaves its cores idle; 2x keeps the cores busy meanwhile
    without running every module's heaviest compiles on one core each (nvcc takes GBs each)."""
    jobs = [max(1, min(n, budget)) for n in steps]
    if sum(jobs) > 2 * budget:
        scale = 2 * budget / sum(jobs)
        jobs = [max(1, int(j * scale)) for j in jobs]
    return jobs


def job_budget() -> int:
    """MAX_JOBS (FlashInfer's own knob), else the cores this process may run on."""
    max_jobs = build_jobs()
    if max_jobs:
        return max_jobs
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def build_modules(
    modules: list[NinjaModule], ninja: str = "ninja", log_every: float = 10.0, niceness: int = 10
) -> PrebuildResult:
    """Build `modules` concurrently (one ninja each), logging progress every `log_every` seconds
    and one line at the end. A module ninja has nothing to do for counts as cached."""
    t0 = time.monotonic()
    jobs = split_jobs([m.num_steps for m in modules], job_budget())
    with ThreadPoolExecutor(max(1, len(modules)), thread_name_prefix="kernel-prebuild") as pool:
        futures = [
            pool.submit(_build_one, m, _ninja_command(ninja, m, j, niceness))
            for m, j in zip(modules, jobs, strict=True)
        ]
        while wait(futures, timeout=log_every).not_done:
            logger.info("FlashInfer kernels: %s", _progress(modules, time.monotonic() - t0))
    result = PrebuildResult(
        built=[m.name for m in modules if m.state == "built"],
        cached=[m.name for m in modules if m.state == "cached"],
        failed=[m.name for m in modules if m.state == "failed"],
        seconds=time.monotonic() - t0,
    )
    _log_result(result, modules)
    return result


def _ninja_command(ninja: str, m: NinjaModule, jobs: int, niceness: int) -> list[str]:
    # NOTE: niced, so the weights' load and the CUDA context of this process (and of the other
    # ranks) are not slowed by the compilers; when the engine needs a kernel it waits anyway
    nice = ["nice", "-n", str(niceness)] if niceness and shutil.which("nice") else []
    return [*nice, ninja, "-C", str(m.build_dir), "-f", str(m.ninja_file), "-j", str(jobs)]


def _build_one(m: NinjaModule, command: list[str]) -> None:
    try:
        with m.lock():
            if m.prepare is not None:
                m.prepare()
            m.state = "building"
            _run_ninja(m, command)
    except Exception as e:  # a missing compiler, a failed compile: the first use reports it again
        m.state = "failed"
        m.output_tail = [*m.output_tail[-20:], f"{type(e).__name__}: {e}"]


def _run_ninja(m: NinjaModule, command: list[str]) -> None:
    env = dict(os.environ, NINJA_STATUS=NINJA_STATUS)
    m.build_dir.mkdir(parents=True, exist_ok=True)
    with subprocess.Popen(
        command, cwd=m.build_dir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ) as proc:
        for line in proc.stdout:
            if match := _STATUS_RE.match(line):
                m.done_steps, m.total_steps = int(match[1]), int(match[2])
            elif line.startswith(_NO_WORK):
                m.total_steps = 0
            m.output_tail = [*m.output_tail[-20:], line.rstrip()]
    if proc.returncode != 0:
        raise RuntimeError(f"ninja exited with {proc.returncode}")
    m.state = "cached" if m.total_steps == 0 else "built"


def _progress(modules: list[NinjaModule], elapsed: float) -> str:
    finished = sum(m.state in ("built", "cached", "failed") for m in modules)
    done = sum(m.done_steps for m in modules)
    total = sum(m.num_steps if m.total_steps is None else m.total_steps for m in modules)
    return f"building {finished}/{len(modules)} modules done, {done}/{total} compile steps, {elapsed:.0f}s"


def _log_result(result: PrebuildResult, modules: list[NinjaModule]) -> None:
    for m in modules:
        if m.state == "failed":
            tail = "\n".join(m.output_tail[-10:])
            logger.warning("FlashInfer kernels: building %s failed:\n%s", m.name, tail)
    logger.info(
        "FlashInfer kernels: %d modules built, %d already built, %d failed, in %.1fs",
        len(result.built),
        len(result.cached),
        len(result.failed),
        result.seconds,
    )


@dataclass(frozen=True)
class KernelNeeds:
    """What the engine will ask FlashInfer for. attention: "mha" (the paged prefill and decode
    wrappers), "mla" (the MLA wrapper) or "" (torch attention); head_dim and group (query heads
    per KV head, per rank) for mha, mla_dims (kv_lora_rank, rope dim) for mla."""

    dtype: torch.dtype
    capability: tuple[int, int]  # the GPU's compute capability, e.g. (9, 0) for the H100/H200
    fused: bool  # the RMSNorm / SiLU·mul / RoPE start-up check (kernels.check_fused_kernels)
    attention: str
    head_dim: int = 0
    group: int = 1
    mla_dims: tuple[int, int] = (0, 0)


def kernel_needs(
    hf_config, dtype: torch.dtype, attention_backend: str, capability: tuple[int, int], attn_tp_size: int = 1
) -> KernelNeeds:
    """The FlashInfer modules' parameters, as the model runner will create its backend (see
    ModelRunner.__init__ and attention.create_attention_backend)."""
    fused = fused_kernels_enabled() and dtype in _HALF
    try:
        name = attention_backend_for(hf_config, attention_backend)
    except ValueError:  # refused: the model runner says why when it creates the backend
        name = "torch"
    mla = name.endswith("_mla")
    base = name.removesuffix("_mla")
    # NOTE: 16-bit only: an MLA model in float32 runs torch, and no float32 modules are guessed
    if base == "torch" or dtype not in _HALF:
        return KernelNeeds(dtype, capability, fused, "")
    if mla:
        dims = (hf_config.kv_lora_rank, hf_config.qk_rope_head_dim)
        return KernelNeeds(dtype, capability, fused, "mla", mla_dims=dims)
    q_heads = hf_config.num_attention_heads // attn_tp_size
    group = q_heads // kv_heads_per_rank(hf_config, attn_tp_size)
    return KernelNeeds(dtype, capability, fused, "mha", head_dim=head_dim_of(hf_config), group=group)


def flashinfer_specs(needs: KernelNeeds) -> list:
    """The JitSpecs (flashinfer.jit) of every module the engine will request, in first-use order.

    NOTE: each mirrors a choice FlashInfer 0.7.2 makes at the wrapper's plan(); a mismatch only
    costs a module built in vain (the first use builds the right one), so keep them in step:
    - the fused-kernel check: norm, silu_and_mul, rope (kernels.py);
    - paged prefill (backend "auto"): fa3 (the `_sm90` module) where flashinfer.utils
      determine_attention_backend picks it, i.e. on sm_90 at FA3's head dims, else fa2, whose
      batch-prefill module is the `_kv_stride_equal` primary (prefill.get_batch_prefill_module);
    - decode with tensor cores (group >= 4, attention_flashinfer.py): the fa2 prefill primary in
      16 bits; without them, the batch-decode module;
    - MLA (backend "auto", flashinfer/mla/_batch_mla/_auto_policy.py): fa3 on sm_90, fa2 on
      sm_8x/12x; sm_10x picks by the batch's lengths: not predicted, nothing built ahead.
    """
    from flashinfer.jit.activation import gen_act_and_mul_module
    from flashinfer.jit.attention import modules
    from flashinfer.jit.norm import gen_norm_module
    from flashinfer.jit.rope import gen_rope_module

    specs = [gen_norm_module(), gen_act_and_mul_module("silu"), gen_rope_module()] if needs.fused else []
    dt, idx = needs.dtype, torch.int32
    sm90 = needs.capability[0] == 9
    if needs.attention == "mha":
        d = needs.head_dim
        # (dtype_q, dtype_kv, dtype_o, dtype_idx, head_dim_qk, head_dim_vo, posenc, swa, logits cap, f16qk)
        args = (dt, dt, dt, idx, d, d, 0, False, False, False)
        fa2_primary = modules._gen_batch_prefill_primary_module  # what get_batch_prefill_module("fa2") builds
        specs.append(
            modules.gen_batch_prefill_module("fa3", *args)
            if _fa3_prefill(d, sm90)
            else fa2_primary("fa2", *args)
        )
        if needs.group >= 4:
            specs.append(fa2_primary("fa2", *args))
        else:
            specs.append(modules.gen_batch_decode_module(dt, dt, dt, idx, d, d, 0, False, False))
    elif needs.attention == "mla" and needs.capability[0] != 10:
        ckv, kpe = needs.mla_dims
        backend = "fa3" if sm90 and ckv in (128, 256, 512) else "fa2"
        specs.append(modules.gen_batch_mla_module(backend, dt, dt, dt, idx, ckv, kpe, False))
    unique = {s.name: s for s in specs}  # fa3 off: prefill and decode share the fa2 primary
    return list(unique.values())


def _fa3_prefill(head_dim: int, sm90: bool) -> bool:
    from flashinfer.utils import is_fa3_prefill_head_dim_supported

    return sm90 and is_fa3_prefill_head_dim_supported(head_dim, head_dim)


def ninja_module(spec) -> NinjaModule:
    """A FlashInfer JitSpec as the runner's module: FlashInfer's folder, ninja file and lock."""
    from filelock import FileLock

    return NinjaModule(
        name=spec.name,
        build_dir=spec.build_dir,
        ninja_file=spec.ninja_path,
        num_steps=len(spec.sources) + 1,  # the compiles and the link
        prepare=spec.write_ninja,
        lock=lambda: FileLock(spec.lock_path, thread_local=False),
    )


def start_prebuild(needs: KernelNeeds) -> threading.Thread | None:
    """Build the modules `needs` lists that are not built yet, on a background thread (None
    where FlashInfer is missing, JIT is off or nothing is needed). The thread logs its progress;
    nobody waits for it: FlashInfer's first use of a module waits on the module's lock."""
    if flashinfer_jit_disabled() or shutil.which("ninja") is None:
        return None
    try:
        specs = [s for s in flashinfer_specs(needs) if not s.is_aot]  # AOT: shipped built
    except ImportError:
        return None
    except Exception as e:  # a FlashInfer whose JIT API moved: its first use builds as before
        logger.warning("FlashInfer kernels: not built ahead (%s: %s)", type(e).__name__, e)
        return None
    if not specs:
        return None
    logger.info("FlashInfer kernels: checking/building %s", ", ".join(s.name for s in specs))
    thread = threading.Thread(
        target=build_modules, args=([ninja_module(s) for s in specs],), name="kernel-prebuild", daemon=True
    )
    thread.start()
    return thread
