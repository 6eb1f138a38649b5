"""The contract every core-attention backend implements.

All backends take flash-attn varlen layouts: ``q [total_q, Hq, D]``, ``k, v [total_k, Hkv, D]``,
``cu_seqlens_*`` int32 of length ``n_tasks + 1``. They return ``out [total_q, Hq, D]`` in the
input dtype and ``lse [total_q, Hq]`` (natural log, fp32; fp64 for fp64 inputs). ``lse`` is
token-major — unlike flash-attn's ``[Hq, total_q]`` — so that one task's rows of ``out`` and
``lse`` are contiguous slices, which is what the transport ships. Query rows that see no key
(only possible when a task has ``q_len > kv_len``) get ``out = 0`` and ``lse = -inf``. A call is
causal (bottom-right aligned, optionally banded by a window) unless ``meta.causal`` is False: then every
query sees every key of its sequence — the ``full`` rectangles of the mask families.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class VarlenMeta:
    """Sequence metadata of one fused call, validated, with host copies of the offsets."""

    cu_seqlens_q: torch.Tensor
    cu_seqlens_k: torch.Tensor
    max_seqlen_q: int
    max_seqlen_k: int
    window: int  # -1 = full causal, else keys per query including itself
    softmax_scale: float
    cu_q_host: tuple[int, ...]
    cu_k_host: tuple[int, ...]
    causal: bool = True  # False: every query sees every key of its sequence (window is then -1)

    @property
    def n_tasks(self) -> int:
        return len(self.cu_q_host) - 1

    def spans(self):
        """Yield ``(q0, q1, k0, k1)`` row ranges of each task."""
        for i in range(self.n_tasks):
            yield self.cu_q_host[i], self.cu_q_host[i + 1], self.cu_k_host[i], self.cu_k_host[i + 1]


def lse_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the log-sum-exp for inputs of ``dtype``: fp32, except fp64 for fp64 inputs.

    The one home of this rule: the kernels produce their lse in it, and the trainer's and the attention
    server's buffers are allocated in it.
    """
    return torch.float64 if dtype == torch.float64 else torch.float32


def logsumexp(x: torch.Tensor, dim: int) -> torch.Tensor:
    """``log Σ exp(x)`` over ``dim``, as ``max + log Σ exp(x - max)``; ``-inf`` where every entry is ``-inf``.

    Written out rather than ``torch.logsumexp``: on the CPU (torch 2.13, float64, this project's VM) that
    kernel's first call in a process returned errors of ~1e-9 on a causal score matrix in about one process in
    four (the same input exact in the others, and on a second call), which made fp64 comparisons between a
    trainer and a server process fail at random. Written this way, the result was the same, and exact to
    rounding, in every process tried.
    """
    m = x.amax(dim, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    return (x - m).exp().sum(dim).log() + m.squeeze(dim)


class Backend(ABC):
    """A core-attention kernel family: varlen forward and explicit (graph-free) backward."""

    name: str = "?"

    @abstractmethod
    def unavailable_reason(self, device: torch.device, dtype: torch.dtype) -> str | None:
        """``None`` when this backend can run on ``device`` with ``dtype``, else why not."""

    @abstractmethod
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: VarlenMeta):
        """Return ``(out, lse)``."""

    @abstractmethod
    def backward(
        self, dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
        lse: torch.Tensor, meta: VarlenMeta,
    ):
        """Return ``(dq, dk, dv)`` given the forward's ``out`` and ``lse``."""
