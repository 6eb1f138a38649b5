"""Baseline planners, written from their published descriptions, for the scheduler benchmark.

All produce an :class:`Assignment`, so bytes and balance are counted by the same
:func:`compile_plan` as the CAD planner (same key/value deduplication, same link model).

- ``no_rebalance``: every piece stays on its trainer's home server (colocated attention).
- ``whole_doc_lpt``: whole documents placed by longest-processing-time on Σ l² work (the
  document-level balancing of WLB-LLM-style packing, without splitting documents).
- ``deficit_greedy``: the DistCA paper's communication-aware greedy (§4.2): under-loaded servers,
  largest deficit first, pull work while their deficit exceeds ε·mean; the item moved is the one with
  the lowest bytes per unit of work, where bytes charge the moved queries plus the *whole document's*
  keys/values (as the reference does); an item too big is split head–tail: m queries from the end
  of its head and m from the start of its tail (the document's middle, growing outward), which
  carry exactly m·(L + 1) pairs.
"""

from __future__ import annotations

import heapq

import numpy as np

from distca.attention.cost import AttentionShape, cum_pairs
from distca.scheduler.batch import BatchLayout
from distca.scheduler.placement import Placement
from distca.scheduler.planner import Assignment


def _assignment(doc, q0, q1, rank, row, server, capacity=0) -> Assignment:
    arr = [np.asarray(x, dtype=np.int64) for x in (doc, q0, q1, rank, row, server)]
    order = np.lexsort((arr[1], arr[0], arr[5]))
    return Assignment(*(a[order] for a in arr), capacity=capacity)


def no_rebalance(batch: BatchLayout, placement: Placement) -> Assignment:
    """Each piece on its trainer's home server."""
    homes = np.array([placement.home_server(r) for r in range(batch.n_ranks)], dtype=np.int64)
    return _assignment(batch.piece_doc, batch.piece_off, batch.piece_off + batch.piece_len, batch.piece_rank,
                       batch.piece_row, homes[batch.piece_rank])


def whole_doc_lpt(batch: BatchLayout, placement: Placement) -> Assignment:
    """Whole documents, heaviest first, each onto the least-loaded server."""
    work = cum_pairs(batch.doc_len)
    order = np.argsort(-work, kind="stable")
    heap = [(0, s) for s in range(placement.n_servers)]
    doc_server = np.empty(batch.n_docs, dtype=np.int64)
    for d in order.tolist():
        load, s = heapq.heappop(heap)
        doc_server[d] = s
        heapq.heappush(heap, (load + int(work[d]), s))
    return _assignment(batch.piece_doc, batch.piece_off, batch.piece_off + batch.piece_len, batch.piece_rank,
                       batch.piece_row, doc_server[batch.piece_doc])


def deficit_greedy(batch: BatchLayout, placement: Placement, eps: float = 0.1,
                   shape: AttentionShape | None = None) -> Assignment:
    """The paper's deficit-filling greedy with head–tail splits (full causal attention)."""
    shape = shape or AttentionShape()
    qb = int(shape.q_bytes(1))
    kvb = int(shape.kv_bytes(1))
    n = placement.n_servers
    # Items: a head range [h0, h1) and a tail range [t0, t1) of one document piece (tail may be empty).
    homes = np.array([placement.home_server(r) for r in range(batch.n_ranks)], dtype=np.int64)
    items = []  # [doc, h0, h1, t0, t1, rank, row_base, server]
    for i in range(batch.n_pieces):
        a = int(batch.piece_off[i])
        b = a + int(batch.piece_len[i])
        mid = (a + b) // 2
        items.append([int(batch.piece_doc[i]), a, mid, mid, b, int(batch.piece_rank[i]),
                      int(batch.piece_row[i]) - a, int(homes[batch.piece_rank[i]])])
    cap = 2 * len(items) + 16
    work = np.zeros(cap)
    server = np.zeros(cap, dtype=np.int64)
    length = np.ones(cap)
    for i, it in enumerate(items):
        work[i], server[i], length[i] = _item_work(it), it[7], batch.doc_len[it[0]]
    count = len(items)
    load = np.bincount(server[:count], weights=work[:count], minlength=n).astype(np.float64)
    mean = load.sum() / n
    for recipient in np.argsort(load - mean, kind="stable").tolist():  # largest deficit first
        while mean - load[recipient] > eps * mean:
            need = mean - load[recipient]
            w, srv, ln = work[:count], server[:count], length[:count]
            surplus = load[srv] - mean
            ok = (srv != recipient) & (surplus > 0) & (w > 0)
            if not ok.any():
                break
            df = np.minimum(np.minimum(surplus, need), w)
            with np.errstate(divide="ignore", invalid="ignore"):
                score = np.where(ok, (qb * df / (ln + 1) + kvb * ln) / df, np.inf)  # the reference's priority
            best = int(np.argmin(score))
            it = items[best]
            df_best = float(df[best])
            if df_best >= work[best]:
                load[it[7]] -= work[best]
                load[recipient] += work[best]
                it[7] = server[best] = recipient
                continue
            moved = _split_middle(it, df_best)
            if moved is None:
                break
            if count == cap:
                cap *= 2
                work, server, length = (np.resize(a, cap) for a in (work, server, length))
            mw = _item_work(moved)
            moved[7] = recipient
            items.append(moved)
            work[count], server[count], length[count] = mw, recipient, length[best]
            count += 1
            load[it[7]] -= mw
            work[best] = _item_work(it)
            load[recipient] += mw
    rows = []
    for it in items:
        doc, h0, h1, t0, t1, rank, base, server = it
        for a, b in ((h0, h1), (t0, t1)):
            if b > a:
                rows.append((doc, a, b, rank, base + a, server))
    cols = list(zip(*rows, strict=True))
    return _assignment(*cols)


def _item_work(it) -> int:
    return cum_pairs(it[2]) - cum_pairs(it[1]) + cum_pairs(it[4]) - cum_pairs(it[3])


def _split_middle(it, df: float):
    """Split off the innermost m head and m tail queries (≈ df pairs); the item keeps the outer ones."""
    doc, h0, h1, t0, t1, rank, base, server = it
    if t1 > t0 and h1 > h0:
        per = h1 + t0 + 1  # pairs of query h1-1-i plus query t0+i (adjacent middles: exact for h1 == t0)
        m = max(1, min(int(df // per), h1 - h0, t1 - t0))
        it[2], it[3] = h1 - m, t0 + m
        return [doc, h1 - m, h1, t0, t0 + m, rank, base, server]
    a, b = (h0, h1) if h1 > h0 else (t0, t1)
    if b - a < 2:
        return None
    x = b - max(1, min(b - a - 1, int(df // b)))  # a suffix of ≈ df pairs
    if h1 > h0:
        it[2] = x
    else:
        it[4] = x
    return [doc, x, b, 0, 0, rank, base, server]
