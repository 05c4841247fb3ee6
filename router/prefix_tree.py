"""An approximate prefix tree over request text (characters) for cache-aware routing.

One tree per worker approximates what that worker has in its radix cache: the router never sees
tokens, so characters stand in for them, and leaves are evicted LRU once the tree holds more than
`max_size` characters (as SGLang's router does).
"""

from __future__ import annotations

import heapq
import time


def common_prefix_len(a: str, b: str) -> int:
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # a[:lo] == b[:lo] and a[:hi] != b[:hi]; slice compares run in C
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid
    return lo


class _Node:
    __slots__ = ("edge", "children", "parent", "last_access")

    def __init__(self, edge: str, parent: _Node | None):
        self.edge = edge
        self.children: dict[str, _Node] = {}
        self.parent = parent
        self.last_access = time.monotonic()


class PrefixTree:
    def __init__(self) -> None:
        self.root = _Node("", None)
        self.size = 0  # characters stored on all edges

    def match_len(self, text: str) -> int:
        """Length of the longest stored prefix of `text`; touches the matched path (LRU)."""
        node, i, now = self.root, 0, time.monotonic()
        while i < len(text):
            child = node.children.get(text[i])
            if child is None:
                break
            n = common_prefix_len(child.edge, text[i : i + len(child.edge)])
            child.last_access = now
            i += n
            if n < len(child.edge):
                break
            node = child
        return i

    def insert(self, text: str) -> None:
        node, i, now = self.root, 0, time.monotonic()
        while i < len(text):
            child = node.children.get(text[i])
            if child is None:
                leaf = _Node(text[i:], node)
                node.children[text[i]] = leaf
                self.size += len(leaf.edge)
                return
            n = common_prefix_len(child.edge, text[i : i + len(child.edge)])
            child.last_access = now
            if n < len(child.edge):
                child = self._split(child, n)
            node, i = child, i + n

    def _split(self, child: _Node, n: int) -> _Node:
        """Cut `child`'s edge after n characters; return the new upper node."""
        parent = child.parent
        upper = _Node(child.edge[:n], parent)
        upper.last_access = child.last_access
        parent.children[upper.edge[0]] = upper
        child.edge = child.edge[n:]
        child.parent = upper
        upper.children[child.edge[0]] = child
        return upper

    def evict(self, max_size: int) -> None:
        """Drop least recently used leaves until at most `max_size` characters remain."""
        if self.size <= max_size:
            return
        heap = [(n.last_access, id(n), n) for n in self._leaves()]
        heapq.heapify(heap)
        while self.size > max_size and heap:
            _, _, leaf = heapq.heappop(heap)
            parent = leaf.parent
            del parent.children[leaf.edge[0]]
            self.size -= len(leaf.edge)
            if parent is not self.root and not parent.children:
                heapq.heappush(heap, (parent.last_access, id(parent), parent))

    def _leaves(self) -> list[_Node]:
        leaves, stack = [], [self.root]
        while stack:
            node = stack.pop()
            if node.children:
                stack.extend(node.children.values())
            elif node is not self.root:
                leaves.append(node)
        return leaves
