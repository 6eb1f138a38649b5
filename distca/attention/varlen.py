"""Public core-attention entry points with flash-attn varlen semantics.

``varlen_attention`` is differentiable through autograd; ``forward`` and ``backward`` are the same
math without a graph, for attention servers that receive ``(q, k, v, out, lse, dout)`` over the
wire and must return ``(dq, dk, dv)``.
"""

from __future__ import annotations

import itertools
import math

import torch

from distca.attention.backends import resolve_backend
from distca.attention.backends.base import VarlenMeta
from distca.errors import AttentionInputError

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _host_offsets(cu: torch.Tensor, name: str, total: int) -> tuple[int, ...]:
    if not isinstance(cu, torch.Tensor) or cu.dim() != 1 or cu.dtype != torch.int32:
        got = f"{cu.dtype} {tuple(cu.shape)}" if isinstance(cu, torch.Tensor) else type(cu).__name__
        raise AttentionInputError(f"{name} must be a 1-D int32 tensor, got {got}")
    if cu.numel() < 1:
        raise AttentionInputError(f"{name} must have at least one entry (0)")
    host = tuple(int(x) for x in cu.tolist())
    if host[0] != 0:
        raise AttentionInputError(f"{name} must start at 0, got {host[0]}")
    if any(b < a for a, b in itertools.pairwise(host)):
        raise AttentionInputError(f"{name} must be non-decreasing, got {list(host)[:16]}...")
    if host[-1] != total:
        raise AttentionInputError(f"{name} ends at {host[-1]} but the tensor has {total} rows")
    return host


def make_meta(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int, max_seqlen_k: int, window: int = -1, softmax_scale: float | None = None, *,
    causal: bool = True,
) -> VarlenMeta:
    """Validate inputs of a varlen call and bundle its metadata; errors name what is wrong."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 3:
            raise AttentionInputError(f"{name} must be [tokens, heads, head_dim], got shape {tuple(t.shape)}")
        if t.dtype not in _FLOAT_DTYPES:
            raise AttentionInputError(f"{name} must be a floating tensor, got {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise AttentionInputError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise AttentionInputError(f"q, k, v devices differ: {q.device}, {k.device}, {v.device}")
    if k.shape != v.shape:
        raise AttentionInputError(f"k and v shapes differ: {tuple(k.shape)} vs {tuple(v.shape)}")
    if q.shape[2] != k.shape[2]:
        raise AttentionInputError(f"head_dim of q ({q.shape[2]}) and k ({k.shape[2]}) differ")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1]:
        raise AttentionInputError(f"query heads ({q.shape[1]}) must be a multiple of kv heads ({k.shape[1]})")
    if window != -1 and window < 1:
        raise AttentionInputError(f"window must be -1 (full causal) or >= 1 keys, got {window}")
    if not isinstance(causal, bool):
        raise AttentionInputError(f"causal must be a bool, got {type(causal).__name__}")
    if not causal and window != -1:
        raise AttentionInputError(f"a window ({window}) needs causal attention; causal=False sees every key, "
                                  "so its window must be -1")
    cq = _host_offsets(cu_seqlens_q, "cu_seqlens_q", q.shape[0])
    ck = _host_offsets(cu_seqlens_k, "cu_seqlens_k", k.shape[0])
    if len(cq) != len(ck):
        raise AttentionInputError(f"cu_seqlens_q has {len(cq) - 1} sequences but cu_seqlens_k has {len(ck) - 1}")
    longest_q = max((b - a for a, b in itertools.pairwise(cq)), default=0)
    longest_k = max((b - a for a, b in itertools.pairwise(ck)), default=0)
    if max_seqlen_q < longest_q or max_seqlen_k < longest_k:
        raise AttentionInputError(
            f"max_seqlen_q/k ({max_seqlen_q}, {max_seqlen_k}) below the longest sequences ({longest_q}, {longest_k})"
        )
    scale = 1.0 / math.sqrt(q.shape[2]) if softmax_scale is None else float(softmax_scale)
    return VarlenMeta(cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q), int(max_seqlen_k), int(window), scale, cq, ck,
                      causal)


def forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int, max_seqlen_k: int, window: int = -1, softmax_scale: float | None = None,
    backend: str = "auto", *, causal: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Graph-free forward: ``(out [total_q, Hq, D], lse [total_q, Hq])``, the lse in ``lse_dtype(q.dtype)``."""
    meta = make_meta(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, window, softmax_scale,
                     causal=causal)
    with torch.no_grad():
        return resolve_backend(backend, q.device, q.dtype).forward(q, k, v, meta)


def backward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, dout: torch.Tensor,
    cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int,
    window: int = -1, softmax_scale: float | None = None, backend: str = "auto", *, causal: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Graph-free backward from the forward's ``out`` and ``lse``: ``(dq, dk, dv)``.

    ``out`` and ``lse`` may be those of a larger softmax this call's pairs are part of (other key blocks
    merged by lse): the gradients are then this call's share of that softmax's, as in ring attention.
    """
    meta = make_meta(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, window, softmax_scale,
                     causal=causal)
    if out.shape != q.shape or dout.shape != q.shape:
        raise AttentionInputError(
            f"out {tuple(out.shape)} and dout {tuple(dout.shape)} must match q {tuple(q.shape)}"
        )
    if lse.shape != q.shape[:2]:
        raise AttentionInputError(f"lse must be [total_q, Hq] = {tuple(q.shape[:2])}, got {tuple(lse.shape)}")
    with torch.no_grad():
        return resolve_backend(backend, q.device, q.dtype).backward(dout.to(q.dtype), q, k, v, out, lse, meta)


class _VarlenAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, meta: VarlenMeta, backend_name: str):
        backend = resolve_backend(backend_name, q.device, q.dtype)
        out, lse = backend.forward(q, k, v, meta)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.meta, ctx.backend = meta, backend
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = ctx.backend.backward(dout.to(q.dtype), q, k, v, out, lse, ctx.meta)
        return dq, dk, dv, None, None


def varlen_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int, max_seqlen_k: int, window: int = -1, softmax_scale: float | None = None,
    backend: str = "auto", *, causal: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal (or, with ``causal=False``, unmasked) core attention over many (query, key) sequences in one
    call, differentiable.

    ``q [total_q, Hq, D]``, ``k, v [total_k, Hkv, D]`` (``Hq`` a multiple of ``Hkv``); sequence ``i``
    is rows ``cu_seqlens_q[i]:cu_seqlens_q[i+1]`` of q against ``cu_seqlens_k[i]:cu_seqlens_k[i+1]``
    of k/v. The causal mask is bottom-right aligned; ``window=w`` lets each query see at most ``w``
    keys including itself (flash-attn ``window_size=(w-1, 0)``). ``causal=False`` lets every query see every
    key of its sequence (the window must then be -1). Returns ``(out, lse)`` with ``lse [total_q, Hq]`` the
    natural-log log-sum-exp in ``lse_dtype(q.dtype)`` (not differentiable).
    """
    meta = make_meta(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, window, softmax_scale,
                     causal=causal)
    return _VarlenAttention.apply(q, k, v, meta, backend)
