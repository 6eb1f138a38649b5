"""Execute a :class:`~distca.scheduler.Plan` in one process: every server's fused call, forward and
backward, with the plan's exact row transfers. No networking — this is the data movement the
networked runtime performs, written down once, and the oracle its tests compare against.

Per server: copy q rows and deduplicated k/v rows into receive buffers (``q_xfer``, ``kv_xfer``),
gather each task's contiguous key range out of the k/v buffer, run one varlen call over all tasks,
then send out/lse (forward) or dq and the key gradients (summed on the server per key row, then
added at the trainer) back along the same rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from distca.attention import backward as attn_backward
from distca.attention import forward as attn_forward
from distca.attention import lse_dtype
from distca.attention.tasks import row_ranges
from distca.scheduler import Plan
from distca.scheduler.plan import Transfers


@dataclass
class RankTensors:
    """One trainer's local core-attention tensors: rows in the layout of its pieces."""

    q: torch.Tensor  # [tokens, Hq, D]
    k: torch.Tensor  # [tokens, Hkv, D]
    v: torch.Tensor


@dataclass
class ServerCall:
    """Everything one server's fused varlen call needs, derived from the plan."""

    server: int
    cu_q: torch.Tensor
    cu_k: torch.Tensor
    max_q: int
    max_k: int
    key_rows: torch.Tensor  # rows of the server's k/v buffer, task by task (keys of a task contiguous)


def server_call(plan: Plan, server: int) -> ServerCall:
    """The varlen metadata of ``server``'s tasks (in plan order, queries contiguous in its q buffer)."""
    m = np.flatnonzero(plan.task_server == server)
    q_len = plan.task_q1[m] - plan.task_q0[m]
    k_len = plan.task_k1[m] - plan.task_k0[m]
    cu_q = np.zeros(m.size + 1, dtype=np.int32)
    cu_k = np.zeros(m.size + 1, dtype=np.int32)
    np.cumsum(q_len, out=cu_q[1:])
    np.cumsum(k_len, out=cu_k[1:])
    if m.size and not np.array_equal(plan.task_q_row[m], cu_q[:-1]):
        raise ValueError(f"server {server}: task query rows are not laid out contiguously in plan order")
    return ServerCall(server, torch.from_numpy(cu_q), torch.from_numpy(cu_k), int(q_len.max(initial=0)),
                      int(k_len.max(initial=0)), torch.from_numpy(row_ranges(plan.task_kv_row[m], k_len)))


def _rows(x: Transfers, device: torch.device | None = None) -> list[tuple[int, int, torch.Tensor, torch.Tensor]]:
    """Per (rank, server) pair: source rows on the trainer and destination rows on the server (index
    tensors on ``device``, where the tensors they index live; host when None)."""
    out = []
    for r, s in sorted(set(zip(x.rank.tolist(), x.server.tolist(), strict=True))):
        m = (x.rank == r) & (x.server == s)
        src = torch.from_numpy(row_ranges(x.src_row[m], x.n[m]))
        dst = torch.from_numpy(row_ranges(x.dst_row[m], x.n[m]))
        if device is not None and device.type != "cpu":
            src, dst = src.to(device), dst.to(device)
        out.append((r, s, src, dst))
    return out


def execute_plan(
    plan: Plan, ranks: list[RankTensors], douts: list[torch.Tensor] | None = None, backend: str = "auto",
) -> dict[str, list[torch.Tensor]]:
    """Run the plan's forward (and, given ``douts``, backward) over all servers.

    Returns per-rank ``out`` and ``lse`` (and ``dq``, ``dk``, ``dv``), in each rank's local row layout.
    Tasks the plan keeps on their trainer (``LOCAL``) run there with the trainer's own rows. Everything
    runs on the device of the tensors (all ranks' tensors on one device).
    """
    if len(ranks) != plan.n_ranks:
        raise ValueError(f"plan is for {plan.n_ranks} ranks, got tensors for {len(ranks)}")
    ref = ranks[0].q
    hq, d, hkv = ref.shape[1], ref.shape[2], ranks[0].k.shape[1]
    dev = ref.device
    q_moves, kv_moves = _rows(plan.q_xfer, dev), _rows(plan.kv_xfer, dev)
    res = {"out": [torch.zeros_like(t.q) for t in ranks],
           "lse": [torch.full(t.q.shape[:2], float("-inf"), dtype=lse_dtype(ref.dtype), device=dev) for t in ranks]}
    if douts is not None:
        res.update(dq=[torch.zeros_like(t.q) for t in ranks], dk=[torch.zeros_like(t.k) for t in ranks],
                   dv=[torch.zeros_like(t.v) for t in ranks])
    for s in range(plan.n_servers):
        call = server_call(plan, s)
        if call.cu_q.numel() == 1:
            continue
        if dev.type != "cpu":
            call = ServerCall(s, call.cu_q.to(dev), call.cu_k.to(dev), call.max_q, call.max_k, call.key_rows.to(dev))
        # Receive: q rows in task order; k/v once per (server, document) hull.
        qb = ref.new_zeros((int(plan.server_q_rows[s]), hq, d))
        kb = ref.new_zeros((int(plan.server_kv_rows[s]), hkv, d))
        vb = torch.zeros_like(kb)
        for r, ss, src, dst in q_moves:
            if ss == s:
                qb[dst] = ranks[r].q[src]
        for r, ss, src, dst in kv_moves:
            if ss == s:
                kb[dst] = ranks[r].k[src]
                vb[dst] = ranks[r].v[src]
        kt, vt = kb[call.key_rows], vb[call.key_rows]  # each task's keys contiguous, as varlen needs
        args = (call.cu_q, call.cu_k, call.max_q, call.max_k)
        out, lse = attn_forward(qb, kt, vt, *args, window=plan.window, backend=backend)
        if douts is not None:
            dob = torch.zeros_like(qb)
            for r, ss, src, dst in q_moves:
                if ss == s:
                    dob[dst] = douts[r][src]
            dq, dkt, dvt = attn_backward(qb, kt, vt, out, lse, dob, *args, window=plan.window, backend=backend)
            # A key row used by several tasks here: sum its gradients on the server before returning.
            dkb = torch.zeros_like(kb).index_add_(0, call.key_rows, dkt)
            dvb = torch.zeros_like(vb).index_add_(0, call.key_rows, dvt)
        for r, ss, src, dst in q_moves:  # return along the same rows
            if ss == s:
                res["out"][r][src] = out[dst]
                res["lse"][r][src] = lse[dst]
                if douts is not None:
                    res["dq"][r][src] = dq[dst]
        if douts is not None:
            for r, ss, src, dst in kv_moves:  # a key sent to several servers sums their gradients
                if ss == s:
                    res["dk"][r].index_add_(0, src, dkb[dst])
                    res["dv"][r].index_add_(0, src, dvb[dst])
    _run_local_tasks(plan, ranks, douts, res, backend)
    return res


def _run_local_tasks(plan: Plan, ranks, douts, res, backend, only_rank: int | None = None) -> None:
    """Tasks kept on their trainer: their queries and keys are that trainer's own rows."""
    from distca.scheduler import LOCAL

    mine = plan.task_server == LOCAL
    if only_rank is not None:
        mine &= plan.task_rank == only_rank
    for i in np.flatnonzero(mine).tolist():
        r, row = int(plan.task_rank[i]), int(plan.task_row[i])
        n, kn = int(plan.task_q1[i] - plan.task_q0[i]), int(plan.task_k1[i] - plan.task_k0[i])
        k_row = row - int(plan.task_q0[i] - plan.task_k0[i])
        t = ranks[r]
        cu_q = torch.tensor([0, n], dtype=torch.int32, device=t.q.device)
        cu_k = torch.tensor([0, kn], dtype=torch.int32, device=t.q.device)
        q, k, v = t.q[row:row + n], t.k[k_row:k_row + kn], t.v[k_row:k_row + kn]
        out, lse = attn_forward(q, k, v, cu_q, cu_k, n, kn, window=plan.window, backend=backend)
        res["out"][r][row:row + n] = out
        res["lse"][r][row:row + n] = lse
        if douts is not None:
            dq, dk, dv = attn_backward(q, k, v, out, lse, douts[r][row:row + n], cu_q, cu_k, n, kn,
                                       window=plan.window, backend=backend)
            res["dq"][r][row:row + n] = dq
            res["dk"][r][k_row:k_row + kn] += dk
            res["dv"][r][k_row:k_row + kn] += dv
