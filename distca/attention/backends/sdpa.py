"""CPU backend: torch's fused flash-attention CPU kernel, one call per task piece.

torch's ``is_causal`` is top-left aligned, but a CA task needs bottom-right alignment (a suffix
shard sees its whole prefix). A full-causal task with ``e = kv_len - q_len`` extra keys is
therefore computed as two pieces that partition its keys: the prefix ``[0, e)`` that every query
sees (no mask) and the square diagonal block ``[e, kv_len)`` (top-left causal). The pieces are
merged by their log-sum-exps, and the backward runs each piece's kernel backward with the
*merged* ``out`` and ``lse`` — exact, as in ring attention. Sliding-window tasks are computed in
query blocks over their key band with an additive mask, so their cost stays ~tokens × window.
A non-causal task is a single unmasked piece.

The kernel (``aten::_scaled_dot_product_flash_attention_for_cpu`` and its backward) is the one
``F.scaled_dot_product_attention`` dispatches to on CPU; it is called directly because the public
API returns neither the log-sum-exp nor a graph-free backward.
"""

from __future__ import annotations

import torch

from distca.attention.backends.base import Backend, VarlenMeta, logsumexp, lse_dtype

_OPS = torch.ops.aten
_BAND_BLOCK = 512  # query rows per sliding-window block


class _Layout:
    """GQA without copies: the kernel's batch axis holds the ``g`` query heads that share a kv head.

    ``q [S, Hq, D]`` is viewed as ``[g, Hkv, S, D]`` (query head ``h`` = kv head ``h // g``, member
    ``h % g``) and ``k, v [S, Hkv, D]`` are *expanded* (stride 0) to the same shape.
    """

    def __init__(self, n_heads: int, n_kv_heads: int):
        self.hkv, self.g = n_kv_heads, n_heads // n_kv_heads

    def q(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.shape[0], self.hkv, self.g, x.shape[2]).permute(2, 1, 0, 3)

    def kv(self, x: torch.Tensor) -> torch.Tensor:
        return x.transpose(0, 1).unsqueeze(0).expand(self.g, -1, -1, -1)

    def lse_in(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return x.view(x.shape[0], self.hkv, self.g).permute(2, 1, 0).to(dtype).contiguous()

    @staticmethod
    def q_out(x: torch.Tensor) -> torch.Tensor:
        """Kernel ``[g, Hkv, S, D]`` → ``[S, Hq, D]``."""
        return x.permute(2, 1, 0, 3).reshape(x.shape[2], -1, x.shape[3])

    @staticmethod
    def lse_out(x: torch.Tensor) -> torch.Tensor:
        """Kernel lse ``[g, Hkv, S]`` → ``[S, Hq]``."""
        return x.permute(2, 1, 0).reshape(x.shape[2], -1)

    @staticmethod
    def kv_grad(x: torch.Tensor) -> torch.Tensor:
        """Kernel gradient ``[g, Hkv, S, D]`` → ``[S, Hkv, D]``, summing the query heads sharing a kv head."""
        return x.sum(0).transpose(0, 1)


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


def _pieces(q_len: int, kv_len: int, window: int, dtype, device, causal: bool = True
            ) -> tuple[list[list[_Piece]], bool]:
    """Groups of pieces, each group covering some query rows and merged by lse; and whether the
    groups' key ranges are disjoint (full causal, non-causal) or overlap (sliding-window bands).

    Leading query rows that see no key at all (``q_len > kv_len``, causal) belong to no group. A
    non-causal task is one unmasked piece: every query sees every key.
    """
    if not causal:
        return [[_Piece(0, q_len, 0, kv_len)]], True
    skip = max(0, q_len - kv_len)
    qe = q_len - skip
    e = kv_len - qe  # >= 0: keys before the first (non-empty) query's diagonal
    if qe == 0:
        return [], True
    if window < 0 or window >= kv_len:
        group = [_Piece(skip, q_len, e, kv_len, causal=True)]
        if e > 0:
            group.insert(0, _Piece(skip, q_len, 0, e))
        return [group], True
    groups = []
    block = max(_BAND_BLOCK, window)
    for j0 in range(0, qe, block):
        j1 = min(qe, j0 + block)
        lo, hi = max(0, e + j0 - window + 1), e + j1
        mask = _band_mask(j0, j1, e, lo, hi, window, dtype, device)
        groups.append([_Piece(skip + j0, skip + j1, lo, hi, mask=mask)])
    return groups, False


class SdpaBackend(Backend):
    name = "sdpa"

    def unavailable_reason(self, device: torch.device, dtype: torch.dtype) -> str | None:
        if device.type != "cpu":
            return f"sdpa backend runs the CPU flash kernel; tensors are on {device}"
        if not hasattr(_OPS, "_scaled_dot_product_flash_attention_for_cpu"):
            return "this torch build lacks aten::_scaled_dot_product_flash_attention_for_cpu"
        return None

    def forward(self, q, k, v, meta: VarlenMeta):
        lay = _Layout(q.shape[1], k.shape[1])
        merge = lse_dtype(q.dtype)
        out = torch.zeros_like(q)
        lse = torch.full(q.shape[:2], float("-inf"), dtype=lse_dtype(q.dtype), device=q.device)
        for q0, q1, k0, k1 in meta.spans():
            if q1 == q0 or k1 == k0:
                continue
            qt, kt, vt = lay.q(q[q0:q1]), lay.kv(k[k0:k1]), lay.kv(v[k0:k1])
            for group in _pieces(q1 - q0, k1 - k0, meta.window, q.dtype, q.device, meta.causal)[0]:
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
                    l = logsumexp(ls, dim=0)
                    w = torch.exp(ls - l)
                    o = sum(w[i][..., None] * parts[i][0].to(merge) for i in range(len(parts)))
                out[q0 + j0:q0 + j1] = lay.q_out(o).to(q.dtype)
                lse[q0 + j0:q0 + j1] = lay.lse_out(l).to(lse.dtype)
        return out, lse

    def backward(self, dout, q, k, v, out, lse, meta: VarlenMeta):
        lay = _Layout(q.shape[1], k.shape[1])
        # Overlapping pieces' gradients are summed: accumulate half precision in fp32.
        acc = torch.float32 if q.dtype in (torch.bfloat16, torch.float16) else q.dtype
        # The CPU kernel wants its lse in the dtype it produces.
        kernel_lse = lse_dtype(q.dtype)
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        for q0, q1, k0, k1 in meta.spans():
            if q1 == q0 or k1 == k0:
                continue
            qt, kt, vt = lay.q(q[q0:q1]), lay.kv(k[k0:k1]), lay.kv(v[k0:k1])
            ot, dot = lay.q(out[q0:q1]), lay.q(dout[q0:q1])
            lt = lay.lse_in(lse[q0:q1], kernel_lse)
            groups, disjoint = _pieces(q1 - q0, k1 - k0, meta.window, q.dtype, q.device, meta.causal)
            if not disjoint:
                dk_acc = torch.zeros((k1 - k0, *k.shape[1:]), dtype=acc, device=k.device)
                dv_acc = torch.zeros_like(dk_acc)
            for group in groups:
                gq_sum = None
                for p in group:
                    rows = slice(p.j0, p.j1)
                    gq, gk, gv = _OPS._scaled_dot_product_flash_attention_for_cpu_backward(
                        dot[:, :, rows], qt[:, :, rows], kt[:, :, p.lo:p.hi], vt[:, :, p.lo:p.hi],
                        ot[:, :, rows], lt[:, :, rows], 0.0, p.causal, attn_mask=p.mask,
                        scale=meta.softmax_scale,
                    )
                    gq_sum = gq.to(acc) if gq_sum is None else gq_sum + gq
                    if disjoint:  # full causal: prefix and diagonal keys do not overlap
                        dk[k0 + p.lo:k0 + p.hi] = lay.kv_grad(gk.to(acc)).to(k.dtype)
                        dv[k0 + p.lo:k0 + p.hi] = lay.kv_grad(gv.to(acc)).to(v.dtype)
                    else:
                        dk_acc[p.lo:p.hi] += lay.kv_grad(gk.to(acc))
                        dv_acc[p.lo:p.hi] += lay.kv_grad(gv.to(acc))
                j0, j1 = group[0].j0, group[0].j1
                dq[q0 + j0:q0 + j1] = lay.q_out(gq_sum).to(q.dtype)
            if not disjoint:
                dk[k0:k1] = dk_acc.to(k.dtype)
                dv[k0:k1] = dv_acc.to(v.dtype)
        return dq, dk, dv
