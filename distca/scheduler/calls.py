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


def server_call(plan: Plan, server: int) -> ServerCall:
    """Server ``server``'s fused call over its tasks of ``plan`` and the rows each sender fills."""
    m = np.flatnonzero(plan.task_server == server)
    q_len = plan.task_q1[m] - plan.task_q0[m]
    k_len = plan.task_k1[m] - plan.task_k0[m]
    cu_q = np.zeros(m.size + 1, dtype=np.int32)
    cu_k = np.zeros(m.size + 1, dtype=np.int32)
    np.cumsum(q_len, out=cu_q[1:])
    np.cumsum(k_len, out=cu_k[1:])
    if m.size and not np.array_equal(plan.task_q_row[m], cu_q[:-1]):
        raise ValueError(f"server {server}: task query rows are not laid out contiguously in plan order")
    ranks = sorted(set(plan.q_xfer.rank[plan.q_xfer.server == server].tolist())
                   | set(plan.kv_xfer.rank[plan.kv_xfer.server == server].tolist()))
    senders = {r: (*_block(plan.q_xfer, server, r, "q"), *_block(plan.kv_xfer, server, r, "kv")) for r in ranks}
    return ServerCall(server, cu_q, cu_k, int(q_len.max(initial=0)), int(k_len.max(initial=0)),
                      row_ranges(plan.task_kv_row[m], k_len), int(plan.server_q_rows[server]),
                      int(plan.server_kv_rows[server]), senders)


def local_tasks(plan: Plan, rank: int) -> list[LocalTask]:
    """The tasks ``plan`` keeps on trainer ``rank`` (``LOCAL``), in plan order."""
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
