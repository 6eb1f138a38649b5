"""Dense masked attention per task: slow, exact, any dtype. The ground truth for every test.

The mask is built from positions, independently of the fast kernels: query ``j`` of a task with
``q_len`` queries and ``kv_len`` keys sits at key position ``p = kv_len - q_len + j`` and sees keys
``[max(0, p - w + 1), p]`` (``w = window``; ``[0, p]`` when ``window = -1``); a non-causal call lets every
query see every key of its task. The backward is the
closed-form softmax gradient, so the servers' graph-free backward is checked against it.
"""

from __future__ import annotations

import torch

from distca.attention.backends.base import Backend, VarlenMeta, logsumexp, lse_dtype


def visible_mask(q_len: int, kv_len: int, window: int, device: torch.device | None = None,
                 causal: bool = True) -> torch.Tensor:
    """Bool ``[q_len, kv_len]``: True where query j may attend key i (bottom-right aligned; all True when
    not ``causal``)."""
    if not causal:
        return torch.ones((q_len, kv_len), dtype=torch.bool, device=device)
    qpos = torch.arange(q_len, device=device)[:, None] + (kv_len - q_len)
    kpos = torch.arange(kv_len, device=device)[None, :]
    mask = kpos <= qpos
    if window > 0:
        mask &= kpos > qpos - window
    return mask


def _heads_first(x: torch.Tensor, groups: int, ct: torch.dtype) -> torch.Tensor:
    """``[S, H, D]`` → ``[H·groups, S, D]`` in compute dtype (GQA: kv head h serves q heads h·g…)."""
    x = x.to(ct).transpose(0, 1)
    return x.repeat_interleave(groups, dim=0) if groups > 1 else x


class ReferenceBackend(Backend):
    name = "reference"

    def unavailable_reason(self, device: torch.device, dtype: torch.dtype) -> str | None:
        return None

    def _probs(self, qh, kh, mask, scale):
        s = torch.matmul(qh, kh.transpose(-1, -2)) * scale
        s = s.masked_fill(~mask, float("-inf"))
        lse = logsumexp(s, dim=-1)  # [H, q]
        safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
        p = torch.exp(s - safe[..., None]).masked_fill(~mask, 0.0)
        return p, lse

    def forward(self, q, k, v, meta: VarlenMeta):
        groups = q.shape[1] // k.shape[1]
        ct = lse_dtype(q.dtype)  # computes in the dtype of its lse (fp32, fp64 for fp64 inputs)
        out = torch.zeros_like(q)
        lse = torch.full(q.shape[:2], float("-inf"), dtype=lse_dtype(q.dtype), device=q.device)
        for q0, q1, k0, k1 in meta.spans():
            if q1 == q0 or k1 == k0:
                continue
            qh, kh, vh = (_heads_first(q[q0:q1], 1, ct), _heads_first(k[k0:k1], groups, ct),
                          _heads_first(v[k0:k1], groups, ct))
            mask = visible_mask(q1 - q0, k1 - k0, meta.window, q.device, meta.causal)
            p, l = self._probs(qh, kh, mask, meta.softmax_scale)
            out[q0:q1] = torch.matmul(p, vh).transpose(0, 1).to(q.dtype)
            lse[q0:q1] = l.transpose(0, 1).to(lse.dtype)
        return out, lse

    def backward(self, dout, q, k, v, out, lse, meta: VarlenMeta):
        hq, hkv = q.shape[1], k.shape[1]
        groups = hq // hkv
        ct = lse_dtype(q.dtype)  # computes in the dtype of its lse (fp32, fp64 for fp64 inputs)
        dq = torch.zeros_like(q)
        dk = torch.zeros_like(k)
        dv = torch.zeros_like(v)
        for q0, q1, k0, k1 in meta.spans():
            if q1 == q0 or k1 == k0:
                continue
            qh, kh, vh = (_heads_first(q[q0:q1], 1, ct), _heads_first(k[k0:k1], groups, ct),
                          _heads_first(v[k0:k1], groups, ct))
            doh, oh = _heads_first(dout[q0:q1], 1, ct), _heads_first(out[q0:q1], 1, ct)
            mask = visible_mask(q1 - q0, k1 - k0, meta.window, q.device, meta.causal)
            # Recompute P from the saved lse (as flash backward does) rather than from scratch.
            l = lse[q0:q1].transpose(0, 1).to(ct)
            s = torch.matmul(qh, kh.transpose(-1, -2)) * meta.softmax_scale
            safe = torch.where(torch.isfinite(l), l, torch.zeros_like(l))
            p = torch.exp(s - safe[..., None]).masked_fill(~mask, 0.0)
            delta = (doh * oh).sum(-1, keepdim=True)  # D_i = rowsum(dO ∘ O)
            dvh = torch.matmul(p.transpose(-1, -2), doh)
            ds = p * (torch.matmul(doh, vh.transpose(-1, -2)) - delta)
            dqh = torch.matmul(ds, kh) * meta.softmax_scale
            dkh = torch.matmul(ds.transpose(-1, -2), qh) * meta.softmax_scale
            n = k1 - k0
            dq[q0:q1] = dqh.transpose(0, 1).to(q.dtype)
            dk[k0:k1] += dkh.view(hkv, groups, n, -1).sum(1).transpose(0, 1).to(k.dtype)
            dv[k0:k1] += dvh.view(hkv, groups, n, -1).sum(1).transpose(0, 1).to(v.dtype)
        return dq, dk, dv
