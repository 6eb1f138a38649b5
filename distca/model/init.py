"""The model's one initialisation, Llama's (Hugging Face's ``initializer_range``): every Linear and
Embedding weight N(0, 0.02²) and every bias 0, RMSNorm gains 1, and a Deep Delta Learning residual its
own documented init (:meth:`DeltaResidual.reset_parameters`).

Each part of :class:`~distca.model.llama.LlamaModel` that holds weights (embedding, block, head)
initialises itself with :func:`init_weights` when it is built, so the same classes built one by one as
pipeline stages (under DeepSpeed's per-layer seeds) start the same way as inside the whole model.
"""

from __future__ import annotations

from torch import nn

from distca.model.layers import RMSNorm
from distca.model.residual import DeltaResidual

# Hugging Face Llama's initializer_range. With nn.Embedding's own N(0, 1), a tied head would start the
# logits at O(sqrt(hidden)) and the loss in the hundreds.
INIT_STD = 0.02


def init_weights(module: nn.Module, std: float = INIT_STD) -> None:
    """Initialise ``module`` and all it contains the Llama way (see the module docstring)."""
    for m in module.modules():
        if isinstance(m, nn.Linear | nn.Embedding):
            nn.init.normal_(m.weight, mean=0.0, std=std)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, RMSNorm):
            nn.init.ones_(m.weight)
    for m in module.modules():  # after the loop above, which also reached the DDL modules' own Linears
        if isinstance(m, DeltaResidual):
            m.reset_parameters()
