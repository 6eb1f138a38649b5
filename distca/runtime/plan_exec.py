"""Execute a :class:`~distca.scheduler.Plan` in one process: every server's fused call, forward and
backward, with the plan's exact row transfers. No networking — this is the data movement the
networked runtime performs, written down once, and the oracle its tests compare against.

Per server: copy q rows and deduplicated k/v rows into receive buffers (``q_xfer``, ``kv_xfer``),
gather each task's contiguous key range out of the k/v buffer, run one varlen call over all tasks,
then send out/lse (forward) or dq and the key gradients (summed on the server per key row, then
added at the trainer) back along the same rows. The tasks a plan keeps on their trainer run there
(``run_local_forward``/``run_local_backward``, which the networked client runs too).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from distca.attention import backward as attn_backward
from distca.attention import forward as attn_forward
from distca.attention import lse_dtype
from distca.attention.masked import RectCall
from distca.attention.masked import backward as masked_backward
from distca.attention.masked import forward as masked_forward
from distca.attention.tasks import row_ranges
from distca.scheduler import Plan
from distca.scheduler.calls import RowRects, local_call, local_rects, server_call, server_rects
from distca.scheduler.plan import Transfers


@dataclass
class RankTensors:
    """One trainer's local core-attention tensors: rows in the layout of its pieces."""

    q: torch.Tensor  # [tokens, Hq, D]
    k: torch.Tensor  # [tokens, Hkv, D]
    v: torch.Tensor


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
        if plan.masked:
            rects = _rect_call(server_rects(plan, s), int(plan.server_q_rows[s]), int(plan.server_kv_rows[s]))
            if rects is None:
                continue
        else:
            call = server_call(plan, s)
            if call.n_tasks == 0:
                continue
            cu_q, cu_k, key_rows = (torch.from_numpy(a).to(dev) for a in (call.cu_q, call.cu_k, call.key_rows))
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
        if plan.masked:
            out, lse = masked_forward(qb, kb, vb, rects, backend)
        else:
            kt, vt = kb[key_rows], vb[key_rows]  # each task's keys contiguous, as varlen needs
            args = (cu_q, cu_k, call.max_q, call.max_k)
            out, lse = attn_forward(qb, kt, vt, *args, window=plan.window, backend=backend)
        if douts is not None:
            dob = torch.zeros_like(qb)
            for r, ss, src, dst in q_moves:
                if ss == s:
                    dob[dst] = douts[r][src]
            if plan.masked:  # the executor sums a key row's gradients over its rectangles
                dq, dkb, dvb = masked_backward(dob, qb, kb, vb, out, lse, rects, backend)
            else:
                dq, dkt, dvt = attn_backward(qb, kt, vt, out, lse, dob, *args, window=plan.window, backend=backend)
                # A key row used by several tasks here: sum its gradients on the server before returning.
                dkb = torch.zeros_like(kb).index_add_(0, key_rows, dkt)
                dvb = torch.zeros_like(vb).index_add_(0, key_rows, dvt)
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
    for r, t in enumerate(ranks):
        run_local_forward(plan, r, t, res["out"][r], res["lse"][r], backend)
        if douts is not None:
            run_local_backward(plan, r, t, res["out"][r], res["lse"][r], douts[r], res["dq"][r], res["dk"][r],
                               res["dv"][r], backend)
    return res


def _index(rows: np.ndarray, device: torch.device) -> torch.Tensor | slice:
    """Rows to index a trainer tensor with: a slice (a view, no copy) when they are one ascending run."""
    if rows.size and rows[-1] - rows[0] + 1 == rows.size and (rows.size == 1 or bool((np.diff(rows) == 1).all())):
        return slice(int(rows[0]), int(rows[-1]) + 1)
    t = torch.from_numpy(rows)
    return t if device.type == "cpu" else t.to(device, non_blocking=True)


def _rect_call(r: RowRects, n_q: int, n_k: int) -> RectCall | None:
    """Row rectangles as a planned call over buffers of ``n_q`` and ``n_k`` rows (None when there are none)."""
    if r.n == 0:
        return None
    return RectCall.build(r.q0, r.q1, r.k0, r.k1, r.kind, r.window, n_q=n_q, n_k=n_k)


def _local_rects(plan: Plan, rank: int, rows: int) -> tuple[RectCall, torch.Tensor] | None:
    """A masked plan's local tasks on ``rank`` over its own rows, and the query rows they cover."""
    r = local_rects(plan, rank)
    call = _rect_call(r, rows, rows)
    if call is None:
        return None
    return call, torch.from_numpy(np.unique(row_ranges(r.q0, r.q1 - r.q0)))


def _local(plan: Plan, rank: int, device: torch.device):
    call = local_call(plan, rank)
    if call.n_tasks == 0:
        return None
    qi, ki = _index(call.q_rows, device), _index(call.k_rows, device)
    cu_q, cu_k = (torch.from_numpy(a).to(device) for a in (call.cu_q, call.cu_k))
    return qi, ki, (cu_q, cu_k, call.max_q, call.max_k)


def run_local_forward(plan: Plan, rank: int, t: RankTensors, out: torch.Tensor, lse: torch.Tensor,
                      backend: str = "auto") -> None:
    """Compute the tasks ``plan`` keeps on trainer ``rank`` over its rows ``t`` — all of them in one varlen call —
    writing their ``out``/``lse`` rows."""
    if plan.masked:
        local = _local_rects(plan, rank, t.q.shape[0])
        if local is not None:
            call, rows = local
            rows = rows.to(t.q.device)
            o, l_ = masked_forward(t.q, t.k, t.v, call, backend)
            out[rows], lse[rows] = o[rows], l_[rows]
        return
    local = _local(plan, rank, t.q.device)
    if local is None:
        return
    qi, ki, meta = local
    o, l_ = attn_forward(t.q[qi], t.k[ki], t.v[ki], *meta, window=plan.window, backend=backend)
    out[qi] = o
    lse[qi] = l_


def run_local_backward(plan: Plan, rank: int, t: RankTensors, out: torch.Tensor, lse: torch.Tensor,
                       dout: torch.Tensor, dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor,
                       backend: str = "auto") -> None:
    """Gradients of trainer ``rank``'s local tasks from their forward ``out``/``lse`` (one varlen call): writes
    their ``dq`` rows and adds into ``dk``/``dv`` (a key row may serve several tasks, local and remote)."""
    if plan.masked:
        local = _local_rects(plan, rank, t.q.shape[0])
        if local is not None:
            call, rows = local
            rows = rows.to(t.q.device)
            # Rows outside the local rectangles hold other tasks' results: the executor reads only its own.
            g = masked_backward(dout, t.q, t.k, t.v, out, lse, call, backend)
            dq[rows] = g[0][rows]
            dk += g[1]
            dv += g[2]
        return
    local = _local(plan, rank, t.q.device)
    if local is None:
        return
    qi, ki, meta = local
    g = attn_backward(t.q[qi], t.k[ki], t.v[ki], out[qi], lse[qi], dout[qi], *meta, window=plan.window,
                      backend=backend)
    dq[qi] = g[0]
    if isinstance(ki, slice):
        dk[ki] += g[1]
        dv[ki] += g[2]
    else:
        dk.index_add_(0, ki, g[1])
        dv.index_add_(0, ki, g[2])
