"""The one interface through which the model calls core attention.

``core(q, k, v, window) -> out`` for the rank's packed tokens ``[T, H, D]``. ``window`` is the call's mask key:
an int window (-1 full causal) or a :class:`~distca.masks.Mask` of another family (chunked, sink +
window, prefix-LM, bidirectional). The local implementation runs ``varlen_attention`` (other families: the
masked rectangle executor) over the documents of a :class:`DocLayout`; the CAD implementation (runtime) ships the
same tensors to attention servers by a plan. The model never sees which one it has.
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass
from typing import Protocol

import torch

from distca.attention import varlen_attention
from distca.attention.masked import RectCall, document_call, masked_attention
from distca.masks import AttentionKey, Mask


class CoreAttention(Protocol):
    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: AttentionKey = -1) -> torch.Tensor:
        """Causal attention of packed ``q [T, Hq, D]`` over ``k, v [T, Hkv, D]`` within documents."""


@dataclass(frozen=True)
class AttentionCall:
    """A core-attention call a layer asks for: packed ``q [T, Hq, D]``, ``k, v [T, Hkv, D]`` and the window."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    window: AttentionKey = -1


# A layer written as steps: it yields each core-attention call it needs, is sent that call's output, and returns
# the layer's output. Everything between two calls is the layer's own (row-wise) compute.
LayerSteps = Generator[AttentionCall, torch.Tensor, torch.Tensor]


def run_steps(steps: LayerSteps, core: CoreAttention) -> torch.Tensor:
    """Run a layer's steps, answering each of its calls with ``core``: what the layer's ``forward`` is."""
    call = next(steps)
    while True:
        try:
            call = steps.send(core(call.q, call.k, call.v, call.window))
        except StopIteration as done:
            return done.value


@dataclass(frozen=True)
class DocLayout:
    """Packed documents of one sequence: boundaries and per-token positions (restarting per document)."""

    cu_seqlens: torch.Tensor  # int32 [n_docs + 1]
    max_len: int
    position_ids: torch.Tensor  # int64 [T]: position of each token inside its document

    @classmethod
    def from_lengths(cls, lengths: list[int], first_position: int = 0) -> DocLayout:
        """Documents packed in order; ``first_position`` offsets the first document (it continues from an
        earlier rank, whose tokens hold positions ``[0, first_position)``)."""
        cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
        cu[1:] = torch.tensor(lengths, dtype=torch.int32).cumsum(0)
        pos = torch.cat([torch.arange(n) + (first_position if i == 0 else 0) for i, n in enumerate(lengths)])
        return cls(cu, max(lengths), pos)

    @classmethod
    def concat(cls, parts: list[DocLayout]) -> DocLayout:
        """Layouts of consecutive row ranges as one (a micro-batch packed as independent halves)."""
        if len(parts) == 1:
            return parts[0]
        cu = [parts[0].cu_seqlens]
        for p in parts[1:]:
            cu.append(p.cu_seqlens[1:] + cu[-1][-1])
        return cls(torch.cat(cu), max(p.max_len for p in parts), torch.cat([p.position_ids for p in parts]))

    def to(self, device: torch.device | str) -> DocLayout:
        """This layout with its tensors on ``device`` (itself when they are there already): the CUDA kernels
        read ``cu_seqlens`` on the device, and RoPE tables are built where ``position_ids`` live."""
        device = torch.device(device)
        if self.cu_seqlens.device == device and self.position_ids.device == device:
            return self
        return DocLayout(self.cu_seqlens.to(device), self.max_len, self.position_ids.to(device))


class LocalCoreAttention:
    """Core attention on this process with the fused varlen kernel (the colocated baseline)."""

    def __init__(self, layout: DocLayout, backend: str = "auto"):
        self.layout, self.backend = layout, backend
        self._calls: dict[Mask, RectCall] = {}

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: AttentionKey = -1) -> torch.Tensor:
        lay = self.layout
        if isinstance(window, Mask):
            call = self._calls.get(window)
            if call is None:
                if lay.position_ids.numel() and int(lay.position_ids[0]):
                    raise ValueError(f"a {window.spec()!r} mask needs whole documents; this layout's first document "
                                     "continues from an earlier rank (use the data-parallel group's core attention)")
                lengths = (lay.cu_seqlens[1:] - lay.cu_seqlens[:-1]).tolist()
                call = self._calls[window] = document_call(lengths, window)
            return masked_attention(q, k, v, call, self.backend)[0]
        out, _ = varlen_attention(q, k, v, lay.cu_seqlens, lay.cu_seqlens, lay.max_len, lay.max_len, window=window,
                                  backend=self.backend)
        return out
