"""Helpers shared by the CUDA varlen backends (flash-attn and torch's own varlen kernel)."""

from __future__ import annotations

import torch

from distca.attention.backends.base import VarlenMeta


def window_size(meta: VarlenMeta) -> tuple[int, int]:
    """flash-attn's ``(left, right)``: ``w`` keys including self is ``(w - 1, 0)``; full causal ``(-1, 0)``;
    non-causal (every key) ``(-1, -1)``."""
    if not meta.causal:
        return (-1, -1)
    return (-1, 0) if meta.window < 0 else (meta.window - 1, 0)


def lse_to_token_major(lse: torch.Tensor, total_q: int, n_heads: int) -> torch.Tensor:
    """Kernel lse (flash layout ``[Hq, total_q]``) → DistCA's ``[total_q, Hq]`` fp32.

    flash-attn writes ``+inf`` for a row that sees no key; DistCA's convention is ``-inf`` (the neutral
    element of a log-sum-exp merge, so such a row adds nothing when partial results are combined). The
    kernels' backward treats both alike (a row whose max is infinite gets probability 0)."""
    if lse.dim() == 3:  # some builds return [1, Hq, total_q]
        lse = lse.squeeze(0)
    if tuple(lse.shape) == (n_heads, total_q):
        lse = lse.transpose(0, 1)
    elif tuple(lse.shape) != (total_q, n_heads):
        raise RuntimeError(f"kernel returned lse of shape {tuple(lse.shape)}; expected [{n_heads}, {total_q}]")
    lse = lse.float()
    return lse.masked_fill(lse == float("inf"), float("-inf"))


def lse_to_kernel(lse: torch.Tensor) -> torch.Tensor:
    """DistCA's ``[total_q, Hq]`` → the kernels' contiguous ``[Hq, total_q]`` fp32."""
    return lse.transpose(0, 1).float().contiguous()


def check_cuda(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why a CUDA flash kernel cannot run these tensors, or None."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return f"needs a CUDA device; tensors are on {device}"
    if dtype not in (torch.float16, torch.bfloat16):
        return f"flash kernels take fp16/bf16, got {dtype}"
    return None


def call_by_schema(op, values: dict):
    """Call a torch op with the values its schema names: positionally while every argument so far is
    given, by keyword after the first one left at its default; names the schema lacks are dropped.
    Private kernels change their argument lists between torch releases (``torch_attn::_varlen_attn``
    has 14 arguments in 2.13 and 10 in 2.11, with the same names); calling by name works for both."""
    args, kwargs, positional = [], {}, True
    for a in op.default._schema.arguments:
        if a.name not in values:
            positional = False
            continue
        if a.kwarg_only or not positional:
            kwargs[a.name] = values[a.name]
        else:
            args.append(values[a.name])
    return op(*args, **kwargs)
