"""Compile an assignment into a Plan: tasks plus the exact rows every trainer and server moves.

Forward: trainer → server sends q rows (``q_xfer``) and k/v rows (``kv_xfer``); the server
returns out and lse on the q rows, reversed. Backward (servers keep nothing): the trainer resends
q, out, dout, lse on the same q rows and k, v on the same kv rows; the server returns dq on the q
rows and dk, dv on the kv rows, reversed. Each server holds one copy of every key/value token it
needs per document (the hull of its tasks' key ranges), so a key/value slice used by several tasks
there is sent once, and its gradients are summed on the server before they return.

Mask families (:class:`~distca.masks.Mask`): a task's keys are exactly the key ranges its mask lets
its queries see (a sink and a window are two runs; a prefix-LM shard before the prefix's end sees keys after
its queries). A server's kv buffer holds, per document, the union of its tasks' ranges as sorted disjoint
runs; ``key_*`` give each task's ranges and where they sit in that buffer, and ``mask.rects`` the rectangles
a kernel runs (:func:`distca.scheduler.calls.server_rects`). Causal and sliding-window plans keep one key
hull per (server, document) and are byte-identical to plans made before families existed.

Rows are token indices; byte offsets are ``row × row_bytes(tensor)`` with the attention shape's
per-token sizes (``Plan.row_bytes``). A trainer's local rows are its pieces laid out in order.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from distca.attention.cost import AttentionShape, cum_pairs
from distca.errors import InputError
from distca.masks import SLICE_TYPES, Mask
from distca.scheduler.batch import BatchLayout
from distca.scheduler.placement import Placement
from distca.scheduler.planner import Assignment
from distca.scheduler.work import mask_cum, mask_key_ranges, resolve_masks


@dataclass(frozen=True)
class Transfers:
    """Row-range copies from a trainer's local buffer to a server's receive buffer, ordered by server,
    then destination row (a server's receive buffer is filled front to back)."""

    rank: np.ndarray
    server: np.ndarray
    src_row: np.ndarray
    dst_row: np.ndarray
    n: np.ndarray
    remote: np.ndarray  # bool: crosses devices (costs link bytes)

    def between(self, rank: int, server: int) -> Transfers:
        """The copies from ``rank`` to ``server``."""
        m = (self.rank == rank) & (self.server == server)
        return Transfers(*(getattr(self, f)[m] for f in ("rank", "server", "src_row", "dst_row", "n", "remote")))

    @property
    def rows(self) -> int:
        return int(self.n.sum())

    def digest(self) -> bytes:
        return b"".join(getattr(self, f).tobytes() for f in ("rank", "server", "src_row", "dst_row", "n", "remote"))


@dataclass(frozen=True)
class Plan:
    """Everything one (nano-)batch's core attention needs, for forward and backward."""

    n_ranks: int
    n_servers: int
    window: int  # the runtime window (-1 causal, w); -1 as well for other families (see ``mask``)
    capacity: int  # planned bound on per-server work (pairs)
    shape: AttentionShape
    # tasks, sorted by (server, doc, q0); server == LOCAL (-1) runs on the trainer itself
    task_doc: np.ndarray
    task_q0: np.ndarray
    task_q1: np.ndarray
    task_k0: np.ndarray  # the task's key hull [k0, k1) (its exact ranges: key_*)
    task_k1: np.ndarray
    task_rank: np.ndarray  # trainer holding the task's queries
    task_row: np.ndarray  # first query row in that trainer's local buffer
    task_server: np.ndarray
    task_q_row: np.ndarray  # first query row in the server's q buffer (trainer row for LOCAL)
    task_kv_row: np.ndarray  # row of the task's first key range in the server's kv buffer (-1 for LOCAL)
    task_pairs: np.ndarray
    server_q_rows: np.ndarray  # receive-buffer sizes, rows per server
    server_kv_rows: np.ndarray
    q_xfer: Transfers
    kv_xfer: Transfers
    server_pairs: np.ndarray = field(repr=False)
    mask: Mask = field(default_factory=Mask.causal)  # the family every task's queries attend by
    doc_len: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64), repr=False)
    # Each task's exact key ranges, CSR: task i's are [key_k0[j], key_k1[j]) for j in key_ptr[i]:key_ptr[i + 1],
    # sorted and disjoint, starting at row key_row[j] of its server's kv buffer (-1 for LOCAL tasks).
    key_ptr: np.ndarray = field(default_factory=lambda: np.zeros(1, dtype=np.int64), repr=False)
    key_k0: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64), repr=False)
    key_k1: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64), repr=False)
    key_row: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64), repr=False)
    # One mask per document when the batch's documents attend by different masks or by ``slices``
    # (``BatchLayout.with_masks``); ``None``: every document by ``mask``.
    doc_masks: tuple[Mask, ...] | None = field(default=None, repr=False)
    # Tells apart plans of equal content that are in flight together (the independent halves of a ping-pong
    # micro-batch may pack alike): part of the digest, hence of the plan id, when not 0.
    tag: int = 0

    def tagged(self, tag: int) -> Plan:
        """This plan under another tag (:attr:`tag`)."""
        return self if tag == self.tag else replace(self, tag=int(tag))

    @property
    def n_tasks(self) -> int:
        return int(self.task_doc.size)

    @property
    def masked(self) -> bool:
        """Whether the plan's tasks run as rectangles: a family other than causal or a sliding window, or
        per-document masks."""
        return self.doc_masks is not None or self.mask.as_window is None

    def doc_mask(self, doc: int) -> Mask:
        """Document ``doc``'s mask."""
        return self.mask if self.doc_masks is None else self.doc_masks[doc]

    def task_key_ranges(self, i: int) -> list[tuple[int, int, int]]:
        """Task ``i``'s exact key ranges as ``(k0, k1, first row in its server's kv buffer)``."""
        j0, j1 = int(self.key_ptr[i]), int(self.key_ptr[i + 1])
        return list(zip(self.key_k0[j0:j1].tolist(), self.key_k1[j0:j1].tolist(), self.key_row[j0:j1].tolist(),
                        strict=True))

    def row_bytes(self, tensor: str) -> int:
        """Bytes per row of ``q``, ``out``, ``dout``, ``dq`` (query heads), ``k``, ``v``, ``dk``, ``dv``
        (kv heads) or ``lse`` (fp32 per query head)."""
        if tensor in ("q", "out", "dout", "dq"):
            return int(self.shape.q_bytes(1))
        if tensor in ("k", "v", "dk", "dv"):
            return int(self.shape.kv_bytes(1)) // 2  # kv_bytes counts k and v together
        if tensor == "lse":
            return int(self.shape.lse_bytes(1))
        raise ValueError(f"unknown tensor {tensor!r}")

    @property
    def max_over_mean(self) -> float:
        mean = self.server_pairs.mean()
        return float(self.server_pairs.max() / mean) if mean > 0 else 1.0

    @property
    def bytes_moved(self) -> int:
        """Forward dispatch bytes that cross devices: q, k and v sent to remote servers."""
        q = int(self.q_xfer.n[self.q_xfer.remote].sum()) * self.row_bytes("q")
        kv = int(self.kv_xfer.n[self.kv_xfer.remote].sum()) * (self.row_bytes("k") + self.row_bytes("v"))
        return q + kv

    @property
    def bytes_returned(self) -> int:
        """Forward return bytes that cross devices: out and lse."""
        return int(self.q_xfer.n[self.q_xfer.remote].sum()) * (self.row_bytes("out") + self.row_bytes("lse"))

    def messages(self, which: str) -> list[tuple[str, tuple[str, ...], Transfers]]:
        """What moves in the forward (``"fwd"``) or backward (``"bwd"``) pass: ``(direction, tensors,
        transfers)`` with direction ``"to_server"`` (trainer rows → server rows) or ``"to_trainer"`` (the
        same rows, reversed). Servers keep nothing between passes, so the backward resends its inputs;
        ``dk``/``dv`` of a key used by several tasks on a server are summed there before they return."""
        if which == "fwd":
            return [("to_server", ("q",), self.q_xfer), ("to_server", ("k", "v"), self.kv_xfer),
                    ("to_trainer", ("out", "lse"), self.q_xfer)]
        if which == "bwd":
            return [("to_server", ("q", "out", "dout", "lse"), self.q_xfer), ("to_server", ("k", "v"), self.kv_xfer),
                    ("to_trainer", ("dq",), self.q_xfer), ("to_trainer", ("dk", "dv"), self.kv_xfer)]
        raise ValueError(f"which must be 'fwd' or 'bwd', got {which!r}")

    def link_bytes(self, which: str) -> int:
        """Bytes that cross devices in one pass, both directions."""
        return sum(int(x.n[x.remote].sum()) * sum(self.row_bytes(t) for t in tensors)
                   for _, tensors, x in self.messages(which))

    def digest(self) -> bytes:
        """A byte string identifying the plan exactly: its sizes, window, capacity and shape, then every
        task and server array and both transfer lists (ranks compare plans by it; plan ids hash it). A plan of
        another family than causal or a window adds its mask, document lengths and every task's key ranges (for
        those two they follow from the task arrays, and the digest is the one such plans always had)."""
        s = self.shape
        header = np.array([self.n_ranks, self.n_servers, self.window, self.capacity, s.n_heads, s.n_kv_heads,
                           s.head_dim, s.dtype_bytes], dtype=np.int64)
        arrays = [getattr(self, f) for f in self.__dataclass_fields__ if f.startswith(("task_", "server_"))]
        out = header.tobytes() + b"".join(a.tobytes() for a in arrays) + self.q_xfer.digest() + self.kv_xfer.digest()
        if self.masked:
            m = self.mask
            params = np.array([m.window, m.chunk, m.sink, m.prefix], dtype=np.int64)
            out += (b"mask:" + m.family.encode() + params.tobytes() + self.doc_len.tobytes() + self.key_ptr.tobytes()
                    + self.key_k0.tobytes() + self.key_k1.tobytes() + self.key_row.tobytes())
        if self.doc_masks is not None:
            out += b"doc_masks:" + b"".join(_mask_bytes(dm) for dm in self.doc_masks)
        if self.tag:
            out += b"tag:" + np.int64(self.tag).tobytes()
        return out


def _mask_bytes(m: Mask) -> bytes:
    """A mask as bytes, exactly (its family, parameters and slices), length-prefixed."""
    sl = np.array([(s.q0, s.q1, s.k0, s.k1, SLICE_TYPES.index(s.type)) for s in m.slices],
                  dtype=np.int64).reshape(-1)
    body = (m.family.encode() + b":" + np.array([m.window, m.chunk, m.sink, m.prefix, len(m.slices)],
                                                  dtype=np.int64).tobytes() + sl.tobytes())
    return np.int64(len(body)).tobytes() + body


def _excl_cumsum(values: np.ndarray) -> np.ndarray:
    return np.cumsum(values) - values


def compile_plan(
    assignment: Assignment, batch: BatchLayout, placement: Placement, window: int | Mask = -1,
    shape: AttentionShape | None = None, keys: BatchLayout | None = None, *, exact_keys: bool = True,
) -> Plan:
    """Lay out receive buffers and row transfers for an assignment (vectorised; deterministic). Key/value rows
    come from the pieces of ``keys`` (default: ``batch``; the whole batch when ``batch`` holds part of its
    queries).

    ``window``: the tasks' attention, a window (-1 full causal) or a :class:`Mask` (any family but ``slices``);
    ``batch.doc_masks`` (:meth:`BatchLayout.with_masks`) override it per document (any family, ``slices`` too).
    ``exact_keys``: ship each task exactly its mask's key ranges, a server holding per document the union of its
    tasks' ranges; ``False`` ships one convex hull per (server, document), as for a causal mask (the bytes
    comparison's control). Causal and window masks always keep one hull per (server, document), as before."""
    shape = shape or AttentionShape()
    mask = window if isinstance(window, Mask) else Mask.sliding(window)
    if mask.family == "slices":
        raise InputError("slices masks are per-document data: give them per document (BatchLayout.with_masks)")
    mask, doc_masks = resolve_masks(batch.doc_masks, mask)
    win = mask.as_window if doc_masks is None else None
    a = assignment
    n_srv = placement.n_servers
    qlen = a.q1 - a.q0
    two = np.zeros(a.doc.size, dtype=bool)
    if doc_masks is not None:  # each task by its document's mask (scalar: any number of key ranges per task)
        lens = batch.doc_len.tolist()
        task_ranges, task_pairs = [], []
        for d, x, y in zip(a.doc.tolist(), a.q0.tolist(), a.q1.tolist(), strict=True):
            m, n = doc_masks[d], lens[d]
            rr = m.key_ranges(n, x, y)
            if not exact_keys and len(rr) > 1:
                rr = [(rr[0][0], rr[-1][1])]
            task_ranges.append(rr)
            task_pairs.append(m.pairs(n, x, y))
        pairs = np.array(task_pairs, dtype=np.int64).reshape(-1)
        k0 = np.array([rr[0][0] if rr else x for rr, x in zip(task_ranges, a.q0.tolist(), strict=True)],
                      dtype=np.int64).reshape(-1)
        k1 = np.array([rr[-1][1] if rr else x for rr, x in zip(task_ranges, a.q0.tolist(), strict=True)],
                      dtype=np.int64).reshape(-1)
    elif win is not None:
        k0 = np.zeros_like(a.q0) if win < 0 else np.maximum(0, a.q0 - win + 1)
        k1 = a.q1
        pairs = cum_pairs(a.q1, win) - cum_pairs(a.q0, win)
        r0, r1, s0, s1 = k0, k1, k0, k1
    else:
        length = batch.doc_len[a.doc]
        pairs = mask_cum(mask, length, a.q1) - mask_cum(mask, length, a.q0)
        r0, r1, s0, s1 = mask_key_ranges(mask, length, a.q0, a.q1)
        k0, k1 = r0, np.maximum(r1, s1)
        if exact_keys:
            two = s0 < s1
    exact = win is None and exact_keys
    union = exact or doc_masks is not None  # runs per (server, doc) by the sorted union (else one reduceat hull)
    # Tasks are sorted by (server, doc, q0) with LOCAL (-1) first: the server tasks are a suffix.
    r = slice(int(np.searchsorted(a.server, 0)), None)
    srv, doc_r, qlen_r, rank_r = a.server[r], a.doc[r], qlen[r], a.rank[r]

    # q rows: each task's queries are one contiguous run on one trainer, appended to its server's buffer.
    server_q_rows = np.bincount(srv, weights=qlen_r, minlength=n_srv).astype(np.int64)
    q_row = a.row.copy()  # LOCAL tasks keep their trainer rows
    q_row[r] = _excl_cumsum(qlen_r) - _excl_cumsum(server_q_rows)[srv]

    # Each task's key ranges (CSR): one, or two (a sink and a window) with exact hulls; any number (none
    # included) with per-document masks.
    if doc_masks is not None:
        n_kr = np.array([len(rr) for rr in task_ranges], dtype=np.int64).reshape(-1)
        key_ptr = np.r_[0, np.cumsum(n_kr)].astype(np.int64)
        key_task = np.repeat(np.arange(a.doc.size), n_kr)
        key_k0 = np.array([lo for rr in task_ranges for lo, _ in rr], dtype=np.int64).reshape(-1)
        key_k1 = np.array([hi for rr in task_ranges for _, hi in rr], dtype=np.int64).reshape(-1)
    else:
        n_kr = 1 + two.astype(np.int64)
        key_ptr = np.r_[0, np.cumsum(n_kr)].astype(np.int64)
        key_task = np.repeat(np.arange(a.doc.size), n_kr)
        second = np.zeros(key_task.size, dtype=bool)
        second[key_ptr[:-1][two] + 1] = True
        key_k0 = np.where(second, s0[key_task], (r0 if exact else k0)[key_task])
        key_k1 = np.where(second, s1[key_task], np.where(two, r1, k1)[key_task])

    # kv buffer runs per (server, doc): the group's hull (causal, window, exact_keys off) or the exact union.
    kr = slice(int(key_ptr[r.start]), None)  # the server tasks' ranges: a suffix as well
    kr_task = key_task[kr] - r.start
    kr_lo, kr_hi = key_k0[kr], key_k1[kr]
    if srv.size:
        grp_start = np.flatnonzero(np.r_[True, (srv[1:] != srv[:-1]) | (doc_r[1:] != doc_r[:-1])])
    else:
        grp_start = np.zeros(0, dtype=np.int64)
    task_grp = np.repeat(np.arange(grp_start.size), np.diff(np.r_[grp_start, srv.size]))
    kr_grp = task_grp[kr_task]
    if not union:
        kr_start = key_ptr[r.start:-1][grp_start] - key_ptr[r.start] if grp_start.size else grp_start
        g_lo = np.minimum.reduceat(kr_lo, kr_start) if kr_start.size else kr_start
        g_hi = np.maximum.reduceat(kr_hi, kr_start) if kr_start.size else kr_start
        run_grp = np.arange(grp_start.size)
        kr_run = kr_grp
    else:
        big = int(batch.doc_len.max(initial=0)) + 1
        order = np.lexsort((kr_lo, kr_grp))
        lo_s, hi_s, grp_s = kr_lo[order], kr_hi[order], kr_grp[order]
        reach = np.maximum.accumulate(grp_s * big + hi_s) - grp_s * big  # furthest key of the group so far
        # A new run where the group changes, or (exact hulls) where a gap opens; hulls: one run per group.
        gap = (lo_s[1:] > reach[:-1]) if exact else np.zeros(max(order.size - 1, 0), dtype=bool)
        new = np.r_[True, (grp_s[1:] != grp_s[:-1]) | gap] if order.size else order.astype(bool)
        starts = np.flatnonzero(new)
        g_lo = lo_s[starts]
        g_hi = np.maximum.reduceat(hi_s, starts) if starts.size else g_lo
        run_grp = grp_s[starts]
        kr_run = np.empty_like(order)
        kr_run[order] = np.cumsum(new) - 1
    g_server, g_doc = srv[grp_start][run_grp], doc_r[grp_start][run_grp]
    server_kv_rows = np.bincount(g_server, weights=g_hi - g_lo, minlength=n_srv).astype(np.int64)
    g_off = _excl_cumsum(g_hi - g_lo) - _excl_cumsum(server_kv_rows)[g_server]
    key_row = np.full(key_task.size, -1, dtype=np.int64)
    key_row[kr] = g_off[kr_run] + (kr_lo - g_lo[kr_run])
    kv_row = np.full(a.doc.size, -1, dtype=np.int64)
    if key_row.size:  # a task whose queries see no key (a slices mask) has no first range: -1
        has = (key_ptr[1:] > key_ptr[:-1])[r]
        kv_row[r] = np.where(has, key_row[np.minimum(key_ptr[:-1][r], key_row.size - 1)], -1)

    # kv sources: the pieces of each run's document that overlap [lo, hi).
    batch_k = batch if keys is None else keys
    big = int(batch_k.doc_len.max(initial=0)) + 1
    p_start = batch_k.piece_doc * big + batch_k.piece_off
    p_end = p_start + batch_k.piece_len
    # Most documents are one piece (pieces are sorted by document): only split ones need a search.
    doc_pieces = np.bincount(batch_k.piece_doc, minlength=batch_k.n_docs)
    first = (np.cumsum(doc_pieces) - doc_pieces)[g_doc]
    cnt = np.ones_like(first)
    split = np.flatnonzero(doc_pieces[g_doc] > 1)
    if split.size:
        first[split] = np.searchsorted(p_end, g_doc[split] * big + g_lo[split], side="right")
        cnt[split] = np.searchsorted(p_start, g_doc[split] * big + g_hi[split], side="left") - first[split]
        gi = np.repeat(np.arange(g_doc.size), cnt)
        pi = np.arange(int(cnt.sum())) - np.repeat(np.cumsum(cnt) - cnt, cnt) + np.repeat(first, cnt)
    else:
        gi, pi = np.arange(g_doc.size), first
    p_off = batch_k.piece_off[pi]
    lo = np.maximum(g_lo[gi], p_off)
    hi = np.minimum(g_hi[gi], p_off + batch_k.piece_len[pi])
    kv_rank, kv_server = batch_k.piece_rank[pi], g_server[gi]
    kv = Transfers(kv_rank, kv_server, batch_k.piece_row[pi] + (lo - p_off), g_off[gi] + (lo - g_lo[gi]), hi - lo,
                   np.asarray(placement.is_remote(kv_rank, kv_server)))
    q = Transfers(rank_r, srv, a.row[r], q_row[r], qlen_r, np.asarray(placement.is_remote(rank_r, srv)))
    server_pairs = np.bincount(srv, weights=pairs[r], minlength=n_srv)
    return Plan(placement.n_trainers, n_srv, -1 if win is None else win, a.capacity, shape, a.doc, a.q0, a.q1,
                k0, k1, a.rank, a.row, a.server, q_row, kv_row, pairs, server_q_rows, server_kv_rows, q, kv,
                server_pairs, mask, batch.doc_len, key_ptr, key_k0, key_k1, key_row, doc_masks)
