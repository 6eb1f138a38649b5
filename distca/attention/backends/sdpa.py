"""CPU backend: torch's fused flash-attention CPU kernel, one call per task piece.

torch's ``is_causal`` is top-left aligned, but a CA task needs bottom-right alignment (a suffix
shard sees its whole prefix). A full-causal task with ``e = kv_len - q_len`` extra keys is
therefore computed as two pieces that partition its keys: the prefix ``[0, e)`` that every query
sees (no mask) and the square diagonal block ``[e, kv_len)`` (top-left causal). The pieces are
merged by their log-sum-exps, and the backward runs each piece's kernel backward with the
*merged* ``out`` and ``lse`` — exact, as in ring attention. Sliding-window tasks are computed in
query blocks over their key band with an additive mask, so their cost stays ~tokens × window.

The kernel (``aten::_scaled_dot_product_flash_attention_for_cpu`` and its backward) is the one
``F.scaled_dot_product_attention`` dispatches to on CPU; it is called directly because the public
API returns neither the log-sum-exp nor a graph-free backward.
"""

from __future__ import annotations

import torch

from distca.attention.backends.base import Backend, VarlenMeta, lse_dtype

_OPS = torch.ops.aten
_BAND_BLOCK = 512  # query rows per sliding-window block


def _bhsd(x: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """``[S, H, D]`` → ``[1, H·groups, S, D]`` (GQA heads expanded for the kernel)."""
    x = x.transpose(0, 1)
    if groups > 1:
        x = x.repeat_interleave(groups, dim=0)
    return x.unsqueeze(0)


def _sum_groups(g: torch.Tensor, groups: int) -> torch.Tensor:
    """Kernel gradient ``[1, Hq, S, D]`` → ``[S, Hkv, D]``, summing the GQA copies."""
    g = g.squeeze(0)
    if groups > 1:
        g = g.view(g.shape[0] // groups, groups, *g.shape[1:]).sum(1)
    return g.transpose(0, 1)


def _band_mask(j0: int, j1: int, e: int, lo: int, hi: int, window: int, dtype, device) -> torch.Tensor:
    """Additive mask for task queries ``[j0, j1)`` over task keys ``[lo, hi)`` (bottom-right, window)."""
    qpos = torch.arange(j0, j1, device=device)[:, None] + e
    kpos = torch.arange(lo, hi, device=device)[None, :]
    ok = (kpos <= qpos) & (kpos > qpos - window)
    return torch.zeros(ok.shape, dtype=dtype, device=device).masked_fill_(~ok, float("-inf"))


class _Piece:
    """One kernel call: task query rows ``[j0, j1)`` × task key rows ``[lo, hi)``."""

    __slots__ = ("causal", "hi", "j0", "j1", "lo", "mask")

    def __init__(self, j0, j1, lo, hi, causal=False, mask=None):
        self.j0, self.j1, self.lo, self.hi, self.causal, self.mask = j0, j1, lo, hi, causal, mask


def _pieces(q_len: int, kv_len: int, window: int, dtype, device) -> tuple[list[list[_Piece]], int]:
    """Groups of pieces; each group covers a set of query rows and is merged by lse.

    Returns the groups and the number of leading query rows that see no key at all.
    """
    skip = max(0, q_len - kv_len)
    qe = q_len - skip
    e = kv_len - qe  # >= 0: keys before the first (non-empty) query's diagonal
    if qe == 0:
        return [], skip
    if window < 0 or window >= kv_len:
        group = [_Piece(skip, q_len, e, kv_len, causal=True)]
        if e > 0:
            group.insert(0, _Piece(skip, q_len, 0, e))
        return [group], skip
    groups = []
    block = max(_BAND_BLOCK, window)
    for j0 in range(0, qe, block):
        j1 = min(qe, j0 + block)
        lo, hi = max(0, e + j0 - window + 1), e + j1
        mask = _band_mask(j0, j1, e, lo, hi, window, dtype, device)
        groups.append([_Piece(skip + j0, skip + j1, lo, hi, mask=mask)])
    return groups, skip


class SdpaBackend(Backend):
    name = "sdpa"

    def unavailable_reason(self, device: torch.device, dtype: torch.dtype) -> str | None:
        if device.type != "cpu":
            return f"sdpa backend runs the CPU flash kernel; tensors are on {device}"
        if not hasattr(_OPS, "_scaled_dot_product_flash_attention_for_cpu"):
            return "this torch build lacks aten::_scaled_dot_product_flash_attention_for_cpu"
        return None

    def forward(self, q, k, v, meta: VarlenMeta):
        groups = q.shape[1] // k.shape[1]
        merge = lse_dtype(q.dtype)
        out = torch.zeros_like(q)
        lse = torch.full(q.shape[:2], float("-inf"), dtype=lse_dtype(q.dtype), device=q.device)
        for q0, q1, k0, k1 in meta.spans():
            if q1 == q0 or k1 == k0:
                continue
            qt, kt, vt = _bhsd(q[q0:q1]), _bhsd(k[k0:k1], groups), _bhsd(v[k0:k1], groups)
            piece_groups, _ = _pieces(q1 - q0, k1 - k0, meta.window, q.dtype, q.device)
            for group in piece_groups:
                parts = [
                    _OPS._scaled_dot_product_flash_attention_for_cpu(
                        qt[:, :, p.j0:p.j1], kt[:, :, p.lo:p.hi], vt[:, :, p.lo:p.hi], 0.0, p.causal,
                        attn_mask=p.mask, scale=meta.softmax_scale,
                    )
                    for p in group
                ]
                j0, j1 = group[0].j0, group[0].j1
                if len(parts) == 1:
                    o, l = parts[0]
                else:
                    # Merge in at least fp32 (fp64 stays fp64) before rounding to the input dtype.
                    ls = torch.stack([pl.to(merge) for _, pl in parts])
                    l = torch.logsumexp(ls, dim=0)
                    w = torch.exp(ls - l)
                    o = sum(w[i][..., None] * parts[i][0].to(merge) for i in range(len(parts)))
                out[q0 + j0:q0 + j1] = o.squeeze(0).transpose(0, 1).to(q.dtype)
                lse[q0 + j0:q0 + j1] = l.squeeze(0).transpose(0, 1).to(lse.dtype)
        return out, lse

    def backward(self, dout, q, k, v, out, lse, meta: VarlenMeta):
        groups = q.shape[1] // k.shape[1]
        # Pieces' gradients are summed: accumulate half precision in fp32, round once at the end.
        acc = torch.float32 if q.dtype in (torch.bfloat16, torch.float16) else q.dtype
        dq = torch.zeros(q.shape, dtype=acc, device=q.device)
        dk = torch.zeros(k.shape, dtype=acc, device=k.device)
        dv = torch.zeros(v.shape, dtype=acc, device=v.device)
        # The CPU kernel wants its lse in the dtype it produces (fp32, or fp64 for fp64 inputs).
        kernel_lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
        for q0, q1, k0, k1 in meta.spans():
            if q1 == q0 or k1 == k0:
                continue
            qt, kt, vt = _bhsd(q[q0:q1]), _bhsd(k[k0:k1], groups), _bhsd(v[k0:k1], groups)
            ot, dot = _bhsd(out[q0:q1]), _bhsd(dout[q0:q1])
            lt = lse[q0:q1].transpose(0, 1).unsqueeze(0).to(kernel_lse_dtype)
            dkt = torch.zeros(kt.shape, dtype=acc, device=k.device)
            dvt = torch.zeros(vt.shape, dtype=acc, device=v.device)
            piece_groups, _ = _pieces(q1 - q0, k1 - k0, meta.window, q.dtype, q.device)
            for group in piece_groups:
                for p in group:
                    rows = slice(p.j0, p.j1)
                    gq, gk, gv = _OPS._scaled_dot_product_flash_attention_for_cpu_backward(
                        dot[:, :, rows], qt[:, :, rows], kt[:, :, p.lo:p.hi], vt[:, :, p.lo:p.hi],
                        ot[:, :, rows], lt[:, :, rows].contiguous(), 0.0, p.causal, attn_mask=p.mask,
                        scale=meta.softmax_scale,
                    )
                    dq[q0 + p.j0:q0 + p.j1] += gq.squeeze(0).transpose(0, 1)
                    dkt[:, :, p.lo:p.hi] += gk
                    dvt[:, :, p.lo:p.hi] += gv
            dk[k0:k1] = _sum_groups(dkt, groups)
            dv[k0:k1] = _sum_groups(dvt, groups)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
