"""torch's own CUDA varlen flash kernel (``torch.nn.attention.varlen``), no extra package needed.

This is the GPU path on machines where flash-attn cannot be built (a PyPI-only network: flash-attn
ships as an sdist that needs nvcc and a CUDA torch). Its causal/window semantics follow flash-attn:
bottom-right aligned, ``window_size=(w - 1, 0)``.
"""

from __future__ import annotations

import torch

from distca.attention.backends.base import Backend, VarlenMeta
from distca.attention.backends.gpu_common import check_cuda, lse_to_kernel, lse_to_token_major, window_size


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
        out, lse, _ = self._ops._varlen_attn(
            q, k, v, meta.cu_seqlens_q, meta.cu_seqlens_k, meta.max_seqlen_q, meta.max_seqlen_k,
            meta.window < 0, meta.softmax_scale, list(ws), q.shape[1] != k.shape[1], None, None, None,
        )
        return out, lse_to_token_major(lse, q.shape[0], q.shape[1])

    def backward(self, dout, q, k, v, out, lse, meta: VarlenMeta):
        ws = window_size(meta)
        rng = torch.zeros((2,), dtype=torch.uint64, device=q.device)
        dq, dk, dv = self._ops._varlen_attn_backward(
            dout.contiguous(), q, k, v, out, lse_to_kernel(lse), meta.cu_seqlens_q, meta.cu_seqlens_k,
            meta.max_seqlen_q, meta.max_seqlen_k, meta.window < 0, rng, meta.softmax_scale, list(ws),
        )
        return dq, dk, dv
