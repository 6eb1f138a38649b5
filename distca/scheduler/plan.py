"""Compile an assignment into a Plan: tasks plus the exact rows every trainer and server moves.

Forward: trainer → server sends q rows (``q_xfer``) and k/v rows (``kv_xfer``); the server
returns out and lse on the q rows, reversed. Backward (servers keep nothing): the trainer resends
q, out, dout, lse on the same q rows and k, v on the same kv rows; the server returns dq on the q
rows and dk, dv on the kv rows, reversed. Each server holds one copy of every key/value token it
needs per document (the hull of its tasks' key ranges), so a key/value slice used by several tasks
there is sent once, and its gradients are summed on the server before they return.

Rows are token indices; byte offsets are ``row × row_bytes(tensor)`` with the attention shape's
per-token sizes (``Plan.row_bytes``). A trainer's local rows are its pieces laid out in order.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from distca.attention.cost import AttentionShape, cum_pairs
from distca.scheduler.batch import BatchLayout
from distca.scheduler.placement import Placement
from distca.scheduler.planner import Assignment


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
    window: int
    capacity: int  # planned bound on per-server work (pairs)
    shape: AttentionShape
    # tasks, sorted by (server, doc, q0); server == LOCAL (-1) runs on the trainer itself
    task_doc: np.ndarray
    task_q0: np.ndarray
    task_q1: np.ndarray
    task_k0: np.ndarray
    task_k1: np.ndarray
    task_rank: np.ndarray  # trainer holding the task's queries
    task_row: np.ndarray  # first query row in that trainer's local buffer
    task_server: np.ndarray
    task_q_row: np.ndarray  # first query row in the server's q buffer (trainer row for LOCAL)
    task_kv_row: np.ndarray  # first key row in the server's kv buffer (-1 for LOCAL)
    task_pairs: np.ndarray
    server_q_rows: np.ndarray  # receive-buffer sizes, rows per server
    server_kv_rows: np.ndarray
    q_xfer: Transfers
    kv_xfer: Transfers
    server_pairs: np.ndarray = field(repr=False)

    @property
    def n_tasks(self) -> int:
        return int(self.task_doc.size)

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
        task and server array and both transfer lists (ranks compare plans by it; plan ids hash it)."""
        s = self.shape
        header = np.array([self.n_ranks, self.n_servers, self.window, self.capacity, s.n_heads, s.n_kv_heads,
                           s.head_dim, s.dtype_bytes], dtype=np.int64)
        arrays = [getattr(self, f) for f in self.__dataclass_fields__ if f.startswith(("task_", "server_"))]
        return header.tobytes() + b"".join(a.tobytes() for a in arrays) + self.q_xfer.digest() + self.kv_xfer.digest()


def _excl_cumsum(values: np.ndarray) -> np.ndarray:
    return np.cumsum(values) - values


def compile_plan(
    assignment: Assignment, batch: BatchLayout, placement: Placement, window: int = -1,
    shape: AttentionShape | None = None, keys: BatchLayout | None = None,
) -> Plan:
    """Lay out receive buffers and row transfers for an assignment (vectorised; deterministic). Key/value rows
    come from the pieces of ``keys`` (default: ``batch``; the whole batch when ``batch`` holds part of its
    queries)."""
    shape = shape or AttentionShape()
    a = assignment
    n_srv = placement.n_servers
    k0 = np.zeros_like(a.q0) if window < 0 else np.maximum(0, a.q0 - window + 1)
    k1 = a.q1
    qlen = a.q1 - a.q0
    pairs = cum_pairs(a.q1, window) - cum_pairs(a.q0, window)
    # Tasks are sorted by (server, doc, q0) with LOCAL (-1) first: the server tasks are a suffix.
    r = slice(int(np.searchsorted(a.server, 0)), None)
    srv, doc_r, k0_r, k1_r, qlen_r, rank_r = a.server[r], a.doc[r], k0[r], k1[r], qlen[r], a.rank[r]

    # q rows: each task's queries are one contiguous run on one trainer, appended to its server's buffer.
    server_q_rows = np.bincount(srv, weights=qlen_r, minlength=n_srv).astype(np.int64)
    q_row = a.row.copy()  # LOCAL tasks keep their trainer rows
    q_row[r] = _excl_cumsum(qlen_r) - _excl_cumsum(server_q_rows)[srv]

    # kv: one hull [lo, hi) per (server, doc); the server's tasks index into it.
    if srv.size:
        grp_start = np.flatnonzero(np.r_[True, (srv[1:] != srv[:-1]) | (doc_r[1:] != doc_r[:-1])])
        g_lo = np.minimum.reduceat(k0_r, grp_start)
        g_hi = np.maximum.reduceat(k1_r, grp_start)
    else:
        grp_start = g_lo = g_hi = np.zeros(0, dtype=np.int64)
    g_server, g_doc = srv[grp_start], doc_r[grp_start]
    server_kv_rows = np.bincount(g_server, weights=g_hi - g_lo, minlength=n_srv).astype(np.int64)
    g_off = _excl_cumsum(g_hi - g_lo) - _excl_cumsum(server_kv_rows)[g_server]
    task_grp = np.repeat(np.arange(grp_start.size), np.diff(np.r_[grp_start, srv.size]))
    kv_row = np.full(a.doc.size, -1, dtype=np.int64)
    kv_row[r] = g_off[task_grp] + (k0_r - g_lo[task_grp])

    # kv sources: the pieces of each group's document that overlap [lo, hi).
    batch = batch if keys is None else keys
    big = int(batch.doc_len.max(initial=0)) + 1
    p_start = batch.piece_doc * big + batch.piece_off
    p_end = p_start + batch.piece_len
    # Most documents are one piece (pieces are sorted by document): only split ones need a search.
    doc_pieces = np.bincount(batch.piece_doc, minlength=batch.n_docs)
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
    p_off = batch.piece_off[pi]
    lo = np.maximum(g_lo[gi], p_off)
    hi = np.minimum(g_hi[gi], p_off + batch.piece_len[pi])
    kv_rank, kv_server = batch.piece_rank[pi], g_server[gi]
    kv = Transfers(kv_rank, kv_server, batch.piece_row[pi] + (lo - p_off), g_off[gi] + (lo - g_lo[gi]), hi - lo,
                   np.asarray(placement.is_remote(kv_rank, kv_server)))
    q = Transfers(rank_r, srv, a.row[r], q_row[r], qlen_r, np.asarray(placement.is_remote(rank_r, srv)))
    server_pairs = np.bincount(srv, weights=pairs[r], minlength=n_srv)
    return Plan(placement.n_trainers, n_srv, window, a.capacity, shape, a.doc, a.q0, a.q1, k0, k1, a.rank, a.row,
                a.server, q_row, kv_row, pairs, server_q_rows, server_kv_rows, q, kv, server_pairs)
