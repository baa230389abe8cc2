"""Disjoint sets of group names (union-find with path halving), for merging groups."""

from __future__ import annotations


class DisjointSets:
    """Names joined into sets; each set is named by its root."""

    def __init__(self) -> None:
        self._parent: dict[str, str] = {}

    def find(self, x: str) -> str:
        """The root of x's set (x alone is its own set)."""
        parent = self._parent
        while parent.setdefault(x, x) != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    def join(self, a: str, b: str) -> None:
        """Put a's set under b's root."""
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self._parent[ra] = rb
