"""Colocated core attention for a data-parallel group whose documents are split at rank boundaries.

Packing gives every rank the same token budget, so a document may start on rank r-1 and continue on
rank r. Rank r's queries of that document must see the earlier keys too. This is the colocated
baseline that CAD is compared against: each rank computes attention for its own query tokens, after
an all-gather of the group's k/v (only when some document crosses a boundary). The earlier keys are
prepended to the first document's keys and the kernel's bottom-right-aligned causal mask does the rest;
gradients of the borrowed keys go back to their owners through the all-gather's backward (an
all-reduce of the per-rank gradient slots, which every backend supports, gloo included).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from distca.attention import varlen_attention
from distca.model.core import DocLayout


class _GroupAllGather(torch.autograd.Function):
    """``x [T, ...]`` → ``[world, T, ...]``; backward sums every rank's gradient for each slot."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group, rank: int, world: int) -> torch.Tensor:
        ctx.group, ctx.rank = group, rank
        out = torch.empty((world * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # renamed in torch 2.13
        gather(out, x.contiguous(), group=group)
        return out.view(world, *x.shape)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad[ctx.rank], None, None, None


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
    document split at a rank boundary (see module docstring)."""

    def __init__(self, layout: DocLayout, ranks: list[list[int]], continues: list[bool], rank: int,
                 group=None, backend: str = "auto"):
        self.layout, self.rank, self.group, self.backend = layout, rank, group, backend
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
        every = _GroupAllGather.apply(x, self.group, self.rank, self.world)
        # A rank without a prefix still keeps the gather in its graph (an empty slice), so that every
        # rank of the group runs the gather's backward collective — else the group deadlocks.
        parts = [every[r, row:row + n] for r, row, n in self.prefix.pieces] or [every[self.rank, :0]]
        return torch.cat([*parts, x])

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int = -1) -> torch.Tensor:
        k, v = self._with_prefix(k), self._with_prefix(v)
        lay = self.layout
        out, _ = varlen_attention(q, k, v, lay.cu_seqlens, self.cu_k, lay.max_len, self.max_k, window=window,
                                  backend=self.backend)
        return out
