"""A server's fused call over one plan round's receive buffers — the computation every data plane shares.

The rows of a round arrive (over ZeroMQ frames, shared memory or an all-to-all) in the server's receive
buffers: queries task by task, keys and values once per (server, document). The fused call gathers each
task's keys contiguous (``key_rows``), runs one varlen kernel over all tasks, and in the backward sums the
gradient of a key row used by several tasks here, so one row of ``dk``/``dv`` returns per row received.
A plan of another mask family (chunked, sink + window, prefix-LM, bidirectional) registers kernel rectangles
instead, which the masked executor runs over the same buffers (:mod:`distca.attention.masked`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from distca.attention import backward as attn_backward
from distca.attention import forward as attn_forward
from distca.attention import lse_dtype, masked
from distca.attention.masked import RectCall
from distca.server.layout import ServerLayout


@dataclass(frozen=True)
class FusedCall:
    """One server's varlen call of one plan, its index tensors on the device where it runs."""

    cu_q: torch.Tensor
    cu_k: torch.Tensor
    key_rows: torch.Tensor
    max_q: int
    max_k: int
    window: int
    q_rows: int
    kv_rows: int
    rects: RectCall | None = None  # a masked plan's rectangles over the buffers (then no fused call)

    @classmethod
    def of(cls, layout: ServerLayout, device: torch.device) -> FusedCall:
        on = (lambda t: t) if device.type == "cpu" else (lambda t: t.to(device, non_blocking=True))
        return cls(on(layout.cu_q), on(layout.cu_k), on(layout.key_rows), layout.max_q, layout.max_k, layout.window,
                   layout.q_rows, layout.kv_rows, layout.rect_call())

    @property
    def n_tasks(self) -> int:
        if self.rects is not None:
            return len(self.rects.q0)
        return self.cu_q.numel() - 1


def fused_forward(call: FusedCall, q: torch.Tensor, kb: torch.Tensor, vb: torch.Tensor,
                  backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)`` on the server's q rows, from q rows and the k/v buffer."""
    if call.n_tasks == 0:
        return q.new_zeros(q.shape), q.new_zeros(q.shape[:2], dtype=lse_dtype(q.dtype))
    if call.rects is not None:
        return masked.forward(q, kb, vb, call.rects, backend)
    kt, vt = kb[call.key_rows], vb[call.key_rows]  # each task's keys contiguous, as varlen needs
    return attn_forward(q, kt, vt, call.cu_q, call.cu_k, call.max_q, call.max_k, window=call.window, backend=backend)


def fused_backward(call: FusedCall, q: torch.Tensor, kb: torch.Tensor, vb: torch.Tensor, out: torch.Tensor,
                   lse: torch.Tensor, dout: torch.Tensor, backend: str) -> tuple[torch.Tensor, torch.Tensor,
                                                                                   torch.Tensor]:
    """``(dq, dk, dv)``: dq on the q rows; dk/dv on the k/v buffer rows, summed over the tasks using a row."""
    if call.n_tasks == 0:
        return torch.zeros_like(q), torch.zeros_like(kb), torch.zeros_like(vb)
    if call.rects is not None:
        return masked.backward(dout, q, kb, vb, out, lse, call.rects, backend)
    kt, vt = kb[call.key_rows], vb[call.key_rows]
    dq, dkt, dvt = attn_backward(q, kt, vt, out, lse, dout, call.cu_q, call.cu_k, call.max_q, call.max_k,
                                 window=call.window, backend=backend)
    dk = torch.zeros_like(kb).index_add_(0, call.key_rows, dkt)
    dv = torch.zeros_like(vb).index_add_(0, call.key_rows, dvt)
    return dq, dk, dv

