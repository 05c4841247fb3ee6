"""Routing policies: one small ABC, a registry, and `create_policy(name, config)`.

Contract of the plug point: `select(workers, text)` gets a non-empty list of available workers of
one role and returns one of them; `text` is the request's prompt text, or None unless the policy
sets `needs_text`. Policies run on the event loop: they must be quick and never block.
"""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import ClassVar

from disagg.router.config import RouterConfig
from disagg.router.prefix_tree import PrefixTree
from disagg.router.workers import Worker


class Policy(ABC):
    name: ClassVar[str]
    needs_text: ClassVar[bool] = False

    def __init__(self, config: RouterConfig):
        self.config = config

    @abstractmethod
    def select(self, workers: Sequence[Worker], text: str | None) -> Worker: ...

    def on_worker_removed(self, worker: Worker) -> None:  # noqa: B027 (optional hook)
        pass

    def evict(self) -> None:  # noqa: B027 (optional hook, called every --eviction-interval-secs)
        pass


class RoundRobinPolicy(Policy):
    name = "round_robin"

    def __init__(self, config: RouterConfig):
        super().__init__(config)
        self._next = 0

    def select(self, workers: Sequence[Worker], text: str | None) -> Worker:
        worker = workers[self._next % len(workers)]
        self._next += 1
        return worker


class RandomPolicy(Policy):
    name = "random"

    def select(self, workers: Sequence[Worker], text: str | None) -> Worker:
        return random.choice(workers)


class PowerOfTwoPolicy(Policy):
    """Two random picks; the one with fewer requests in flight through this router wins."""

    name = "power_of_two"

    def select(self, workers: Sequence[Worker], text: str | None) -> Worker:
        if len(workers) == 1:
            return workers[0]
        a, b = random.sample(workers, 2)
        return a if a.outstanding <= b.outstanding else b


class CacheAwarePolicy(Policy):
    """Longest cached prefix wins (match ratio > --cache-threshold), unless load is unbalanced.

    Load is unbalanced when max - min outstanding > --balance-abs-threshold and
    max > min * --balance-rel-threshold; then the least loaded worker wins. Below the threshold
    the worker with the smallest tree (the most free cache, approximately) wins.
    """

    name = "cache_aware"
    needs_text = True

    def __init__(self, config: RouterConfig):
        super().__init__(config)
        self.trees: dict[str, PrefixTree] = {}

    def select(self, workers: Sequence[Worker], text: str | None) -> Worker:
        worker = self._choose(workers, text or "")
        if text:
            self._tree(worker).insert(text)
        return worker

    def _choose(self, workers: Sequence[Worker], text: str) -> Worker:
        loads = [w.outstanding for w in workers]
        lo, hi = min(loads), max(loads)
        unbalanced = (
            hi - lo > self.config.balance_abs_threshold and hi > lo * self.config.balance_rel_threshold
        )
        if unbalanced or not text:
            return workers[loads.index(lo)]
        matches = [self._tree(w).match_len(text) for w in workers]
        best = max(range(len(workers)), key=matches.__getitem__)
        if matches[best] / len(text) > self.config.cache_threshold:
            return workers[best]
        return min(workers, key=lambda w: (self._tree(w).size, w.outstanding))

    def _tree(self, worker: Worker) -> PrefixTree:
        tree = self.trees.get(worker.url)
        if tree is None:
            tree = self.trees[worker.url] = PrefixTree()
        return tree

    def on_worker_removed(self, worker: Worker) -> None:
        self.trees.pop(worker.url, None)

    def evict(self) -> None:
        for tree in self.trees.values():
            tree.evict(self.config.max_tree_size)


POLICIES: dict[str, type[Policy]] = {
    cls.name: cls for cls in (RoundRobinPolicy, RandomPolicy, PowerOfTwoPolicy, CacheAwarePolicy)
}


def create_policy(name: str, config: RouterConfig) -> Policy:
    try:
        return POLICIES[name](config)
    except KeyError:
        raise ValueError(f"unknown policy {name!r}; choose one of {', '.join(POLICIES)}") from None


def request_text(body: dict) -> str:
    """The prompt as text, for prefix matching: /generate `text`, completions `prompt`, chat messages."""
    for key in ("text", "prompt"):
        value = body.get(key)
        if isinstance(value, str):
            return value
        if isinstance(value, list) and value and isinstance(value[0], str):
            return value[0]
        if isinstance(value, list) and value:  # token ids: compare them as text
            return " ".join(map(str, value if isinstance(value[0], int) else value[0]))
    messages = body.get("messages")
    if isinstance(messages, list):
        parts = []
        for m in messages:
            content = m.get("content") if isinstance(m, dict) else None
            if isinstance(content, str):
                parts.append(content)
            elif isinstance(content, list):
                parts.extend(p.get("text", "") for p in content if isinstance(p, dict))
        return "\n".join(parts)
    ids = body.get("input_ids")
    if isinstance(ids, list) and ids:
        return " ".join(map(str, ids if isinstance(ids[0], int) else ids[0]))
    return ""
