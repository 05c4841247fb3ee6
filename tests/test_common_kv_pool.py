"""The CPU KV pool's size: --max-total-tokens when given, else a share of the memory available,
never more than 512 MiB (a laptop runs a prefill and a decode server side by side)."""

from __future__ import annotations

import pytest
import torch
from disagg.common.engine import kv_pool
from disagg.common.engine.kv_pool import size_pool_pages

CPU = torch.device("cpu")
PAGE = 16
# the default model (SmolLM2-135M) in float32: 30 layers x K,V x 3 KV heads x 64 dims x 4 bytes per token
DEFAULT_MODEL_PAGE_BYTES = 30 * 2 * 3 * 64 * 4 * PAGE


def test_max_total_tokens_sets_the_size():
    assert size_pool_pages(DEFAULT_MODEL_PAGE_BYTES, PAGE, CPU, 65536, 0.85) == 4096


def test_default_is_at_most_512_mib_and_holds_a_full_context(monkeypatch):
    monkeypatch.setattr(kv_pool, "available_memory", lambda: 64 << 30)
    pages = size_pool_pages(DEFAULT_MODEL_PAGE_BYTES, PAGE, CPU, None, 0.85)
    assert pages * DEFAULT_MODEL_PAGE_BYTES <= 512 << 20
    assert pages * PAGE >= 8192  # the default model's context length still fits in one pool


def test_default_follows_the_memory_available(monkeypatch):
    monkeypatch.setattr(kv_pool, "available_memory", lambda: 1 << 30)  # 1 GiB free: a quarter of it
    pages = size_pool_pages(DEFAULT_MODEL_PAGE_BYTES, PAGE, CPU, None, 0.85)
    assert pages == (256 << 20) // DEFAULT_MODEL_PAGE_BYTES


def test_tiny_models_keep_at_most_65536_tokens(monkeypatch):
    monkeypatch.setattr(kv_pool, "available_memory", lambda: 64 << 30)
    assert size_pool_pages(512 * PAGE, PAGE, CPU, None, 0.85) * PAGE == 65536


def test_too_little_memory_asks_for_an_explicit_size(monkeypatch):
    monkeypatch.setattr(kv_pool, "available_memory", lambda: 64 << 20)
    with pytest.raises(RuntimeError, match="--max-total-tokens"):
        size_pool_pages(DEFAULT_MODEL_PAGE_BYTES, PAGE, CPU, None, 0.85)


def test_a_container_limit_counts_not_the_hosts_memory(monkeypatch):
    monkeypatch.setattr(kv_pool, "_meminfo_available", lambda: 64 << 30)  # the host's, seen from a pod
    monkeypatch.setattr(kv_pool, "_cgroup_room", lambda: 1 << 30)  # memory.max - memory.current
    pages = size_pool_pages(DEFAULT_MODEL_PAGE_BYTES, PAGE, CPU, None, 0.85)
    assert pages == (256 << 20) // DEFAULT_MODEL_PAGE_BYTES


def test_mem_fraction_static_is_a_share_of_the_whole_gpu_so_two_servers_fit_one() -> None:
    """--mem-fraction-static 0.4 on two servers of one 139 GiB GPU: each pool is 0.4 of the GPU minus
    its own weights, whichever server sizes its pool second (the other's memory does not count)."""
    from disagg.common.engine.kv_pool import GPU_CONTEXT_BYTES, gpu_pool_budget

    GiB = 1 << 30
    total, weights = 139 * GiB, 16 * GiB
    free = total - weights - GPU_CONTEXT_BYTES  # the first server's weights are loaded
    first = gpu_pool_budget(free, total, weights, 0.4)
    free -= first + weights + GPU_CONTEXT_BYTES  # the second server loads its weights after it
    second = gpu_pool_budget(free, total, weights, 0.4)
    assert first == second == int(0.4 * total - weights - GPU_CONTEXT_BYTES)
    assert free - second > 0  # both fit, with room to spare
    # never more than is free: a third server at 0.4 gets what is left (less the headroom), or none
    free -= second + weights + GPU_CONTEXT_BYTES
    assert gpu_pool_budget(free, total, weights, 0.4) < first
