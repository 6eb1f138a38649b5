"""Deep Delta Learning residual update (arXiv 2601.00417), scalar value state (d_v = 1).

Pinned choices (where the paper and its reference code differ):
- ``k = h / sqrt(‖h‖² + ε_k²)``: the sublayer output gives only a direction, ε_k = 1e-5.
- ``β = 2·σ(w_βᵀ c + b_β)`` with ``c`` the sublayer's pre-norm input, computed in fp32; ``b_β`` is set
  so that β starts at ``ddl_beta_init`` (the code's default 1.0 = exact overwrite of the k-component).
- ``v = 4·σ(W_v x + b_v)``: one scalar per token from the un-normalised residual (the code's default,
  not the paper's ``W_v c``).
- Update: ``x ← x + β·k·(v − kᵀx)``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

EPS_K = 1e-5


class DeltaResidual(nn.Module):
    def __init__(self, dim: int, beta_init: float = 1.0):
        super().__init__()
        self.beta = nn.Linear(dim, 1)
        self.v = nn.Linear(dim, 1)
        with torch.no_grad():
            self.beta.weight.zero_()
            p = min(max(beta_init / 2, 1e-6), 1 - 1e-6)
            self.beta.bias.fill_(math.log(p / (1 - p)))

    def forward(self, x: torch.Tensor, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """New residual from state ``x``, sublayer output ``h`` and its normalised input ``c``."""
        k = h / torch.sqrt((h.float() ** 2).sum(-1, keepdim=True) + EPS_K**2).to(h.dtype)
        beta = 2 * torch.sigmoid(self.beta(c).float()).to(x.dtype)
        v = 4 * torch.sigmoid(self.v(x))
        return x + beta * k * (v - (k * x).sum(-1, keepdim=True))
