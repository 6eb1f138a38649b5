"""Exact attention work of query ranges, and its inverse, for cutting documents into shards.

``cum_pairs(y, w)`` is the number of attended (query, key) pairs of queries ``[0, y)`` of one
document: Σ_{i<y} min(i + 1, w) (``w = -1``: full causal, y(y+1)/2). A query range ``[x, y)``
costs ``cum_pairs(y) - cum_pairs(x)`` — the same number as
``distca.attention.pair_count(y - x, kv_len, w)`` for the task's key range. Scalar Python ints:
the planner calls these a few times per move, where numpy's per-call overhead would dominate.
"""

from __future__ import annotations

from math import isqrt


def cum_pairs(y: int, window: int = -1) -> int:
    """Pairs attended by queries ``[0, y)`` of a document."""
    if window < 0 or y <= window:
        return y * (y + 1) // 2
    return window * (window + 1) // 2 + (y - window) * window


def first_reaching(target: int, window: int = -1) -> int:
    """Smallest ``y >= 0`` with ``cum_pairs(y, window) >= target``."""
    if target <= 0:
        return 0
    if window < 0 or target <= window * (window + 1) // 2:
        y = (isqrt(8 * target + 1) - 1) // 2  # largest y with y(y+1)/2 <= target
        return y if y * (y + 1) // 2 >= target else y + 1
    base = window * (window + 1) // 2
    return window + -(-(target - base) // window)


def range_pairs(x: int, y: int, window: int = -1) -> int:
    """Pairs attended by queries ``[x, y)``."""
    return cum_pairs(y, window) - cum_pairs(x, window)


def key_start(x: int, window: int = -1) -> int:
    """First key a query range starting at ``x`` needs."""
    return 0 if window < 0 else max(0, x - window + 1)
