"""Prefix cache bookkeeping: shared pages, locks that stop eviction, LRU order, exact page accounting."""

from __future__ import annotations

import torch
from disagg.common.engine.kv_pool import KVPagePool, OutOfPagesError
from disagg.common.engine.radix_cache import RadixCache


def _pool(num_pages=16, page_size=2):
    return KVPagePool(num_pages, page_size, 1, 1, 2, torch.float32, torch.device("cpu"))


def test_match_insert_and_split():
    pool = _pool()
    cache = RadixCache(pool)
    pages = pool.allocate(3)
    assert cache.insert([1, 2, 3, 4, 5, 6], pages) == 0
    got, node = cache.match_prefix([1, 2, 3, 4, 9, 9])  # diverges inside the node: split after 2 pages
    assert got == pages[:2]
    other = pool.allocate(2)
    assert cache.insert([1, 2, 3, 4, 7, 8], pages[:2] + other[1:]) == 2  # first two already cached
    pool.free(other[:1])
    assert cache.match_prefix([1, 2, 3, 4, 7, 8, 0])[0] == pages[:2] + other[1:]
    assert cache.num_cached_pages == 4
    assert cache.match_prefix([1])[0] == []  # partial pages never match


def test_locked_pages_are_never_evicted_and_lru_goes_first():
    pool = _pool(num_pages=6)
    cache = RadixCache(pool)
    a, b = pool.allocate(2), pool.allocate(2)
    cache.insert([1, 1, 2, 2], a)
    cache.insert([3, 3, 4, 4], b)
    _, node = cache.match_prefix([1, 1, 2, 2])
    cache.lock(node)
    assert cache.num_evictable_pages == 2
    assert cache.evict(10) == 2  # only b's pages
    assert cache.match_prefix([3, 3])[0] == [] and cache.match_prefix([1, 1])[0] == a[:1]
    cache.unlock(node)
    c = pool.allocate(2)
    cache.insert([5, 5, 6, 6], c)
    cache.match_prefix([5, 5, 6, 6])  # c is now more recent than a
    assert cache.evict(1) == 1  # a's last page (the least recently used leaf)
    assert cache.match_prefix([5, 5, 6, 6])[0] == c and cache.match_prefix([1, 1, 2, 2])[0] == a[:1]
    cache.reset()
    assert pool.num_free_pages == pool.num_pages


def test_pool_accounting():
    pool = _pool(num_pages=4)
    pages = pool.allocate(4)
    try:
        pool.allocate(1)
        raise AssertionError("allocation past the pool must fail")
    except OutOfPagesError:
        pass
    pool.free(pages)
    assert pool.num_free_pages == 4
    try:
        pool.free(pages[:1])
        raise AssertionError("double free must fail")
    except RuntimeError:
        pass
