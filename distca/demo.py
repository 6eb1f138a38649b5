"""A short, honest demo of the attention core (the main job until training lands).

It packs the configured documents, runs colocated attention (one task per whole document), then
cuts every document into query shards, spreads the shards over ``cluster.n_servers`` simulated
attention servers (a longest-processing-time greedy on the cost model — a stand-in for the CAD
scheduler), runs one fused varlen call per server forward and backward, and checks that outputs,
log-sum-exps and all gradients equal the colocated result.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import torch

from distca.attention import (
    AttentionShape,
    CATask,
    CostModel,
    backward,
    forward,
    pair_count,
    resolve_backend,
    shard_document,
    uniform_cuts,
    varlen_metadata,
)
from distca.attention.tasks import task_row_indices
from distca.config import DistCAConfig

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


@dataclass
class ServerReport:
    server: int
    n_tasks: int
    pairs: int
    predicted_ms: float
    measured_ms: float


@dataclass
class DemoReport:
    backend: str
    n_docs: int
    tokens: int
    n_tasks: int
    servers: list[ServerReport]
    max_abs_err: dict[str, float]
    colocated_ms: float

    @property
    def pairs_max_over_mean(self) -> float:
        pairs = [s.pairs for s in self.servers]
        return max(pairs) / (sum(pairs) / len(pairs))


def _lpt(costs: np.ndarray, n_bins: int) -> np.ndarray:
    """Longest-processing-time assignment of items to ``n_bins``; deterministic."""
    order = np.argsort(-costs, kind="stable")
    load = np.zeros(n_bins)
    owner = np.empty(len(costs), dtype=np.int64)
    for i in order:
        b = int(np.argmin(load))
        owner[i] = b
        load[b] += costs[i]
    return owner


def _fused_call(q, k, v, dout, tasks: list[CATask], doc_starts, window: int, backend: str):
    """One server's work: gather its tasks' rows, run forward and backward, scatter back."""
    q_rows, k_rows = (torch.from_numpy(r) for r in task_row_indices(tasks, doc_starts))
    cu_q, cu_k, max_q, max_k = varlen_metadata(tasks)
    args = (torch.from_numpy(cu_q), torch.from_numpy(cu_k), max_q, max_k)
    tq, tk, tv = q[q_rows], k[k_rows], v[k_rows]
    out, lse = forward(tq, tk, tv, *args, window=window, backend=backend)
    dq, dk, dv = backward(tq, tk, tv, out, lse, dout[q_rows], *args, window=window, backend=backend)
    return q_rows, k_rows, out, lse, dq, dk, dv


def run_demo(cfg: DistCAConfig) -> DemoReport:
    """Run the sharded-vs-colocated check and return what was measured."""
    dtype = _DTYPES[cfg.attention.dtype]
    m, w = cfg.model, cfg.attention.window
    backend = resolve_backend(cfg.attention.backend, torch.device("cpu"), dtype).name
    gen = torch.Generator().manual_seed(cfg.seed)
    lengths = cfg.data.doc_lengths
    total = sum(lengths)
    doc_starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    q = torch.randn(total, m.n_heads, m.head_dim, generator=gen).to(dtype)
    k = torch.randn(total, m.n_kv_heads, m.head_dim, generator=gen).to(dtype)
    v = torch.randn(total, m.n_kv_heads, m.head_dim, generator=gen).to(dtype)
    dout = torch.randn(total, m.n_heads, m.head_dim, generator=gen).to(dtype)

    whole = [CATask.for_queries(d, 0, n, w) for d, n in enumerate(lengths)]
    t0 = time.perf_counter()
    _, _, out_ref, lse_ref, dq_ref, dk_ref, dv_ref = _fused_call(q, k, v, dout, whole, doc_starts, w, backend)
    colocated_ms = (time.perf_counter() - t0) * 1e3

    tasks = [t for d, n in enumerate(lengths)
             for t in shard_document(d, n, uniform_cuts(n, cfg.attention.shard_tokens), w)]
    shape = AttentionShape(m.n_heads, m.n_kv_heads, m.head_dim, q.element_size())
    model = CostModel(shape=shape, mode="tiles")
    q_len = np.array([t.q_len for t in tasks])
    kv_len = np.array([t.kv_len for t in tasks])
    cost = model.time_s(q_len, kv_len, w, "fwd") + model.time_s(q_len, kv_len, w, "bwd")
    owner = _lpt(cost, cfg.cluster.n_servers)

    out, lse = torch.zeros_like(q), torch.zeros(q.shape[:2], dtype=lse_ref.dtype)
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    servers = []
    for s in range(cfg.cluster.n_servers):
        mine = [t for t, o in zip(tasks, owner, strict=True) if o == s]
        pairs = int(pair_count(q_len[owner == s], kv_len[owner == s], w).sum())
        if not mine:
            servers.append(ServerReport(s, 0, 0, 0.0, 0.0))
            continue
        t0 = time.perf_counter()
        q_rows, k_rows, o, l, gq, gk, gv = _fused_call(q, k, v, dout, mine, doc_starts, w, backend)
        elapsed = (time.perf_counter() - t0) * 1e3
        out[q_rows], lse[q_rows], dq[q_rows] = o, l, gq
        dk.index_add_(0, k_rows, gk)
        dv.index_add_(0, k_rows, gv)
        servers.append(ServerReport(s, len(mine), pairs, float(cost[owner == s].sum() * 1e3), elapsed))

    errs = {name: float((a.double() - b.double()).abs().max()) for name, a, b in
            (("out", out, out_ref), ("lse", lse, lse_ref), ("dq", dq, dq_ref), ("dk", dk, dk_ref),
             ("dv", dv, dv_ref))}
    return DemoReport(backend, len(lengths), total, len(tasks), servers, errs, colocated_ms)


def format_report(r: DemoReport) -> str:
    """Human-readable summary of a demo run."""
    lines = [
        f"backend={r.backend}  documents={r.n_docs}  tokens={r.tokens}  shards={r.n_tasks}  "
        f"colocated fwd+bwd={r.colocated_ms:.1f} ms",
        "| server | tasks | pairs | predicted ms (tiles model) | measured fwd+bwd ms |",
        "|---:|---:|---:|---:|---:|",
    ]
    lines += [f"| {s.server} | {s.n_tasks} | {s.pairs} | {s.predicted_ms:.2f} | {s.measured_ms:.1f} |"
              for s in r.servers]
    lines.append(f"attention pairs max/mean across servers: {r.pairs_max_over_mean:.3f}")
    lines.append("max |sharded - colocated|: " + "  ".join(f"{k}={v:.2e}" for k, v in r.max_abs_err.items()))
    return "\n".join(lines)
