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
        self.beta_init = beta_init
        self.beta = nn.Linear(dim, 1)
        self.v = nn.Linear(dim, 1)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """DDL's own init: ``w_β = 0`` and ``b_β = logit(β₀/2)``, so β starts at ``ddl_beta_init`` for every
        token; ``W_v``, ``b_v`` ~ U(±1/√d) (PyTorch's Linear init, std ≈ 0.58/√d, close to the DDL
        reference code's N(0, 0.5/√d)) rather than the backbone's 0.02, as DDL runs have started so far."""
        bound = 1 / math.sqrt(self.v.in_features)
        with torch.no_grad():
            self.beta.weight.zero_()
            p = min(max(self.beta_init / 2, 1e-6), 1 - 1e-6)
            self.beta.bias.fill_(math.log(p / (1 - p)))
            self.v.weight.uniform_(-bound, bound)
            self.v.bias.uniform_(-bound, bound)

    def forward(self, x: torch.Tensor, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """New residual from state ``x``, sublayer output ``h`` and its normalised input ``c``."""
        k = h / torch.sqrt((h.float() ** 2).sum(-1, keepdim=True) + EPS_K**2).to(h.dtype)
        beta = 2 * torch.sigmoid(self.beta(c).float()).to(x.dtype)
        v = 4 * torch.sigmoid(self.v(x))
        return x + beta * k * (v - (k * x).sum(-1, keepdim=True))
