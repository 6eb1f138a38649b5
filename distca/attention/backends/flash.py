"""flash-attn 2 varlen kernels (optional; install the ``gpu`` extra on a CUDA machine).

flash-attn's causal mask is bottom-right aligned and ``window_size=(w - 1, 0)`` is exactly
DistCA's ``w`` keys including self; a non-causal call is ``causal=False`` with ``window_size=(-1, -1)``.
The explicit backward calls flash-attn's internal varlen backward, whose positional signature changed
across 2.x releases, so arguments are passed by name.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect

import torch

from distca.attention.backends.base import Backend, VarlenMeta
from distca.attention.backends.gpu_common import check_cuda, lse_to_kernel, lse_to_token_major, window_size
from distca.errors import BackendBrokenError


def _interface():
    """flash-attn's interface module, or None when flash-attn is not installed.

    An installed flash-attn that fails to import (a CUDA extension built for another torch or CUDA) raises
    :class:`BackendBrokenError`: a broken GPU build must fail loudly, not pass for a missing package."""
    if importlib.util.find_spec("flash_attn") is None:
        return None
    try:
        return importlib.import_module("flash_attn.flash_attn_interface")
    except Exception as exc:
        raise BackendBrokenError(f"flash_attn is installed but does not import ({type(exc).__name__}: {exc}); "
                                 "rebuild it for this torch and CUDA, or uninstall it") from exc


class FlashBackend(Backend):
    name = "flash"

    def __init__(self) -> None:
        self._fa = None  # imported on the first check that finds CUDA (its extension needs the CUDA runtime)

    def unavailable_reason(self, device: torch.device, dtype: torch.dtype) -> str | None:
        reason = check_cuda(device, dtype)
        if reason is not None:
            return reason
        if self._fa is None:
            self._fa = _interface()
        if self._fa is None:
            return "flash_attn is not installed (install the 'gpu' extra on a CUDA machine)"
        return None

    def forward(self, q, k, v, meta: VarlenMeta):
        left, right = window_size(meta)
        out, lse, *_ = self._fa._flash_attn_varlen_forward(
            **self._kwargs(
                self._fa._flash_attn_varlen_forward,
                q=q, k=k, v=v, cu_seqlens_q=meta.cu_seqlens_q, cu_seqlens_k=meta.cu_seqlens_k,
                max_seqlen_q=meta.max_seqlen_q, max_seqlen_k=meta.max_seqlen_k, dropout_p=0.0,
                softmax_scale=meta.softmax_scale, causal=meta.causal, window_size_left=left,
                window_size_right=right, window_size=(left, right), softcap=0.0, alibi_slopes=None,
                return_softmax=False, block_table=None,
            )
        )
        return out, lse_to_token_major(lse, q.shape[0], q.shape[1])

    def backward(self, dout, q, k, v, out, lse, meta: VarlenMeta):
        left, right = window_size(meta)
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        self._fa._flash_attn_varlen_backward(
            **self._kwargs(
                self._fa._flash_attn_varlen_backward,
                dout=dout.contiguous(), q=q, k=k, v=v, out=out, softmax_lse=lse_to_kernel(lse), dq=dq, dk=dk,
                dv=dv, cu_seqlens_q=meta.cu_seqlens_q, cu_seqlens_k=meta.cu_seqlens_k,
                max_seqlen_q=meta.max_seqlen_q, max_seqlen_k=meta.max_seqlen_k, dropout_p=0.0,
                softmax_scale=meta.softmax_scale, causal=meta.causal, window_size_left=left,
                window_size_right=right, window_size=(left, right), softcap=0.0, alibi_slopes=None,
                deterministic=False, rng_state=None,
            )
        )
        return dq, dk, dv

    @staticmethod
    def _kwargs(fn, **candidates):
        params = inspect.signature(fn).parameters
        missing = [n for n, p in params.items() if p.default is inspect.Parameter.empty and n not in candidates]
        if missing:
            raise RuntimeError(f"unsupported flash_attn version: {fn.__name__} needs {missing}")
        return {n: v for n, v in candidates.items() if n in params}
