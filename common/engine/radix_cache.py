"""Radix (prefix) cache over KV pages: requests that share a prompt prefix share its pages.

Keys are token ids in whole pages (a partial last page is never cached). A node's `lock_ref`
counts the running requests using it or a descendant; only unlocked leaves are evicted, least
recently used first, and their pages go back to the pool.
"""

from __future__ import annotations

import heapq
import itertools

from disagg.common.engine.kv_pool import KVPagePool

_clock = itertools.count()


class TreeNode:
    __slots__ = ("children", "parent", "key", "pages", "lock_ref", "last_access")

    def __init__(
        self, parent: TreeNode | None = None, key: list[int] | None = None, pages: list[int] | None = None
    ):
        self.children: dict[tuple[int, ...], TreeNode] = {}  # keyed by the tokens of the child's first page
        self.parent = parent
        self.key = key or []  # tokens, len == len(pages) * page_size
        self.pages = pages or []
        self.lock_ref = 0
        self.last_access = next(_clock)

    def __lt__(self, other: TreeNode) -> bool:
        return self.last_access < other.last_access


class RadixCache:
    def __init__(self, pool: KVPagePool, disabled: bool = False):
        self.pool = pool
        self.page_size = pool.page_size
        self.disabled = disabled
        self.root = TreeNode()
        self.root.lock_ref = 1  # never evicted
        self.num_cached_pages = 0
        self.num_evictable_pages = 0
        self.hit_tokens = 0
        self.query_tokens = 0

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.query_tokens if self.query_tokens else 0.0

    def match_prefix(self, tokens: list[int]) -> tuple[list[int], TreeNode]:
        """Pages of the longest cached whole-page prefix of `tokens`, and the node where it ends."""
        self.query_tokens += len(tokens)
        if self.disabled:
            return [], self.root
        ps, node, pages, pos = self.page_size, self.root, [], 0
        while pos + ps <= len(tokens):
            child = node.children.get(tuple(tokens[pos : pos + ps]))
            if child is None:
                break
            n = self._match_len(child.key, tokens[pos:])
            if n < len(child.key):
                child = self._split(child, n)
            child.last_access = next(_clock)
            pages += child.pages
            pos += n
            node = child
        self.hit_tokens += pos
        return pages, node

    def lock(self, node: TreeNode) -> None:
        while node is not self.root:
            if node.lock_ref == 0:
                self.num_evictable_pages -= len(node.pages)
            node.lock_ref += 1
            node = node.parent

    def unlock(self, node: TreeNode) -> None:
        while node is not self.root:
            node.lock_ref -= 1
            if node.lock_ref == 0:
                self.num_evictable_pages += len(node.pages)
            node = node.parent

    def insert(self, tokens: list[int], pages: list[int]) -> int:
        """Cache `pages` (one per whole page of `tokens`). Returns how many leading pages were
        already cached: the caller still owns its copies of those and must free the ones it
        does not share with the tree. The rest now belong to the tree."""
        ps = self.page_size
        assert len(tokens) == len(pages) * ps
        if self.disabled:  # the tree keeps nothing: the caller frees every page
            return len(pages)
        node, pos = self.root, 0
        while pos < len(tokens):
            child = node.children.get(tuple(tokens[pos : pos + ps]))
            if child is None:
                new = TreeNode(node, tokens[pos:], pages[pos // ps :])
                node.children[tuple(tokens[pos : pos + ps])] = new
                self.num_cached_pages += len(new.pages)
                self.num_evictable_pages += len(new.pages)
                return pos // ps
            n = self._match_len(child.key, tokens[pos:])
            if n < len(child.key):
                child = self._split(child, n)
            child.last_access = next(_clock)
            pos += n
            node = child
        return len(pages)

    def evict(self, num_pages: int) -> int:
        """Free at least `num_pages` pages from unlocked leaves (LRU first); returns pages freed."""
        leaves = [n for n in self._nodes() if not n.children and n.lock_ref == 0]
        heapq.heapify(leaves)
        freed = 0
        while freed < num_pages and leaves:
            leaf = heapq.heappop(leaves)
            self.pool.free(leaf.pages)
            freed += len(leaf.pages)
            self.num_cached_pages -= len(leaf.pages)
            self.num_evictable_pages -= len(leaf.pages)
            parent = leaf.parent
            del parent.children[tuple(leaf.key[: self.page_size])]
            if parent is not self.root and not parent.children and parent.lock_ref == 0:
                heapq.heappush(leaves, parent)
        return freed

    def reset(self) -> None:
        """Drop every unlocked page (all requests must be finished)."""
        self.evict(self.num_cached_pages)

    def _match_len(self, key: list[int], tokens: list[int]) -> int:
        """Length of the common prefix, in whole pages."""
        ps, n = self.page_size, 0
        limit = min(len(key), len(tokens))
        while n + ps <= limit and key[n : n + ps] == tokens[n : n + ps]:
            n += ps
        return n

    def _split(self, node: TreeNode, n: int) -> TreeNode:
        """Split `node` after its first n tokens; returns the new upper part."""
        ps = self.page_size
        upper = TreeNode(node.parent, node.key[:n], node.pages[: n // ps])
        upper.lock_ref = node.lock_ref
        upper.last_access = node.last_access
        node.parent.children[tuple(node.key[:ps])] = upper
        node.key, node.pages, node.parent = node.key[n:], node.pages[n // ps :], upper
        upper.children[tuple(node.key[:ps])] = node
        return upper

    def _nodes(self):
        stack = [self.root]
        while stack:
            node = stack.pop()
            if node is not self.root:
                yield node
            stack.extend(node.children.values())
