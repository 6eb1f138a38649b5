"""Cutting documents into shards of a given attention work: the inverse of the pair count.

A query range ``[x, y)`` of one document attends ``cum_pairs(y, w) - cum_pairs(x, w)`` pairs
(:func:`distca.attention.cost.cum_pairs`, the one closed form). Scalar Python ints: the planner calls
these a few times per move, where numpy's per-call overhead would dominate.
"""

from __future__ import annotations

from math import isqrt

import numpy as np

from distca.attention.cost import cum_pairs
from distca.errors import InputError
from distca.masks import Mask


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


# -- mask families (distca.masks.Mask), vectorised over pieces or tasks -------------------------


def mask_cum(mask: Mask, length: np.ndarray, y: np.ndarray) -> np.ndarray:
    """``mask.cum(length, y)`` elementwise over int64 arrays (every family but ``slices``)."""
    length = np.asarray(length, dtype=np.int64)
    y = np.clip(np.asarray(y, dtype=np.int64), 0, length)
    f = mask.family
    if f == "causal":
        return cum_pairs(y)
    if f == "window":
        return cum_pairs(y, mask.window)
    if f == "sink_window":
        return cum_pairs(y, mask.sink + mask.window)
    if f == "chunked":
        c = mask.chunk
        n, r = np.divmod(y, c)
        return n * (c * (c + 1) // 2) + r * (r + 1) // 2
    if f == "prefix_lm":
        p = np.minimum(mask.prefix, length)
        return np.where(y <= p, y * p, p * p + cum_pairs(y) - cum_pairs(p))
    if f == "bidirectional":
        return y * length
    raise InputError("slices masks are per-document data: the scheduler takes one mask family per layer")


def mask_key_ranges(mask: Mask, length: np.ndarray, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, ...]:
    """``mask.key_ranges(length, x, y)`` elementwise, for ``x < y``: every family but ``slices`` needs at most two
    ranges, ``(a0, a1, b0, b1)`` with ``a1 < b0`` when there are two and ``b0 == b1`` (empty) when one."""
    length = np.asarray(length, dtype=np.int64)
    x = np.asarray(x, dtype=np.int64)
    y = np.asarray(y, dtype=np.int64)
    zero = np.zeros(np.broadcast(length, x, y).shape, dtype=np.int64)
    f = mask.family
    if f == "causal":
        return zero, y + zero, zero, zero
    if f == "window":
        return np.maximum(0, x - mask.window + 1) + zero, y + zero, zero, zero
    if f == "chunked":
        return x - x % mask.chunk + zero, y + zero, zero, zero
    if f == "prefix_lm":
        p = np.minimum(mask.prefix, length)
        return zero, np.where(x < p, np.maximum(p, y), y) + zero, zero, zero
    if f == "bidirectional":
        return zero, length + zero, zero, zero
    if f == "sink_window":
        w0 = np.maximum(0, x - mask.window + 1) + zero
        s1 = np.clip(np.minimum(mask.sink, y - mask.window), 0, None) + zero  # sink keys the window misses
        two = s1 < w0
        start = np.where(s1 > 0, 0, w0)  # one range: from the sink when it reaches the window
        return (np.where(two, 0, start), np.where(two, s1, y + zero), np.where(two, w0, 0), np.where(two, y + zero, 0))
    raise InputError("slices masks are per-document data: the scheduler takes one mask family per layer")


def mask_reach(mask: Mask, length: int, target: int) -> int:
    """Smallest ``y`` in ``[0, length]`` with ``mask.cum(length, y) >= target`` (``length`` if none): the inverse of
    the pair count in closed form (Python ints; ``Mask.first_reaching(length, 0, target)`` without its search)."""
    if target <= 0:
        return 0
    f = mask.family
    if f in ("causal", "window", "sink_window"):
        w = {"causal": -1, "window": mask.window, "sink_window": mask.sink + mask.window}[f]
        y = first_reaching(target, w)
    elif f == "chunked":
        c = mask.chunk
        n, rem = divmod(target, c * (c + 1) // 2)
        y = n * c + first_reaching(rem)
    elif f == "prefix_lm":
        p = min(mask.prefix, length)
        y = -(-target // p) if target <= p * p else first_reaching(target - p * p + cum_pairs(p))
    elif f == "bidirectional":
        y = -(-target // length)
    else:
        return mask.first_reaching(length, 0, target)
    return min(y, length)


def resolve_masks(doc_masks, default: Mask) -> tuple[Mask, tuple[Mask, ...] | None]:
    """The batch's attention: ``(mask, None)`` when every document attends by one family other than ``slices``
    (the uniform paths, vectorised), else ``(default, per-document masks)``. ``doc_masks``: a batch's
    ``BatchLayout.doc_masks`` (``None`` entries, or no tuple, mean ``default``)."""
    if doc_masks is None:
        return default, None
    masks = tuple(default if m is None else m for m in doc_masks)
    first = masks[0] if masks else default
    if first.family != "slices" and all(m == first for m in masks):
        return first, None
    return default, masks
