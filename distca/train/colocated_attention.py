"""Colocated core attention for a data-parallel group whose documents are split at rank boundaries.

Packing gives every rank the same token budget, so a document may start on rank r-1 and continue on
rank r. Rank r's queries of that document must see the earlier keys too. This is the colocated
baseline that CAD is compared against: each rank computes attention for its own query tokens, after
an all-gather of the group's k/v (only when some document crosses a boundary). The earlier keys are
prepended to the first document's keys and the kernel's bottom-right-aligned causal mask does the rest;
gradients of the borrowed keys go back to their owners through the all-gather's backward (an
all-reduce of the per-rank gradient slots, which every backend supports, gloo included).

An optional :class:`AttentionTimer` measures what the baseline's attention costs on this rank: the
kernel's forward and backward (wall and this thread's CPU seconds) and the k/v exchange (wall). On a GPU
the wall seconds are the device's, from CUDA events around each call (the host only queues the work).

On a GPU everything here stays on the device: the layout's offsets, the gathered k/v (NCCL all-gather over
the data-parallel group) and the kernel (``torch_varlen`` or ``flash`` under ``auto``).

Mask families other than causal and window (chunked, sink + window, prefix-LM, bidirectional) run on the masked
rectangle executor over the exact key ranges this rank's queries see — later keys of a document included, for the
families whose queries see them — taken from the same all-gather.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist

from distca.attention import masked, resolve_backend
from distca.attention.masked import RectCall
from distca.attention.varlen import make_meta
from distca.masks import AttentionKey, Mask, Rect
from distca.model.core import DocLayout
from distca.scheduler import BatchLayout


@dataclass
class AttentionTimer:
    """Seconds this process spent in colocated core attention, summed over calls (read deltas per step).

    ``wall_s`` / ``cpu_s``: the kernel's forward and backward, wall clock and the calling thread's CPU
    time (``time.thread_time``; the kernel runs on the calling thread, forward and CPU backward alike).
    ``exchange_s``: wall seconds in the k/v all-gather (forward) and its gradient all-reduce (backward).
    On a GPU, ``wall_s`` and ``exchange_s`` are device time between CUDA events; they count once
    :meth:`settle` has run after the device finished the work (the step meter calls it after synchronising).
    """

    wall_s: float = 0.0
    cpu_s: float = 0.0
    exchange_s: float = 0.0
    calls: int = 0
    _events: list = field(default_factory=list, init=False, repr=False, compare=False)

    def settle(self) -> None:
        """Add the device time of the intervals recorded on a GPU since the last call (the device must be done
        with them: synchronise first); nothing on the CPU, where intervals are added as they end."""
        for kind, start, end in self._events:
            seconds = start.elapsed_time(end) / 1e3
            if kind == "kernel":
                self.wall_s += seconds
            else:
                self.exchange_s += seconds
        self._events.clear()


class _Timed:
    """Context manager adding the seconds of the block it wraps to a timer: a ``kernel`` call (wall and this
    thread's CPU seconds) or an ``exchange`` (wall). On a CUDA device the wall part is the device's time
    between two events recorded on the current stream, settled after the step (:meth:`AttentionTimer.settle`)."""

    def __init__(self, timer: AttentionTimer, kind: str, device: torch.device):
        self.timer, self.kind, self.gpu = timer, kind, device.type == "cuda"

    def __enter__(self):
        self.c0 = time.thread_time()
        if self.gpu:
            self.start = torch.cuda.Event(enable_timing=True)
            self.start.record()
        else:
            self.w0 = time.perf_counter()

    def __exit__(self, *_exc):
        t = self.timer
        if self.gpu:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            t._events.append((self.kind, self.start, end))
        elif self.kind == "kernel":
            t.wall_s += time.perf_counter() - self.w0
        else:
            t.exchange_s += time.perf_counter() - self.w0
        if self.kind == "kernel":
            t.cpu_s += time.thread_time() - self.c0
            t.calls += 1


class _TimedVarlen(torch.autograd.Function):
    """``varlen_attention``'s output with the same backend calls (bit for bit), forward and backward
    timed inside the kernel only."""

    @staticmethod
    def forward(ctx, q, k, v, meta, backend_name: str, timer: AttentionTimer):
        backend = resolve_backend(backend_name, q.device, q.dtype)
        with _Timed(timer, "kernel", q.device):
            out, lse = backend.forward(q, k, v, meta)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.meta, ctx.backend, ctx.timer = meta, backend, timer
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        with _Timed(ctx.timer, "kernel", q.device):
            dq, dk, dv = ctx.backend.backward(dout.to(q.dtype), q, k, v, out, lse, ctx.meta)
        return dq, dk, dv, None, None, None


class _TimedMasked(torch.autograd.Function):
    """The masked executor's output (:mod:`distca.attention.masked`), forward and backward timed like the kernel."""

    @staticmethod
    def forward(ctx, q, k, v, call: RectCall, backend: str, timer: AttentionTimer):
        with _Timed(timer, "kernel", q.device):
            out, lse = masked.forward(q, k, v, call, backend)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.call, ctx.backend, ctx.timer = call, backend, timer
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        with _Timed(ctx.timer, "kernel", q.device):
            dq, dk, dv = masked.backward(dout.to(q.dtype), q, k, v, out, lse, ctx.call, ctx.backend)
        return dq, dk, dv, None, None, None


@dataclass(frozen=True)
class _MaskedKeys:
    """A mask family's call on this rank: which rows of the group's gathered keys it reads (``rows`` into the
    ``[world · T]`` concatenation; ``None``: this rank's own rows, nothing gathered) and its rectangles."""

    rows: torch.Tensor | None
    call: RectCall


def _masked_keys(mask: Mask, ranks: list[list[int]], continues: list[bool], rank: int, exchange: bool) -> _MaskedKeys:
    """The exact keys ``rank``'s queries see under ``mask`` and the rectangles over them."""
    batch = BatchLayout.from_ranks(ranks, continues)
    tokens = sum(ranks[0]) if ranks else 0
    starts = {}  # document -> global row of its first token (pieces are packed rank after rank)
    for r, d, o, row in zip(batch.piece_rank.tolist(), batch.piece_doc.tolist(), batch.piece_off.tolist(),
                            batch.piece_row.tolist(), strict=True):
        starts.setdefault(d, r * tokens + row - o)
    # A rank holds one piece per document: its key ranges (sorted, disjoint) are appended to the key buffer in
    # order, and each rectangle's keys lie inside one of them.
    rows: list[np.ndarray] = []
    n_k = 0
    rects = []
    for i in np.flatnonzero(batch.piece_rank == rank).tolist():
        d, off, n, row = (int(batch.piece_doc[i]), int(batch.piece_off[i]), int(batch.piece_len[i]),
                          int(batch.piece_row[i]))
        length, base = int(batch.doc_len[d]), starts[d]
        at = []  # (first key, last key + 1, its row in the key buffer)
        for a, b in mask.key_ranges(length, off, off + n):
            at.append((a, b, n_k))
            rows.append(np.arange(base + a, base + b, dtype=np.int64))
            n_k += b - a
        for r in mask.rects(length, off, off + n):
            a, _, k_row = next(x for x in at if x[0] <= r.k0 and r.k1 <= x[1])
            rects.append(Rect(row + r.q0 - off, row + r.q1 - off, k_row + r.k0 - a, k_row + r.k1 - a, r.kind,
                              r.window))
    flat = np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64)
    call = RectCall.from_rects(rects, tokens, n_k)
    own = np.arange(tokens, dtype=np.int64) + rank * tokens
    if not exchange and not np.array_equal(flat, own[:flat.size]):
        raise AssertionError("without an exchange every key must be this rank's own row")
    return _MaskedKeys(None if not exchange else torch.from_numpy(flat), call)


class _GroupAllGather(torch.autograd.Function):
    """``x [T, ...]`` → ``[world, T, ...]``; backward sums every rank's gradient for each slot."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group, rank: int, world: int, timer: AttentionTimer) -> torch.Tensor:
        ctx.group, ctx.rank, ctx.timer = group, rank, timer
        with _Timed(timer, "exchange", x.device):
            out = torch.empty((world * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
            gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # renamed in torch 2.13
            gather(out, x.contiguous(), group=group)
        return out.view(world, *x.shape)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        with _Timed(ctx.timer, "exchange", grad.device):
            grad = grad.contiguous()
            dist.all_reduce(grad, group=ctx.group)
        return grad[ctx.rank], None, None, None, None


@dataclass(frozen=True)
class PrefixRows:
    """Where this rank's first document's earlier tokens live: ``(rank, first_row, n)`` in order."""

    pieces: tuple[tuple[int, int, int], ...]

    @property
    def n(self) -> int:
        return sum(p[2] for p in self.pieces)

    @classmethod
    def of(cls, ranks: list[list[int]], continues: list[bool], rank: int) -> PrefixRows:
        """From a packed micro-batch's per-rank piece lengths and continuation flags."""
        out = []
        r = rank
        while continues[r]:
            prev = ranks[r - 1]
            total = sum(prev)
            out.append((r - 1, total - prev[-1], prev[-1]))
            if len(prev) > 1:  # the document starts inside rank r-1
                break
            r -= 1
        return cls(tuple(reversed(out)))


class GroupLocalCoreAttention:
    """The model's core-attention interface computed on this rank, borrowing earlier ranks' keys of a
    document split at a rank boundary (see module docstring). ``timer`` (optional) accumulates the
    kernel's and the exchange's seconds."""

    def __init__(self, layout: DocLayout, ranks: list[list[int]], continues: list[bool], rank: int,
                 group=None, backend: str = "auto", timer: AttentionTimer | None = None,
                 parts: list[tuple[list[list[int]], list[bool]]] | None = None):
        """``ranks`` / ``continues``: the group's packed pieces. ``parts`` instead: a micro-batch packed as independent
        parts (``train.nano_split: repack``), each ``(ranks, continues)``; every rank holds its rows of part 0, then
        of part 1, and ``layout`` is their concatenation. One gather and one kernel call serve all parts: each
        part's first document borrows its earlier keys from the same part's rows of earlier ranks."""
        self.layout, self.rank, self.group, self.backend = layout, rank, group, backend
        self.timer = timer if timer is not None else AttentionTimer()
        parts = parts if parts is not None else [(ranks, continues)]
        self.world = len(parts[0][0])
        per_rank = [sum(sum(ranks_p[r]) for ranks_p, _ in parts) for r in range(self.world)]
        if len(set(per_rank)) != 1:
            raise ValueError(f"every rank of the group must hold the same number of tokens (the all-gather needs "
                             f"it), got {per_rank}")
        self.parts = []  # (ranks, continues, first row of the part in every rank's rows, its PrefixRows)
        row0 = 0
        for ranks_p, continues_p in parts:
            if len({sum(r) for r in ranks_p}) != 1:
                raise ValueError(f"every rank must hold the same number of a part's tokens, got "
                                 f"{[sum(r) for r in ranks_p]}")
            self.parts.append((ranks_p, continues_p, row0, PrefixRows.of(ranks_p, continues_p, rank)))
            row0 += sum(ranks_p[rank])
        self.ranks, self.continues = parts[0]
        self.prefix = self.parts[0][3]
        self._masked: dict[Mask, list[_MaskedKeys]] = {}
        # every rank must join the all-gather, even without a prefix
        self.needs_exchange = any(any(c) for _, c in parts)
        if self.needs_exchange and group is None and self.world > 1:
            raise ValueError("documents cross rank boundaries: a process group is needed to borrow their keys")
        # each part's first document's keys start with its borrowed rows: every key boundary after it moves on
        cu_k = layout.cu_seqlens.clone()
        first_doc = 0
        for ranks_p, _, _, prefix in self.parts:
            cu_k[first_doc + 1:] += prefix.n
            first_doc += len(ranks_p[rank])
        # Host copies (the tensors themselves on the CPU) validate every call without a device sync; the kernels
        # read the layout's own, on its device. One copy per micro-batch, made before the step runs.
        self._host = (layout.cu_seqlens.cpu(), cu_k.cpu())
        self.cu_k, self.max_k = cu_k, int((self._host[1][1:] - self._host[1][:-1]).max())

    def _with_prefix(self, x: torch.Tensor) -> torch.Tensor:
        if not self.needs_exchange or self.world == 1:
            return x
        every = _GroupAllGather.apply(x, self.group, self.rank, self.world, self.timer)
        # A rank without a prefix still keeps the gather in its graph (an empty slice), so that every
        # rank of the group runs the gather's backward collective — else the group deadlocks.
        out = [every[self.rank, :0]]
        for i, (_, _, row0, prefix) in enumerate(self.parts):
            out += [every[r, row0 + row:row0 + row + n] for r, row, n in prefix.pieces]
            end = self.parts[i + 1][2] if i + 1 < len(self.parts) else x.shape[0]
            out.append(x[row0:end])
        return torch.cat(out)

    def _masked_call(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Mask) -> torch.Tensor:
        exchange = self.needs_exchange and self.world > 1
        got = self._masked.get(mask)
        if got is None:
            got = self._masked[mask] = [_masked_keys(mask, r, c, self.rank, exchange) for r, c, _, _ in self.parts]
        if exchange:  # every rank joins the gather (and its backward), with or without keys of others
            k_all = _GroupAllGather.apply(k, self.group, self.rank, self.world, self.timer)
            v_all = _GroupAllGather.apply(v, self.group, self.rank, self.world, self.timer)
        outs = []
        for (ranks_p, _, row0, _), keys in zip(self.parts, got, strict=True):
            end = row0 + sum(ranks_p[self.rank])
            if exchange:  # this part's rows of every rank, then the rows its queries read
                rows = keys.rows.to(k.device)
                kp = k_all[:, row0:end].flatten(0, 1)[rows]
                vp = v_all[:, row0:end].flatten(0, 1)[rows]
            else:
                kp, vp = k[row0:end], v[row0:end]
            outs.append(_TimedMasked.apply(q[row0:end], kp, vp, keys.call, self.backend, self.timer))
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: AttentionKey = -1) -> torch.Tensor:
        lay = self.layout
        if q.device != lay.cu_seqlens.device:
            raise ValueError(f"the document layout is on {lay.cu_seqlens.device} but q is on {q.device}: build the "
                             "layout where the model runs (DocLayout.to)")
        if isinstance(window, Mask):
            return self._masked_call(q, k, v, window)
        k, v = self._with_prefix(k), self._with_prefix(v)
        meta = make_meta(q, k, v, *self._host, lay.max_len, self.max_k, window)
        if q.device.type != "cpu":
            meta = dataclasses.replace(meta, cu_seqlens_q=lay.cu_seqlens, cu_seqlens_k=self.cu_k)
        return _TimedVarlen.apply(q, k, v, meta, self.backend, self.timer)
