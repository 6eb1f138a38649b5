"""Colocated core attention for a data-parallel group whose documents are split at rank boundaries.

Packing gives every rank the same token budget, so a document may start on rank r-1 and continue on
rank r. Rank r's queries of that document must see the earlier keys too. This is the colocated
baseline that CAD is compared against: each rank computes attention for its own query tokens, after
an all-gather of the group's k/v (only when some document crosses a boundary). The earlier keys are
prepended to the first document's keys and the kernel's bottom-right-aligned causal mask does the rest;
gradients of the borrowed keys go back to their owners through the all-gather's backward (an
all-reduce of the per-rank gradient slots, which every backend supports, gloo included).

An optional :class:`AttentionTimer` measures what the baseline's attention costs on this rank: the
kernel's forward and backward (wall and this thread's CPU seconds) and the k/v exchange (wall).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from distca.attention import resolve_backend
from distca.attention.varlen import make_meta
from distca.model.core import DocLayout


@dataclass
class AttentionTimer:
    """Seconds this process spent in colocated core attention, summed over calls (read deltas per step).

    ``wall_s`` / ``cpu_s``: the kernel's forward and backward, wall clock and the calling thread's CPU
    time (``time.thread_time``; the kernel runs on the calling thread, forward and CPU backward alike).
    ``exchange_s``: wall seconds in the k/v all-gather (forward) and its gradient all-reduce (backward).
    """

    wall_s: float = 0.0
    cpu_s: float = 0.0
    exchange_s: float = 0.0
    calls: int = 0


class _TimedKernel:
    """Context manager adding one kernel call's wall and thread-CPU seconds to a timer."""

    def __init__(self, timer: AttentionTimer):
        self.timer = timer

    def __enter__(self):
        self.w0, self.c0 = time.perf_counter(), time.thread_time()

    def __exit__(self, *_exc):
        self.timer.wall_s += time.perf_counter() - self.w0
        self.timer.cpu_s += time.thread_time() - self.c0
        self.timer.calls += 1


class _TimedVarlen(torch.autograd.Function):
    """``varlen_attention``'s output with the same backend calls (bit for bit), forward and backward
    timed inside the kernel only."""

    @staticmethod
    def forward(ctx, q, k, v, meta, backend_name: str, timer: AttentionTimer):
        backend = resolve_backend(backend_name, q.device, q.dtype)
        with _TimedKernel(timer):
            out, lse = backend.forward(q, k, v, meta)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.meta, ctx.backend, ctx.timer = meta, backend, timer
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        with _TimedKernel(ctx.timer):
            dq, dk, dv = ctx.backend.backward(dout.to(q.dtype), q, k, v, out, lse, ctx.meta)
        return dq, dk, dv, None, None, None


class _GroupAllGather(torch.autograd.Function):
    """``x [T, ...]`` → ``[world, T, ...]``; backward sums every rank's gradient for each slot."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group, rank: int, world: int, timer: AttentionTimer) -> torch.Tensor:
        t0 = time.perf_counter()
        ctx.group, ctx.rank, ctx.timer = group, rank, timer
        out = torch.empty((world * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # renamed in torch 2.13
        gather(out, x.contiguous(), group=group)
        timer.exchange_s += time.perf_counter() - t0
        return out.view(world, *x.shape)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        t0 = time.perf_counter()
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        ctx.timer.exchange_s += time.perf_counter() - t0
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
                 group=None, backend: str = "auto", timer: AttentionTimer | None = None):
        self.layout, self.rank, self.group, self.backend = layout, rank, group, backend
        self.timer = timer if timer is not None else AttentionTimer()
        self.world = len(ranks)
        if len({sum(p) for p in ranks}) != 1:
            raise ValueError(f"every rank of the group must hold the same number of tokens (the all-gather needs "
                             f"it), got {[sum(p) for p in ranks]}")
        self.prefix = PrefixRows.of(ranks, continues, rank)
        self.needs_exchange = any(continues)  # every rank must join the all-gather, even without a prefix
        if self.needs_exchange and group is None and self.world > 1:
            raise ValueError("documents cross rank boundaries: a process group is needed to borrow their keys")
        cu_k = layout.cu_seqlens.clone()
        cu_k[1:] += self.prefix.n
        self.cu_k, self.max_k = cu_k, int((cu_k[1:] - cu_k[:-1]).max())

    def _with_prefix(self, x: torch.Tensor) -> torch.Tensor:
        if not self.needs_exchange or self.world == 1:
            return x
        every = _GroupAllGather.apply(x, self.group, self.rank, self.world, self.timer)
        # A rank without a prefix still keeps the gather in its graph (an empty slice), so that every
        # rank of the group runs the gather's backward collective — else the group deadlocks.
        parts = [every[r, row:row + n] for r, row, n in self.prefix.pieces] or [every[self.rank, :0]]
        return torch.cat([*parts, x])

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int = -1) -> torch.Tensor:
        k, v = self._with_prefix(k), self._with_prefix(v)
        lay = self.layout
        meta = make_meta(q, k, v, lay.cu_seqlens, self.cu_k, lay.max_len, self.max_k, window)
        return _TimedVarlen.apply(q, k, v, meta, self.backend, self.timer)
