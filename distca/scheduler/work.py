"""Cutting documents into shards of a given attention work: the inverse of the pair count.

A query range ``[x, y)`` of one document attends ``cum_pairs(y, w) - cum_pairs(x, w)`` pairs
(:func:`distca.attention.cost.cum_pairs`, the one closed form). Scalar Python ints: the planner calls
these a few times per move, where numpy's per-call overhead would dominate.
"""

from __future__ import annotations

from math import isqrt

from distca.attention.cost import cum_pairs


def first_reaching(target: int, window: int = -1) -> int:
    """Smallest ``y >= 0`` with ``cum_pairs(y, window) >= target``."""
    if target <= 0:
        return 0
    if window < 0 or target <= cum_pairs(window, window):
        y = (isqrt(8 * target + 1) - 1) // 2  # largest y with y(y+1)/2 <= target
        return y if cum_pairs(y) >= target else y + 1
    base = cum_pairs(window, window)  # the first w queries; each later one adds w pairs
    return window + -(-(target - base) // window)


def key_start(x: int, window: int = -1) -> int:
    """First key a query range starting at ``x`` needs."""
    return 0 if window < 0 else max(0, x - window + 1)
