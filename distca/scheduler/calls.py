"""The kernel calls a plan asks for: each server's one fused varlen call, and the tasks a trainer keeps.

Derived from the plan alone (every rank computes the same plan), so the in-process plan execution, the
trainer's client and the layout a server registers all read the same description from here. Numpy only:
the runtime and the server turn it into tensors on the device where they need them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from distca.attention.tasks import row_ranges
from distca.scheduler.plan import Plan, Transfers
from distca.scheduler.planner import LOCAL


@dataclass(frozen=True)
class ServerCall:
    """One server's share of a plan: its fused call's metadata and which rows each trainer sends it.

    The server's tasks run in plan order, their queries contiguous in its q buffer; each task's keys are
    gathered (``key_rows``) out of the k/v buffer, which holds every key token once per document.
    """

    server: int
    cu_q: np.ndarray  # int32 [tasks + 1]
    cu_k: np.ndarray  # int32 [tasks + 1]
    max_q: int
    max_k: int
    key_rows: np.ndarray  # int64: rows of the k/v buffer, task by task (the keys of a task contiguous)
    q_rows: int  # receive-buffer sizes
    kv_rows: int
    senders: dict[int, tuple[int, int, int, int]]  # rank -> (q_dst, n_q, kv_dst, n_kv): one block each

    @property
    def n_tasks(self) -> int:
        return self.cu_q.size - 1


@dataclass(frozen=True)
class LocalTask:
    """A task the plan keeps on its trainer: queries ``[q_row, q_row + n_q)`` and keys ``[k_row, k_row +
    n_k)``, both rows of that trainer's own tensors (a local task's document piece is all on the trainer)."""

    q_row: int
    n_q: int
    k_row: int
    n_k: int


def _block(x: Transfers, server: int, rank: int, what: str) -> tuple[int, int]:
    """The contiguous destination block of ``rank``'s transfers to ``server``: (first row, rows)."""
    m = (x.rank == rank) & (x.server == server)
    if not m.any():
        return 0, 0
    dst, n = x.dst_row[m], x.n[m]
    if not np.array_equal(dst[1:], (dst + n)[:-1]):
        raise ValueError(f"{what} rows of rank {rank} on server {server} are not one contiguous block")
    return int(dst[0]), int(n.sum())


def _refuse_masked(plan: Plan, what: str) -> None:
    if plan.masked:
        spec = "per-document mask" if plan.doc_masks is not None else repr(plan.mask.spec())
        raise NotImplementedError(f"{what}: a {spec} plan runs as rectangles over its key ranges, not "
                                  "one causal/window varlen call per task; use server_rects / local_rects")


def server_call(plan: Plan, server: int) -> ServerCall:
    """Server ``server``'s fused call over its tasks of ``plan`` and the rows each sender fills."""
    _refuse_masked(plan, "server_call")
    m = np.flatnonzero(plan.task_server == server)
    q_len = plan.task_q1[m] - plan.task_q0[m]
    k_len = plan.task_k1[m] - plan.task_k0[m]
    cu_q = np.zeros(m.size + 1, dtype=np.int32)
    cu_k = np.zeros(m.size + 1, dtype=np.int32)
    np.cumsum(q_len, out=cu_q[1:])
    np.cumsum(k_len, out=cu_k[1:])
    if m.size and not np.array_equal(plan.task_q_row[m], cu_q[:-1]):
        raise ValueError(f"server {server}: task query rows are not laid out contiguously in plan order")
    return ServerCall(server, cu_q, cu_k, int(q_len.max(initial=0)), int(k_len.max(initial=0)),
                      row_ranges(plan.task_kv_row[m], k_len), int(plan.server_q_rows[server]),
                      int(plan.server_kv_rows[server]), server_senders(plan, server))


def server_senders(plan: Plan, server: int) -> dict[int, tuple[int, int, int, int]]:
    """Which rows each trainer fills on ``server``: rank -> (q_dst, n_q, kv_dst, n_kv), one block each (any
    family: the plan compiler lays receive buffers out in document order, which is rank order)."""
    ranks = sorted(set(plan.q_xfer.rank[plan.q_xfer.server == server].tolist())
                   | set(plan.kv_xfer.rank[plan.kv_xfer.server == server].tolist()))
    return {r: (*_block(plan.q_xfer, server, r, "q"), *_block(plan.kv_xfer, server, r, "kv")) for r in ranks}


def local_tasks(plan: Plan, rank: int) -> list[LocalTask]:
    """The tasks ``plan`` keeps on trainer ``rank`` (``LOCAL``), in plan order."""
    _refuse_masked(plan, "local_tasks")
    out = []
    for i in np.flatnonzero((plan.task_server == LOCAL) & (plan.task_rank == rank)).tolist():
        row = int(plan.task_row[i])
        k_row = row - int(plan.task_q0[i] - plan.task_k0[i])  # keys before the first query: the rows before it
        n_q, n_k = int(plan.task_q1[i] - plan.task_q0[i]), int(plan.task_k1[i] - plan.task_k0[i])
        out.append(LocalTask(row, n_q, k_row, n_k))
    return out


@dataclass(frozen=True)
class LocalCall:
    """All the tasks a plan keeps on one trainer as one varlen call over that trainer's own rows: the query
    rows and key rows of each task, task by task (one gather each, then one kernel launch)."""

    q_rows: np.ndarray  # int64
    k_rows: np.ndarray  # int64
    cu_q: np.ndarray  # int32 [tasks + 1]
    cu_k: np.ndarray  # int32 [tasks + 1]
    max_q: int
    max_k: int

    @property
    def n_tasks(self) -> int:
        return self.cu_q.size - 1


def local_call(plan: Plan, rank: int) -> LocalCall:
    """The tasks ``plan`` keeps on trainer ``rank`` as one fused call (none: a call of zero tasks)."""
    tasks = local_tasks(plan, rank)
    n_q = np.array([t.n_q for t in tasks], dtype=np.int64)
    n_k = np.array([t.n_k for t in tasks], dtype=np.int64)
    cu_q = np.zeros(len(tasks) + 1, dtype=np.int32)
    cu_k = np.zeros(len(tasks) + 1, dtype=np.int32)
    np.cumsum(n_q, out=cu_q[1:])
    np.cumsum(n_k, out=cu_k[1:])
    q_rows = row_ranges(np.array([t.q_row for t in tasks], dtype=np.int64), n_q)
    k_rows = row_ranges(np.array([t.k_row for t in tasks], dtype=np.int64), n_k)
    return LocalCall(q_rows, k_rows, cu_q, cu_k, int(n_q.max(initial=0)), int(n_k.max(initial=0)))


RECT_KINDS: tuple[str, ...] = ("full", "causal", "inv_causal")


@dataclass(frozen=True)
class RowRects:
    """Kernel rectangles in row coordinates, one per row of the arrays: queries ``[q0, q1)`` of a q buffer
    against keys ``[k0, k1)`` of a k/v buffer, ``kind`` one of :data:`RECT_KINDS` (``causal`` bottom-right
    aligned, banded to ``window`` keys when ``window > 0``; ``inv_causal`` top-left aligned; ``full``), and
    the plan ``task`` each belongs to. Rectangles sharing query rows are merged by their log-sum-exp; no two
    share a (query, key) pair."""

    task: np.ndarray  # int64
    q0: np.ndarray
    q1: np.ndarray
    k0: np.ndarray
    k1: np.ndarray
    kind: np.ndarray  # str
    window: np.ndarray  # int64, -1: no band

    @property
    def n(self) -> int:
        return int(self.task.size)


def _row_rects(plan: Plan, tasks: np.ndarray, q_base: np.ndarray, key_rows) -> RowRects:
    rows: list[tuple[int, int, int, int, int, str, int]] = []
    for i, qb in zip(tasks.tolist(), q_base.tolist(), strict=True):
        doc, q0, q1 = int(plan.task_doc[i]), int(plan.task_q0[i]), int(plan.task_q1[i])
        length = int(plan.doc_len[doc]) if plan.doc_len.size else q1
        ranges = key_rows(i)
        for rc in plan.doc_mask(doc).rects(length, q0, q1):
            hit = next((kr for kr in ranges if kr[0] <= rc.k0 and rc.k1 <= kr[1]), None)  # the range holding them
            if hit is None:
                raise ValueError(f"task {i}: rectangle keys [{rc.k0}, {rc.k1}) lie outside its key ranges {ranges}")
            k0, _, row = hit
            rows.append((i, qb + rc.q0 - q0, qb + rc.q1 - q0, row + rc.k0 - k0, row + rc.k1 - k0, rc.kind,
                         rc.window))
    cols = list(zip(*rows, strict=True)) if rows else [()] * 7
    as64 = lambda x: np.asarray(x, dtype=np.int64)  # noqa: E731
    return RowRects(*(as64(c) for c in cols[:5]), np.asarray(cols[5], dtype="<U10"), as64(cols[6]))


def server_rects(plan: Plan, server: int) -> RowRects:
    """Server ``server``'s tasks of ``plan`` as rectangles over its receive buffers: query rows of its q buffer,
    key rows of its k/v buffer (each task's keys are its exact ranges, laid out by ``compile_plan``). Any family;
    for causal and window plans one rectangle per task."""
    m = np.flatnonzero(plan.task_server == server)
    return _row_rects(plan, m, plan.task_q_row[m],
                      lambda i: [(k0, k1, row) for k0, k1, row in plan.task_key_ranges(i)])


def local_rects(plan: Plan, rank: int) -> RowRects:
    """The tasks ``plan`` keeps on trainer ``rank`` as rectangles over that trainer's own rows (a local task's
    keys all lie in its piece, laid out in document order around its queries)."""
    m = np.flatnonzero((plan.task_server == LOCAL) & (plan.task_rank == rank))

    def keys(i: int) -> list[tuple[int, int, int]]:
        base = int(plan.task_row[i] - plan.task_q0[i])  # row of document position 0 (if it were on this rank)
        return [(k0, k1, base + k0) for k0, k1, _ in plan.task_key_ranges(i)]

    return _row_rects(plan, m, plan.task_row[m], keys)
