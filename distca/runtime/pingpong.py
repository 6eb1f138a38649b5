"""Ping-pong: two nano-batches take turns, so one's attention is on the servers while the trainer computes
the other's linear work (DistCA §4, Fig. 7).

Per layer, with nano-batches A and B::

    pre(A) → send A | pre(B) → send B | wait A → post(A) | wait B → post(B)
                      ^ A's attention runs here            ^ B's attention runs here

``sequential`` is the control: each nano-batch's attention is awaited before the next linear work.
The forward pass is overlapped here; the backward pass is not yet (its resend happens inside autograd).
Exposed communication = the time the trainer blocks on servers (``CADClient.blocked_s``).
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
