"""torch's own CUDA varlen flash kernel (``torch.nn.attention.varlen``), no extra package needed.

This is the GPU path on machines where flash-attn cannot be built (a PyPI-only network: flash-attn
ships as an sdist that needs nvcc and a CUDA torch). Its causal/window semantics follow flash-attn:
bottom-right aligned, ``window_size=(w - 1, 0)``; a non-causal call is ``is_causal=False`` with
``window_size=(-1, -1)`` (every key).

The kernels are private ops whose argument lists change between torch releases, so they are called by
argument name (``call_by_schema``). A release whose ``torch_attn::_varlen_attn`` takes no window runs
sliding windows through ``aten::_flash_attention_forward``/``_backward`` instead (the same flash kernel,
with ``window_size_left``/``window_size_right``); without either, a window is an error, never ignored.
"""

from __future__ import annotations

from typing import Any

import torch

from distca.attention.backends.base import Backend, VarlenMeta
from distca.attention.backends.gpu_common import (
    call_by_schema,
    check_cuda,
    lse_to_kernel,
    lse_to_token_major,
    window_size,
)
from distca.errors import BackendBrokenError, BackendUnavailableError


def _varlen_ops() -> Any:
    """``torch.ops.torch_attn`` once ``torch.nn.attention.varlen`` registered it; None when this torch has
    no such module. Any other failure to import it is a broken torch and raises."""
    try:
        import torch.nn.attention.varlen  # registers the torch_attn ops
    except ModuleNotFoundError as exc:
        if exc.name is not None and "torch.nn.attention.varlen".startswith(exc.name):
            return None
        raise BackendBrokenError(f"torch.nn.attention.varlen does not import: {exc}") from exc
    except Exception as exc:
        raise BackendBrokenError(f"torch.nn.attention.varlen does not import ({type(exc).__name__}: {exc})") from exc
    return torch.ops.torch_attn


def _takes(op: Any, name: str) -> bool:
    """Whether a torch op's schema has an argument called ``name``."""
    return any(a.name == name for a in op.default._schema.arguments)


class TorchVarlenBackend(Backend):
    name = "torch_varlen"

    def __init__(self, varlen_ops: Any = None, aten_ops: Any = None) -> None:
        """The op namespaces default to torch's (``torch_attn`` found on first use, ``aten``); tests pass
        stand-ins with other argument lists."""
        self._ops, self._aten = varlen_ops, aten_ops if aten_ops is not None else torch.ops.aten
        self._looked_up = varlen_ops is not None

    def unavailable_reason(self, device: torch.device, dtype: torch.dtype) -> str | None:
        reason = check_cuda(device, dtype)
        if reason is not None:
            return reason
        if not self._looked_up:
            self._ops, self._looked_up = _varlen_ops(), True
        if self._ops is None or not hasattr(self._ops, "_varlen_attn"):
            return f"torch {torch.__version__} has no torch.nn.attention.varlen"
        return None

    def _windowed_via_aten(self, op: Any, meta: VarlenMeta) -> bool:
        """A window that ``op`` (a ``torch_attn`` kernel) cannot express goes to the aten flash op."""
        if meta.window < 0 or _takes(op, "window_size"):
            return False
        try:
            has_aten = _takes(self._aten._flash_attention_forward, "window_size_left")
        except (AttributeError, RuntimeError):  # an op this torch lacks
            has_aten = False
        if not has_aten:
            raise BackendUnavailableError(f"torch {torch.__version__}: neither torch_attn::_varlen_attn nor "
                                          f"aten::_flash_attention_forward takes a window (window={meta.window})")
        return True

    def forward(self, q, k, v, meta: VarlenMeta):
        ws = list(window_size(meta))
        if self._windowed_via_aten(self._ops._varlen_attn, meta):
            out, lse, *_ = call_by_schema(self._aten._flash_attention_forward, {
                "query": q, "key": k, "value": v, "cum_seq_q": meta.cu_seqlens_q, "cum_seq_k": meta.cu_seqlens_k,
                "max_q": meta.max_seqlen_q, "max_k": meta.max_seqlen_k, "dropout_p": 0.0, "is_causal": False,
                "return_debug_mask": False, "scale": meta.softmax_scale, "window_size_left": ws[0],
                "window_size_right": ws[1]})
        else:
            out, lse, *_ = call_by_schema(self._ops._varlen_attn, {
                "query": q, "key": k, "value": v, "cu_seq_q": meta.cu_seqlens_q, "cu_seq_k": meta.cu_seqlens_k,
                "max_q": meta.max_seqlen_q, "max_k": meta.max_seqlen_k, "is_causal": meta.causal and meta.window < 0,
                "scale": meta.softmax_scale, "window_size": ws, "enable_gqa": q.shape[1] != k.shape[1]})
        return out, lse_to_token_major(lse, q.shape[0], q.shape[1])

    def backward(self, dout, q, k, v, out, lse, meta: VarlenMeta):
        ws = list(window_size(meta))
        rng = torch.zeros((2,), dtype=torch.uint64, device=q.device)
        if self._windowed_via_aten(self._ops._varlen_attn_backward, meta):
            # Argument names differ across releases (philox_seed/philox_offset, later rng_state/unused):
            # both are offered, the schema keeps the ones it has.
            empty = torch.empty(0, device=q.device)
            dq, dk, dv = call_by_schema(self._aten._flash_attention_backward, {
                "grad_out": dout.contiguous(), "query": q, "key": k, "value": v, "out": out,
                "logsumexp": lse_to_kernel(lse), "cum_seq_q": meta.cu_seqlens_q, "cum_seq_k": meta.cu_seqlens_k,
                "max_q": meta.max_seqlen_q, "max_k": meta.max_seqlen_k, "dropout_p": 0.0, "is_causal": False,
                "philox_seed": rng, "rng_state": rng, "philox_offset": empty, "unused": empty,
                "scale": meta.softmax_scale, "window_size_left": ws[0], "window_size_right": ws[1]})
        else:
            dq, dk, dv = call_by_schema(self._ops._varlen_attn_backward, {
                "grad_out": dout.contiguous(), "query": q, "key": k, "value": v, "out": out,
                "lse": lse_to_kernel(lse), "cu_seq_q": meta.cu_seqlens_q, "cu_seq_k": meta.cu_seqlens_k,
                "max_q": meta.max_seqlen_q, "max_k": meta.max_seqlen_k, "is_causal": meta.causal and meta.window < 0,
                "rng_state": rng, "scale": meta.softmax_scale, "window_size": ws})
        return dq, dk, dv
