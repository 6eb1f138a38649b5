"""CA tasks: a query shard of one document plus exactly the keys its mask lets it see.

Convention (the project's one, pinned by tests): a query at document position ``p`` sees keys
``[0, p]`` under full causal attention (``window=-1``) and ``[max(0, p - w + 1), p]`` under a
sliding window of ``w`` keys (itself included). A shard ``[q0, q1)`` therefore needs keys
``[0, q1)`` or ``[max(0, q0 - w + 1), q1)``. Inside a task the causal mask is bottom-right
aligned: with ``q_len`` queries and ``kv_len`` keys, query ``i`` sits at key ``kv_len - q_len + i``.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

FULL = -1  # window value meaning "full causal attention"


def key_range(q0: int, q1: int, window: int = FULL) -> tuple[int, int]:
    """Key range ``[k0, k1)`` of a document that queries ``[q0, q1)`` may attend to."""
    if not 0 <= q0 <= q1:
        raise ValueError(f"query range must satisfy 0 <= q0 <= q1, got [{q0}, {q1})")
    _check_window(window)
    if window == FULL:
        return 0, q1
    return max(0, q0 - window + 1), q1


def _check_window(window: int) -> None:
    if window != FULL and window < 1:
        raise ValueError(f"window must be -1 (full causal) or >= 1 keys, got {window}")


@dataclass(frozen=True, slots=True)
class CATask:
    """One core-attention task: query tokens ``[q_start, q_end)`` of document ``doc_id``
    attending to that document's keys ``[k_start, k_end)``."""

    doc_id: int
    q_start: int
    q_end: int
    k_start: int
    k_end: int
    window: int = FULL

    def __post_init__(self) -> None:
        expected = key_range(self.q_start, self.q_end, self.window)
        if (self.k_start, self.k_end) != expected:
            raise ValueError(
                f"task of doc {self.doc_id} with queries [{self.q_start}, {self.q_end}) and window "
                f"{self.window} must attend keys [{expected[0]}, {expected[1]}), "
                f"got [{self.k_start}, {self.k_end})"
            )

    @classmethod
    def for_queries(cls, doc_id: int, q_start: int, q_end: int, window: int = FULL) -> CATask:
        """The task for a query shard, with the key range its mask implies."""
        k0, k1 = key_range(q_start, q_end, window)
        return cls(doc_id, q_start, q_end, k0, k1, window)

    @property
    def q_len(self) -> int:
        return self.q_end - self.q_start

    @property
    def kv_len(self) -> int:
        return self.k_end - self.k_start


def shard_document(
    doc_id: int, length: int, cuts: list[int] | np.ndarray, window: int = FULL
) -> list[CATask]:
    """Cut a document of ``length`` tokens at the given interior positions into tasks."""
    if length < 0:
        raise ValueError(f"document length must be >= 0, got {length}")
    bounds = [0, *sorted(int(c) for c in cuts), length]
    if any(b < 0 or b > length for b in bounds) or len(set(bounds[1:-1])) != len(bounds) - 2:
        raise ValueError(f"cuts must be distinct positions inside (0, {length}), got {list(cuts)}")
    return [
        CATask.for_queries(doc_id, a, b, window) for a, b in itertools.pairwise(bounds) if b > a
    ]


def uniform_cuts(length: int, shard_tokens: int) -> list[int]:
    """Interior cut positions that split ``length`` tokens into shards of ``shard_tokens``."""
    if shard_tokens < 1:
        raise ValueError(f"shard_tokens must be >= 1, got {shard_tokens}")
    return list(range(shard_tokens, length, shard_tokens))


def varlen_metadata(tasks: list[CATask]) -> tuple[np.ndarray, np.ndarray, int, int]:
    """``cu_seqlens_q``, ``cu_seqlens_k`` (int32) and max lengths for a fused call over tasks."""
    q_lens = np.fromiter((t.q_len for t in tasks), dtype=np.int64, count=len(tasks))
    k_lens = np.fromiter((t.kv_len for t in tasks), dtype=np.int64, count=len(tasks))
    cu_q = np.zeros(len(tasks) + 1, dtype=np.int32)
    cu_k = np.zeros(len(tasks) + 1, dtype=np.int32)
    np.cumsum(q_lens, out=cu_q[1:])
    np.cumsum(k_lens, out=cu_k[1:])
    return cu_q, cu_k, int(q_lens.max(initial=0)), int(k_lens.max(initial=0))


def task_row_indices(tasks: list[CATask], doc_starts: list[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row indices into packed ``[tokens, ...]`` tensors for a fused call over ``tasks``.

    ``doc_starts[d]`` is the packed row of document ``d``'s first token. Returns ``(q_rows, k_rows)``
    so that ``q[q_rows]`` and ``k[k_rows]`` are the fused call's inputs in task order; gradients go
    back with ``index_add_`` (a key row used by several tasks gets their gradients summed).
    """
    starts = np.asarray(doc_starts, dtype=np.int64)
    doc = np.fromiter((t.doc_id for t in tasks), dtype=np.int64, count=len(tasks))
    q0 = np.fromiter((t.q_start for t in tasks), dtype=np.int64, count=len(tasks)) + starts[doc]
    k0 = np.fromiter((t.k_start for t in tasks), dtype=np.int64, count=len(tasks)) + starts[doc]
    q_len = np.fromiter((t.q_len for t in tasks), dtype=np.int64, count=len(tasks))
    k_len = np.fromiter((t.kv_len for t in tasks), dtype=np.int64, count=len(tasks))
    return row_ranges(q0, q_len), row_ranges(k0, k_len)


def row_ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenation of ``arange(s, s + n)`` for each pair, vectorised (int64)."""
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    offsets = np.repeat(starts - np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths)
    return np.arange(total, dtype=np.int64) + offsets
