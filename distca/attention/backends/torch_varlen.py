"""torch's own CUDA varlen flash kernel (``torch.nn.attention.varlen``), no extra package needed.

This is the GPU path on machines where flash-attn cannot be built (a PyPI-only network: flash-attn
ships as an sdist that needs nvcc and a CUDA torch). Its causal/window semantics follow flash-attn:
bottom-right aligned, ``window_size=(w - 1, 0)``.
"""

from __future__ import annotations

import torch

from distca.attention.backends.base import Backend, VarlenMeta
from distca.attention.backends.gpu_common import (
    call_by_schema,
    check_cuda,
    lse_to_kernel,
    lse_to_token_major,
    window_size,
)


def _ops():
    try:
        import torch.nn.attention.varlen

        return torch.ops.torch_attn
    except Exception:
        return None


class TorchVarlenBackend(Backend):
    name = "torch_varlen"

    def __init__(self) -> None:
        self._ops = _ops()

    def unavailable_reason(self, device: torch.device, dtype: torch.dtype) -> str | None:
        if self._ops is None or not hasattr(self._ops, "_varlen_attn"):
            return "this torch build has no torch.nn.attention.varlen"
        return check_cuda(device, dtype)

    def forward(self, q, k, v, meta: VarlenMeta):
        ws = window_size(meta)
        out, lse, _ = call_by_schema(self._ops._varlen_attn, {
            "query": q, "key": k, "value": v, "cu_seq_q": meta.cu_seqlens_q, "cu_seq_k": meta.cu_seqlens_k,
            "max_q": meta.max_seqlen_q, "max_k": meta.max_seqlen_k, "is_causal": meta.window < 0,
            "scale": meta.softmax_scale, "window_size": list(ws), "enable_gqa": q.shape[1] != k.shape[1]})
        return out, lse_to_token_major(lse, q.shape[0], q.shape[1])

    def backward(self, dout, q, k, v, out, lse, meta: VarlenMeta):
        ws = window_size(meta)
        rng = torch.zeros((2,), dtype=torch.uint64, device=q.device)
        dq, dk, dv = call_by_schema(self._ops._varlen_attn_backward, {
            "grad_out": dout.contiguous(), "query": q, "key": k, "value": v, "out": out, "lse": lse_to_kernel(lse),
            "cu_seq_q": meta.cu_seqlens_q, "cu_seq_k": meta.cu_seqlens_k, "max_q": meta.max_seqlen_q,
            "max_k": meta.max_seqlen_k, "is_causal": meta.window < 0, "rng_state": rng,
            "scale": meta.softmax_scale, "window_size": list(ws)})
        return dq, dk, dv
