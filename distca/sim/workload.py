"""Steps of documents for the simulator: the paper's length distributions, packed three ways.

- :func:`sample_documents`: a step's documents, ``pretrain`` or ``prolong`` elongated the paper's way
  (``f = MaxDocLen / 64K``, longer documents cut at ``MaxDocLen``).
- :func:`plain_packing`: equal tokens per replica and micro-batch, documents split at replica
  boundaries (what DistCA trains with; the colocated baseline attends it as is).
- :func:`wlb_packing`: WLB-LLM-style variable-length packing: whole documents onto
  ``groups x micro_batches`` slots, heaviest first, each onto the slot with the least estimated time
  that still has room (token cap ``(1 + slack) x`` the mean, the memory headroom variable-length packing
  needs); the estimate is the simulator's own linear + attention cost, so this is the "ideal" version.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable

import numpy as np

from distca.data.distributions import LengthDistribution
from distca.data.packing import pack_into_ranks
from distca.sim.step import MicroBatch

PAPER_BASE_LEN = 64 * 1024  # the paper's elongation: f = MaxDocLen / 64K


def sample_documents(dist: str, max_len: int, total_tokens: int, seed: int) -> np.ndarray:
    """Document lengths summing to ``total_tokens``, none longer than ``max_len``."""
    d = LengthDistribution(dist, elongate=max_len / PAPER_BASE_LEN)
    raw = d.sample(total_tokens=total_tokens, seed=seed)
    out = []
    for n in raw.tolist():
        while n > max_len:
            out.append(max_len)
            n -= max_len
        if n:
            out.append(n)
    return np.asarray(out, dtype=np.int64)


def plain_packing(lengths: np.ndarray, replicas: int, tokens_per_replica: int, micro_batches: int) -> list[MicroBatch]:
    """Documents in order, ``tokens_per_replica`` per replica per micro-batch, split at boundaries (a
    document cut between micro-batches starts afresh in the next one)."""
    per = replicas * tokens_per_replica
    if int(lengths.sum()) < per * micro_batches:
        raise ValueError(f"{int(lengths.sum())} tokens given, {per * micro_batches} needed")
    csum = np.cumsum(lengths)
    out = []
    for m in range(micro_batches):
        lo, hi = m * per, (m + 1) * per
        i0 = int(np.searchsorted(csum, lo, side="right"))  # document holding token lo
        i1 = int(np.searchsorted(csum, hi - 1, side="right"))  # document holding token hi - 1
        if i0 == i1:
            part = np.asarray([hi - lo], dtype=np.int64)
        else:
            part = lengths[i0:i1 + 1].copy()
            part[0] = int(csum[i0]) - lo
            part[-1] = hi - int(csum[i1 - 1])
        p = pack_into_ranks(part, replicas, tokens_per_replica)
        out.append(MicroBatch(p.ranks, p.continues))
    return out


def wlb_packing(lengths: np.ndarray, groups: int, micro_batches: int, cost: Callable[[int], float],
                slack: float = 0.1) -> list[MicroBatch]:
    """Whole documents over ``groups x micro_batches`` slots, balancing ``cost`` under a token cap."""
    slots = groups * micro_batches
    cap = (1.0 + slack) * float(lengths.sum()) / slots
    order = np.argsort(-lengths, kind="stable")
    heap = [(0.0, i) for i in range(slots)]
    tokens = [0] * slots
    docs: list[list[int]] = [[] for _ in range(slots)]
    for d in order.tolist():
        n = int(lengths[d])
        skipped = []
        while heap:
            load, i = heapq.heappop(heap)
            if tokens[i] + n <= cap or not heap:
                break
            skipped.append((load, i))
        else:  # pragma: no cover - heap never empties before the break
            raise RuntimeError("no slot")
        if tokens[i] + n > cap:  # nothing had room: the least-loaded of all takes it
            skipped.append((load, i))
            load, i = min(skipped)
            skipped.remove((load, i))
        docs[i].append(n)
        tokens[i] += n
        heapq.heappush(heap, (load + cost(n), i))
        for s in skipped:
            heapq.heappush(heap, s)
    return [MicroBatch.whole([docs[m * groups + g] or [1] for g in range(groups)]) for m in range(micro_batches)]
