"""Any mask family on off-the-shelf varlen kernels: rectangles fused by kind, merged by log-sum-exp.

A mask family reduces to :class:`~distca.masks.Rect` s (``full``, ``causal`` banded by a window,
``inv_causal``). A :class:`RectCall` takes such rectangles in **row** coordinates of a q buffer and a k/v
buffer — packed documents on a trainer, receive buffers on an attention server — and plans the kernel
calls once, with numpy:

- rectangles of one ``(causal, window)`` kind become one fused varlen call (:class:`RectGroup`): their rows
  are gathered into the call's order, one sequence per rectangle;
- ``inv_causal`` (top-left aligned) runs as ``causal`` with both its q rows and its k rows gathered in
  reverse: top-left causal on reversed rows is bottom-right causal;
- a query row covered by several rectangles (sink + window, a slices mask, two kinds) gets their partial
  outputs merged by log-sum-exp. The backward runs each call's kernel backward with the *merged* ``out``
  and ``lse`` (a pair's probability in the combined softmax is ``exp(s - lse_total)``, as in ring
  attention) and sums the gradients of rows used several times.

A call whose rectangles are all one kind and share no query row is one kernel call with no merge; when
its rows are the buffers' own rows in order (causal documents, whole) it runs on the buffers directly.
Gathers and the forward merge are index-based (no atomics), so results are deterministic; key gradients
are summed with ``index_add_`` (deterministic on CPU; on CUDA under ``torch.use_deterministic_algorithms``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from distca.attention.backends.base import logsumexp, lse_dtype
from distca.attention.tasks import row_ranges
from distca.attention.varlen import backward as varlen_backward
from distca.attention.varlen import forward as varlen_forward
from distca.errors import AttentionInputError, InputError
from distca.limits import MAX_DOC_TOKENS, check_int
from distca.masks import Mask, Rect, check_slices_fit

KINDS: tuple[str, ...] = ("full", "causal", "inv_causal")  # RectCall.kind holds indices into this


@dataclass(frozen=True, eq=False)
class RectGroup:
    """One fused varlen call: the rectangles of one ``(causal, window)`` kind, rows in call order."""

    causal: bool
    window: int
    q_index: np.ndarray  # int64 [call q rows]: the q-buffer row of each call row
    k_index: np.ndarray  # int64 [call k rows]: the k/v-buffer row of each call row
    cu_q: np.ndarray  # int32 [rects + 1]
    cu_k: np.ndarray
    max_q: int
    max_k: int
    q_identity: bool  # q_index is the whole q buffer in order: no gather, no scatter
    k_identity: bool

    @property
    def n_rects(self) -> int:
        return len(self.cu_q) - 1


@dataclass(frozen=True, eq=False)
class RectCall:
    """Rectangles over a q buffer of ``n_q`` rows and a k/v buffer of ``n_k`` rows, planned as kernel calls.

    Build it with :meth:`build` (arrays) or :meth:`from_rects`; :func:`document_call` builds one for packed
    documents. ``q_slots[d, r]`` is the position, in the concatenation of the groups' q rows, of query row
    ``r``'s ``d``-th partial result (``len`` of that concatenation when it has fewer): the merge's gather.
    """

    n_q: int
    n_k: int
    q0: np.ndarray
    q1: np.ndarray
    k0: np.ndarray
    k1: np.ndarray
    kind: np.ndarray  # int8 indices into KINDS
    window: np.ndarray
    groups: tuple[RectGroup, ...]
    q_slots: np.ndarray  # int64 [depth, n_q]

    @property
    def depth(self) -> int:
        """The most rectangles (kernel results) any one query row has; above 1 the results are merged."""
        return self.q_slots.shape[0]

    @property
    def n_calls(self) -> int:
        return len(self.groups)

    @property
    def pairs(self) -> int:
        """(query, key) pairs the rectangles compute."""
        return sum(Rect(*r).pairs for r in self._rects())

    def _rects(self):
        for i in range(len(self.q0)):
            yield (int(self.q0[i]), int(self.q1[i]), int(self.k0[i]), int(self.k1[i]), KINDS[self.kind[i]],
                   int(self.window[i]))

    @classmethod
    def from_rects(cls, rects: Iterable[Rect], n_q: int, n_k: int) -> RectCall:
        """From :class:`Rect` s whose coordinates are buffer rows."""
        rects = list(rects)
        if not all(isinstance(r, Rect) for r in rects):
            raise AttentionInputError("RectCall.from_rects takes Rect objects (rows of the q and k buffers)")
        col = lambda f: np.array([f(r) for r in rects], dtype=np.int64)  # noqa: E731
        return cls.build(col(lambda r: r.q0), col(lambda r: r.q1), col(lambda r: r.k0), col(lambda r: r.k1),
                         [r.kind for r in rects], col(lambda r: r.window), n_q=n_q, n_k=n_k)

    @classmethod
    def build(cls, q0, q1, k0, k1, kind, window=None, *, n_q: int, n_k: int) -> RectCall:
        """From row arrays (``kind``: names in :data:`KINDS` or their indices; ``window``: -1 or keys per query,
        default -1). Rectangles with no query or no key are dropped from the kernel calls."""
        n_q = check_int(n_q, "RectCall n_q", 0, MAX_DOC_TOKENS, error=AttentionInputError)
        n_k = check_int(n_k, "RectCall n_k", 0, MAX_DOC_TOKENS, error=AttentionInputError)
        q0, q1, k0, k1 = (_int_array(a, name) for a, name in ((q0, "q0"), (q1, "q1"), (k0, "k0"), (k1, "k1")))
        n = len(q0)
        codes = _kind_codes(kind, n)
        window = np.full(n, -1, dtype=np.int64) if window is None else _int_array(window, "window")
        if not (len(q1) == len(k0) == len(k1) == len(window) == n):
            raise AttentionInputError(f"rect arrays differ in length: q0 {n}, q1 {len(q1)}, k0 {len(k0)}, "
                                      f"k1 {len(k1)}, kind {len(codes)}, window {len(window)}")
        _check_rects(q0, q1, k0, k1, codes, window, n_q, n_k)
        groups = _plan_groups(q0, q1, k0, k1, codes, window, n_q, n_k)
        frozen = [a.copy() for a in (q0, q1, k0, k1, codes, window)]
        for a in frozen:
            a.flags.writeable = False
        return cls(n_q, n_k, *frozen, groups=groups, q_slots=_slots([g.q_index for g in groups], n_q))


def _int_array(a, name: str) -> np.ndarray:
    arr = np.asarray(a)
    if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
        raise AttentionInputError(f"rect {name} must be a 1-D integer array, got {arr.dtype} {arr.shape}")
    return arr.astype(np.int64)


def _kind_codes(kind, n: int) -> np.ndarray:
    arr = np.asarray(kind)
    if arr.ndim != 1 or len(arr) != n:
        raise AttentionInputError(f"rect kind must be a 1-D array of {n} entries, got shape {arr.shape}")
    if arr.size and np.issubdtype(arr.dtype, np.integer):
        codes = arr.astype(np.int8)
        bad = np.flatnonzero((arr < 0) | (arr >= len(KINDS)))
    else:
        names = [str(x) for x in arr.tolist()]
        bad = np.array([i for i, x in enumerate(names) if x not in KINDS], dtype=np.int64)
        codes = np.array([KINDS.index(x) if x in KINDS else 0 for x in names], dtype=np.int8)
    if len(bad):
        raise AttentionInputError(f"rect {int(bad[0])} has kind {arr[bad[0]]!r}; expected one of {KINDS}")
    return codes


def _check_rects(q0, q1, k0, k1, codes, window, n_q: int, n_k: int) -> None:
    """Rows inside the buffers, ranges ordered, windows only on causal rectangles; errors name the rect."""
    checks = (
        ((q0 < 0) | (q0 > q1) | (q1 > n_q), f"query rows must satisfy 0 <= q0 <= q1 <= n_q = {n_q}"),
        ((k0 < 0) | (k0 > k1) | (k1 > n_k), f"key rows must satisfy 0 <= k0 <= k1 <= n_k = {n_k}"),
        ((window != -1) & (window < 1), "window must be -1 or >= 1 keys"),
        ((window != -1) & (codes != KINDS.index("causal")), "only causal rects take a window"),
    )
    for bad, why in checks:
        idx = np.flatnonzero(bad)
        if len(idx):
            i = int(idx[0])
            raise AttentionInputError(f"rect {i} (q [{q0[i]}, {q1[i]}) k [{k0[i]}, {k1[i]}) {KINDS[codes[i]]} "
                                      f"window {window[i]}): {why}")


def _rows(starts: np.ndarray, lengths: np.ndarray, reverse: np.ndarray) -> np.ndarray:
    """Rows of each range in order, or last to first where ``reverse`` (vectorised)."""
    rows = row_ranges(starts, lengths)
    flip = np.repeat(reverse, lengths)
    first = np.repeat(starts, lengths)
    last = first + np.repeat(lengths, lengths) - 1
    return np.where(flip, first + last - rows, rows)


def _plan_groups(q0, q1, k0, k1, codes, window, n_q: int, n_k: int) -> tuple[RectGroup, ...]:
    """One group per ``(causal, window)``, in a fixed order (non-causal first, then by window)."""
    keep = (q1 > q0) & (k1 > k0)
    causal = codes != KINDS.index("full")
    keys = sorted({(bool(c), int(w)) for c, w in zip(causal[keep], window[keep], strict=True)})
    groups = []
    for c, w in keys:
        sel = np.flatnonzero(keep & (causal == c) & (window == w))
        nq, nk = q1[sel] - q0[sel], k1[sel] - k0[sel]
        rev = codes[sel] == KINDS.index("inv_causal")
        q_index = _rows(q0[sel], nq, rev)
        k_index = _rows(k0[sel], nk, rev)
        for a in (q_index, k_index):
            a.flags.writeable = False
        groups.append(RectGroup(
            causal=c, window=w, q_index=q_index, k_index=k_index,
            cu_q=np.concatenate([[0], np.cumsum(nq)]).astype(np.int32),
            cu_k=np.concatenate([[0], np.cumsum(nk)]).astype(np.int32),
            max_q=int(nq.max()), max_k=int(nk.max()),
            q_identity=len(q_index) == n_q and bool((q_index == np.arange(n_q)).all()),
            k_identity=len(k_index) == n_k and bool((k_index == np.arange(n_k)).all()),
        ))
    return tuple(groups)


def _slots(indices: Sequence[np.ndarray], n: int) -> np.ndarray:
    """``[depth, n]`` positions of each row's results in ``concat(indices)``; ``len(concat)`` pads."""
    rows = np.concatenate(indices) if indices else np.zeros(0, dtype=np.int64)
    total = len(rows)
    counts = np.bincount(rows, minlength=n)
    depth = int(counts.max()) if n else 0
    order = np.argsort(rows, kind="stable")
    first = np.cumsum(counts) - counts
    rank = np.arange(total) - first[rows[order]]
    slots = np.full((depth, n), total, dtype=np.int64)
    slots[rank, rows[order]] = order
    slots.flags.writeable = False
    return slots


# -- execution ---------------------------------------------------------------------------------------------
def _check_buffers(call: RectCall, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if not isinstance(call, RectCall):
        raise AttentionInputError(f"call must be a RectCall, got {type(call).__name__}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 3:
            raise AttentionInputError(f"{name} must be a [rows, heads, head_dim] tensor")
    if q.shape[0] != call.n_q or k.shape[0] != call.n_k or v.shape[0] != call.n_k:
        raise AttentionInputError(f"the call covers {call.n_q} q rows and {call.n_k} k/v rows; got q "
                                  f"{tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")


def _index(a: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.tensor(a, device=device)  # a copy: the plan's arrays are read-only


def _take(x: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
    return x if index is None else x[index]


def _device_plan(g: RectGroup, device: torch.device):
    """``(q index | None, k index | None, cu_q, cu_k)`` on ``device``; ``None`` where rows are taken as they are."""
    qi = None if g.q_identity else _index(g.q_index, device)
    ki = None if g.k_identity else _index(g.k_index, device)
    return qi, ki, _index(g.cu_q, device), _index(g.cu_k, device)


def forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: RectCall, backend: str = "auto",
    softmax_scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Graph-free masked attention: ``(out [n_q, Hq, D] in q's dtype, lse [n_q, Hq] in lse_dtype)``.

    Rows no rectangle covers get ``out = 0`` and ``lse = -inf``.
    """
    _check_buffers(call, q, k, v)
    ld = lse_dtype(q.dtype)
    parts = []
    for g in call.groups:
        qi, ki, cu_q, cu_k = _device_plan(g, q.device)
        parts.append(varlen_forward(_take(q, qi), _take(k, ki), _take(v, ki), cu_q, cu_k, g.max_q, g.max_k,
                                    g.window, softmax_scale, backend, causal=g.causal))
    if len(parts) == 1 and call.groups[0].q_identity:  # the fast path: the kernel's own buffers
        return parts[0]
    parts = [(o, l.to(ld)) for o, l in parts]
    if call.depth <= 1:  # no row has two results: scatter them
        out = q.new_zeros(q.shape)
        lse = torch.full(q.shape[:2], float("-inf"), dtype=ld, device=q.device)
        for g, (o, l) in zip(call.groups, parts, strict=True):
            idx = _index(g.q_index, q.device)
            out[idx], lse[idx] = o, l
        return out, lse
    return _merge(parts, call.q_slots, q, ld)



def _merge(parts, slots: np.ndarray, q: torch.Tensor, ld: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine each row's partial results: ``lse = logsumexp(lse_r)``, ``out = Σ exp(lse_r - lse)·out_r``,
    computed in ``ld``. A pad row (``lse = -inf``, ``out = 0``) stands for missing results."""
    hq, d = q.shape[1], q.shape[2]
    all_l = torch.cat([l for _, l in parts] + [torch.full((1, hq), float("-inf"), dtype=ld, device=q.device)])
    all_o = torch.cat([o for o, _ in parts] + [q.new_zeros(1, hq, d)])
    idx = _index(slots, q.device)
    ls = all_l[idx]  # [depth, n_q, Hq]
    lse = logsumexp(ls, dim=0)
    safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    w = torch.exp(ls - safe)  # 0 for pads and for rows no key reaches
    out = torch.zeros(q.shape, dtype=ld, device=q.device)
    for r in range(idx.shape[0]):
        out += w[r][..., None] * all_o[idx[r]].to(ld)
    return out.to(q.dtype), lse


def backward(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    call: RectCall, backend: str = "auto", softmax_scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Graph-free backward from :func:`forward`'s merged ``out`` and ``lse``: ``(dq, dk, dv)``.

    Each kernel call's backward gets the merged rows of ``out`` and ``lse`` (its pairs' probabilities in
    the whole softmax); gradients of a row used by several rectangles are summed.
    """
    _check_buffers(call, q, k, v)
    if out.shape != q.shape or dout.shape != q.shape or lse.shape != q.shape[:2]:
        raise AttentionInputError(f"out {tuple(out.shape)}, dout {tuple(dout.shape)} must match q {tuple(q.shape)} "
                                  f"and lse {tuple(lse.shape)} must be {tuple(q.shape[:2])}")
    grads = []
    for g in call.groups:
        qi, ki, cu_q, cu_k = _device_plan(g, q.device)
        grads.append(varlen_backward(
            _take(q, qi), _take(k, ki), _take(v, ki), _take(out, qi), _take(lse, qi), _take(dout, qi), cu_q, cu_k,
            g.max_q, g.max_k, g.window, softmax_scale, backend, causal=g.causal))
    if len(grads) == 1 and call.groups[0].q_identity and call.groups[0].k_identity:
        return grads[0]
    acc = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    dq = _sum_rows([dq for dq, _, _ in grads], call.q_slots, q, acc)
    dk, dv = torch.zeros(k.shape, dtype=acc, device=k.device), torch.zeros(v.shape, dtype=acc, device=v.device)
    for g, (_, gk, gv) in zip(call.groups, grads, strict=True):
        if g.k_identity:
            dk += gk.to(acc)
            dv += gv.to(acc)
        else:
            idx = _index(g.k_index, k.device)
            dk.index_add_(0, idx, gk.to(acc))
            dv.index_add_(0, idx, gv.to(acc))
    return dq, dk.to(k.dtype), dv.to(v.dtype)


def _sum_rows(parts: list[torch.Tensor], slots: np.ndarray, q: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """Per q row, the sum of its rectangles' gradients (a gather per depth: deterministic)."""
    all_g = torch.cat([p.to(acc) for p in parts] + [torch.zeros((1, *q.shape[1:]), dtype=acc, device=q.device)])
    total = torch.zeros(q.shape, dtype=acc, device=q.device)
    for r in range(slots.shape[0]):
        total += all_g[_index(slots[r], q.device)]
    return total.to(q.dtype)


class _MaskedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, call: RectCall, backend: str, softmax_scale):
        out, lse = forward(q, k, v, call, backend, softmax_scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.call, ctx.backend, ctx.scale = call, backend, softmax_scale
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = backward(dout.to(q.dtype), q, k, v, out, lse, ctx.call, ctx.backend, ctx.scale)
        return dq, dk, dv, None, None, None


def masked_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: RectCall, backend: str = "auto",
    softmax_scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Differentiable masked attention over ``call``'s rectangles: ``(out, lse)``, ``lse`` not differentiable."""
    _check_buffers(call, q, k, v)
    return _MaskedAttention.apply(q, k, v, call, backend, softmax_scale)


# -- packed documents ------------------------------------------------------------------------------------
def document_call(
    doc_lens: Sequence[int], masks: Mask | Sequence[Mask],
    shards: Sequence[tuple[int, int, int]] | None = None,
) -> RectCall:
    """The :class:`RectCall` of packed documents: q and k/v rows are the packed rows (document ``d`` starts at
    the sum of the earlier lengths). ``masks``: one :class:`Mask` for all documents or one per document;
    ``shards``: the ``(doc, x, y)`` query ranges to compute (default each whole document), disjoint."""
    lens = [check_int(n, f"document {i} length", 0, MAX_DOC_TOKENS) for i, n in enumerate(doc_lens)]
    if isinstance(masks, Mask):
        masks = [masks] * len(lens)
    masks = list(masks)
    if len(masks) != len(lens):
        raise InputError(f"{len(lens)} documents but {len(masks)} masks; pass one Mask or one per document")
    for d, (m, n) in enumerate(zip(masks, lens, strict=True)):
        if not isinstance(m, Mask):
            raise InputError(f"document {d}'s mask must be a Mask, got {type(m).__name__}")
        check_slices_fit(m, n, d)
    shards = [(d, 0, n) for d, n in enumerate(lens)] if shards is None else _check_shards(shards, lens)
    starts = np.concatenate([[0], np.cumsum(lens, dtype=np.int64)])
    rects = [Rect(r.q0 + int(starts[d]), r.q1 + int(starts[d]), r.k0 + int(starts[d]), r.k1 + int(starts[d]),
                  r.kind, r.window)
             for d, x, y in shards for r in masks[d].rects(lens[d], x, y)]
    total = int(starts[-1])
    return RectCall.from_rects(rects, total, total)


def _check_shards(shards, lens: list[int]) -> list[tuple[int, int, int]]:
    """Shards as ``(doc, x, y)`` inside their documents, no query in two of them (its pairs would count twice)."""
    out = []
    for i, s in enumerate(shards):
        if not isinstance(s, tuple | list) or len(s) != 3:
            raise InputError(f"shard {i} must be (doc, x, y), got {s!r}")
        d = check_int(s[0], f"shard {i} document", 0, len(lens) - 1) if lens else None
        if d is None:
            raise InputError(f"shard {i} names document {s[0]!r} but there are no documents")
        x = check_int(s[1], f"shard {i} start", 0, lens[d])
        y = check_int(s[2], f"shard {i} end", x, lens[d])
        out.append((d, x, y))
    prev = None
    for d, x, y in sorted(s for s in out if s[1] < s[2]):  # empty shards hold no query
        if prev is not None and prev[0] == d and x < prev[2]:
            raise InputError(f"shards {prev} and {(d, x, y)} share queries of document {d}")
        if prev is None or prev[0] != d or y > prev[2]:
            prev = (d, x, y)
    return out
