"""Self-attention sublayer: projections and RoPE here; core attention is the injected callable."""

from __future__ import annotations

import torch
from torch import nn

from distca.config import ModelConfig
from distca.model.core import AttentionCall, CoreAttention, LayerSteps, run_steps
from distca.model.layers import apply_rope


class SelfAttention(nn.Module):
    """GQA attention with its own q/k/v/o projections (biases as the config says); ``window=-1`` is full causal."""

    def __init__(self, cfg: ModelConfig, window: int = -1):
        super().__init__()
        self.h, self.hkv, self.d, self.window = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, window
        self.q = nn.Linear(cfg.hidden, self.h * self.d, bias=cfg.qkv_bias)
        self.k = nn.Linear(cfg.hidden, self.hkv * self.d, bias=cfg.qkv_bias)
        self.v = nn.Linear(cfg.hidden, self.hkv * self.d, bias=cfg.qkv_bias)
        self.o = nn.Linear(self.h * self.d, cfg.hidden, bias=cfg.o_bias)

    def forward(self, x: torch.Tensor, core: CoreAttention, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return run_steps(self.steps(x, cos, sin), core)

    def steps(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> LayerSteps:
        """The sublayer as steps (:func:`~distca.model.core.run_steps`): projections and RoPE, one core-attention
        call, the output projection. Every op but the call is row-wise, so any subset of rows runs alone."""
        t = x.shape[0]
        q = apply_rope(self.q(x).view(t, self.h, self.d), cos, sin)
        k = apply_rope(self.k(x).view(t, self.hkv, self.d), cos, sin)
        v = self.v(x).view(t, self.hkv, self.d)
        out = yield AttentionCall(q.contiguous(), k.contiguous(), v.contiguous(), self.window)
        return self.o(out.reshape(t, self.h * self.d))
