"""Builders for attention test cases: packed documents, shard cuts, and reference results."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from hypothesis import strategies as st

from distca.attention import CATask, shard_document, varlen_metadata
from distca.attention.tasks import task_row_indices


@dataclass
class Case:
    """Packed documents with per-token q/k/v/dout, cut into tasks for one fused call."""

    lengths: list[int]
    tasks: list[CATask]
    window: int
    q: torch.Tensor  # [tokens, Hq, D] (packed documents)
    k: torch.Tensor
    v: torch.Tensor
    dout: torch.Tensor

    @property
    def doc_starts(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.lengths)[:-1]]).astype(np.int64)

    def fused_inputs(self, tasks: list[CATask] | None = None, dtype: torch.dtype | None = None,
                     device: str = "cpu"):
        """``(q, k, v, dout, cu_q, cu_k, max_q, max_k, q_rows, k_rows)`` of a fused call over tasks."""
        tasks = self.tasks if tasks is None else tasks
        q_rows, k_rows = (torch.from_numpy(r) for r in task_row_indices(tasks, self.doc_starts))
        cu_q, cu_k, mq, mk = varlen_metadata(tasks)
        dt = dtype or self.q.dtype
        to = lambda t: t.to(device=device, dtype=dt)  # noqa: E731
        return (to(self.q[q_rows]), to(self.k[k_rows]), to(self.v[k_rows]), to(self.dout[q_rows]),
                torch.from_numpy(cu_q).to(device), torch.from_numpy(cu_k).to(device), mq, mk, q_rows, k_rows)


@st.composite
def cases(draw, max_docs: int = 4, max_len: int = 300, heads=((4, 4), (4, 2), (6, 1)),
          head_dims=(8, 16), windows=(-1, 1, 2, 5, 16, 64, 1000)) -> Case:
    """Random documents, random shard cuts, random window and GQA layout."""
    n_docs = draw(st.integers(1, max_docs))
    lengths = draw(st.lists(st.integers(1, max_len), min_size=n_docs, max_size=n_docs))
    window = draw(st.sampled_from(windows))
    hq, hkv = draw(st.sampled_from(heads))
    d = draw(st.sampled_from(head_dims))
    tasks = []
    for doc, n in enumerate(lengths):
        cuts = draw(st.lists(st.integers(1, max(1, n - 1)), max_size=4, unique=True)) if n > 1 else []
        tasks += shard_document(doc, n, cuts, window)
    order = draw(st.permutations(range(len(tasks))))  # a server sees shards in any order
    tasks = [tasks[i] for i in order]
    seed = draw(st.integers(0, 2**16))
    gen = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    mk = lambda h: torch.randn(total, h, d, generator=gen, dtype=torch.float64)  # noqa: E731
    return Case(lengths, tasks, window, mk(hq), mk(hkv), mk(hkv), mk(hq))


def dense_document_attention(q, k, v, window: int, scale: float):
    """Whole-document causal attention written from the mask definition, differentiable (fp64).

    Query ``i`` attends key ``j`` iff ``j <= i`` and (``window == -1`` or ``i - j < window``):
    each query sees at most ``window`` keys, itself included.
    """
    n, hq, _ = q.shape
    groups = hq // k.shape[1]
    kk = k.repeat_interleave(groups, dim=1)
    vv = v.repeat_interleave(groups, dim=1)
    i = torch.arange(n)[:, None]
    j = torch.arange(n)[None, :]
    allowed = j <= i
    if window > 0:
        allowed &= (i - j) < window
    s = torch.einsum("qhd,khd->hqk", q, kk) * scale
    s = s.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    out = torch.einsum("hqk,khd->qhd", torch.softmax(s, dim=-1), vv)
    return out, lse.transpose(0, 1)
