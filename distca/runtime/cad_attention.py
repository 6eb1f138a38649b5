"""Core attention through the attention servers, as an autograd function.

``cad_attention(q, k, v, plan, client)`` returns what ``varlen_attention`` returns for this rank's rows
of the plan's documents — ``(out, lse)`` — and its backward resends q, k, v, out, dout and lse (servers
keep nothing) and receives dq, dk, dv. The model calls core attention through one interface and gets
this or the local kernel by config; it never sees the plan, the sockets or the servers.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from distca.runtime.client import CADClient
from distca.runtime.plan_exec import RankTensors
from distca.scheduler import Plan


class _CADAttention(torch.autograd.Function):
    """``plan_of(backward)`` gives each pass its plan: one plan for both here; under the pooled schedule the
    backward's is its tick's (:mod:`distca.runtime.pooled_attention`)."""

    @staticmethod
    def forward(ctx, q, k, v, plan_of: Callable[[bool], Plan], client: CADClient):
        out, lse = client.forward(plan_of(False), RankTensors(q.detach(), k.detach(), v.detach()))
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.plan_of, ctx.client = plan_of, client
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = ctx.client.backward(ctx.plan_of(True), RankTensors(q.detach(), k.detach(), v.detach()), out,
                                         lse, dout.contiguous())
        return dq, dk, dv, None, None


class _CADParts(torch.autograd.Function):
    """Core attention over independent row ranges (a micro-batch packed as two halves, ``train.nano_split:
    repack``): ``plan_of(backward)`` gives one plan per part, each over its part's rows only; both parts' rounds
    are sent before either is collected, in part order, forward and backward."""

    @staticmethod
    def forward(ctx, q, k, v, plan_of: Callable[[bool], tuple[Plan, ...]], client: CADClient,
                rows: tuple[slice, ...]):
        plans = _parts(plan_of(False), rows)
        pending = [client.start_forward(p, RankTensors(q[r].detach(), k[r].detach(), v[r].detach()))
                   for p, r in zip(plans, rows, strict=True)]
        got = [x.wait() for x in pending]
        out, lse = torch.cat([o for o, _ in got]), torch.cat([g for _, g in got])
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.plan_of, ctx.client, ctx.rows = plan_of, client, rows
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse = ctx.saved_tensors
        dout = dout.contiguous()
        plans = _parts(ctx.plan_of(True), ctx.rows)
        pending = [ctx.client.start_backward(p, RankTensors(q[r].detach(), k[r].detach(), v[r].detach()), out[r],
                                             lse[r], dout[r]) for p, r in zip(plans, ctx.rows, strict=True)]
        got = [x.wait() for x in pending]
        dq, dk, dv = (torch.cat([g[i] for g in got]) for i in range(3))
        return dq, dk, dv, None, None, None


def _parts(plans, rows: tuple[slice, ...]) -> tuple[Plan, ...]:
    if not isinstance(plans, tuple) or len(plans) != len(rows):
        raise ValueError(f"core attention over {len(rows)} independent parts needs one plan per part, got "
                         f"{len(plans) if isinstance(plans, tuple) else 'a single plan'}")
    return plans


def cad_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: Plan | Callable[[bool], Plan],
                  client: CADClient) -> tuple[torch.Tensor, torch.Tensor]:
    """Differentiable core attention of this rank's rows over the attention servers: ``(out, lse)``. ``plan``: the
    plan of both passes, or ``plan_of(backward) -> Plan`` when the backward's plan is another one."""
    plan_of = plan if callable(plan) else (lambda backward: plan)
    return _CADAttention.apply(q, k, v, plan_of, client)


def cad_attention_parts(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plans, client: CADClient,
                        rows: tuple[slice, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`cad_attention` over independent row ranges ``rows``: ``plans`` (or ``plans(backward)``) holds one
    plan per range, each over that range's rows only (counted from its first)."""
    plan_of = plans if callable(plans) else (lambda backward: plans)
    return _CADParts.apply(q, k, v, plan_of, client, rows)


class CADCoreAttention:
    """The model's core-attention interface (``distca.model.CoreAttention``) backed by the servers.

    One plan per window the model uses (full causal ``-1`` and, for ShortSWA, the sliding window), all
    planned from the same documents; the model calls it exactly as it calls the local kernel.
    """

    def __init__(self, client: CADClient, plans: dict[int, Plan], rows: tuple[slice, ...] | None = None):
        """``rows``: the micro-batch is independent parts at these rows, ``plans[window]`` one plan per part."""
        self.client, self.plans, self.rows = client, plans, rows

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int = -1) -> torch.Tensor:
        plan = self.plans.get(window)
        if plan is None:
            raise KeyError(f"no CAD plan for window {window}; planned windows: {sorted(self.plans, key=str)}")
        if self.rows is not None:
            return cad_attention_parts(q, k, v, plan, self.client, self.rows)[0]
        return cad_attention(q, k, v, plan, self.client)[0]
