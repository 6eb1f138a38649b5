"""Ping-pong: two nano-batches take turns, so one's attention is on the servers while the trainer computes
the other's linear work (DistCA §4, Fig. 7).

Per layer, with nano-batches A and B::

    pre(A) → send A | pre(B) → send B | wait A → post(A) | wait B → post(B)
                      ^ A's attention runs here            ^ B's attention runs here

``sequential`` is the control: each nano-batch's attention is awaited before the next linear work.
``pingpong_layer`` is the inference-style forward; ``train_forward``/``train_backward`` keep what the
backward needs and overlap both passes: in the backward, one nano-batch's attention gradients are
computed on the servers while the trainer computes the other's linear gradients.
Exposed communication = the time the trainer blocks on servers (``CADClient.blocked_s``); the order in
which rounds were sent and completed (whether they overlapped) is reported to ``CADClient(on_event=...)``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from distca.runtime.client import CADClient
from distca.runtime.plan_exec import RankTensors
from distca.scheduler import Plan

Pre = Callable[[int, torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
Post = Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]


def pingpong_layer(xs: Sequence[torch.Tensor], plans: Sequence[Plan], client: CADClient, pre: Pre,
                   post: Post) -> list[torch.Tensor]:
    """One layer over two nano-batches with their attention overlapped with the other's linear work."""
    if len(xs) != 2 or len(plans) != 2:
        raise ValueError(f"ping-pong takes exactly two nano-batches, got {len(xs)} inputs and {len(plans)} plans")
    pending = []
    for i in range(2):
        q, k, v = pre(i, xs[i])
        pending.append(client.start_forward(plans[i], RankTensors(q, k, v)))
    return [post(i, xs[i], pending[i].wait()[0]) for i in range(2)]


def sequential_layer(xs: Sequence[torch.Tensor], plans: Sequence[Plan], client: CADClient, pre: Pre,
                     post: Post) -> list[torch.Tensor]:
    """The control: each nano-batch waits for its attention before the next one's linear work."""
    out = []
    for i, x in enumerate(xs):
        q, k, v = pre(i, x)
        attn, _ = client.forward(plans[i], RankTensors(q, k, v))
        out.append(post(i, x, attn))
    return out


class NanoState:
    """What one nano-batch of one layer keeps between forward and backward."""

    def __init__(self, x: torch.Tensor, qkv: tuple[torch.Tensor, ...], attn: torch.Tensor, lse: torch.Tensor,
                 y: torch.Tensor):
        self.x, self.qkv, self.attn, self.lse, self.y = x, qkv, attn, lse, y


def train_forward(xs: Sequence[torch.Tensor], plans: Sequence[Plan], client: CADClient, pre: Pre, post: Post,
                  overlap: bool = True) -> tuple[list[torch.Tensor], list[NanoState]]:
    """Forward of one layer over nano-batches, keeping what :func:`train_backward` needs.

    The layer input is a fresh leaf per nano-batch (``x.detach()``), so each layer's backward is run
    explicitly — that is what lets the backward overlap one nano-batch's attention with the other's
    linear gradients. ``overlap=False`` is the sequential control.
    """
    states, pending = [], []
    for i, x in enumerate(xs):
        x = x.detach().requires_grad_()
        q, k, v = pre(i, x)
        p = client.start_forward(plans[i], RankTensors(q.detach(), k.detach(), v.detach()))
        states.append([x, (q, k, v)])
        if overlap:
            pending.append(p)
        else:
            pending.append(p.wait())
    out = []
    for i, (x, qkv) in enumerate(states):
        attn, lse = pending[i].wait() if overlap else pending[i]
        attn = attn.requires_grad_()
        y = post(i, x, attn)
        states[i] = NanoState(x, qkv, attn, lse, y)
        out.append(y.detach())
    return out, states


def train_backward(states: Sequence[NanoState], dys: Sequence[torch.Tensor], plans: Sequence[Plan],
                   client: CADClient, params: Sequence[torch.Tensor] = (), overlap: bool = True) -> list[torch.Tensor]:
    """Backward of one layer: post-attention gradients, attention gradients on the servers, pre-attention
    gradients; with ``overlap`` one nano-batch's attention backward runs while the other's linear
    gradients are computed. Parameter gradients accumulate into ``params``' ``.grad``. Returns d(input)."""
    params = list(params)
    pending = []
    for i, s in enumerate(states):
        torch.autograd.backward([s.y], [dys[i]], inputs=[s.x, s.attn, *params])
        q, k, v = (t.detach() for t in s.qkv)
        p = client.start_backward(plans[i], RankTensors(q, k, v), s.attn.detach(), s.lse, s.attn.grad.contiguous())
        pending.append(p if overlap else p.wait())
    dxs = []
    for i, s in enumerate(states):
        dq, dk, dv = pending[i].wait() if overlap else pending[i]
        torch.autograd.backward(list(s.qkv), [dq, dk, dv], inputs=[s.x, *params])
        dxs.append(s.x.grad)
    return dxs
