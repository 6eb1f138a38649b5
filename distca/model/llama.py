"""Llama-style decoder over packed documents, with the residual variants of the config."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from distca.config import ModelConfig
from distca.model.attention import SelfAttention
from distca.model.core import CoreAttention, DocLayout, LayerSteps, run_steps
from distca.model.init import init_weights
from distca.model.layers import RMSNorm, SwiGLU, rope_cos_sin
from distca.model.residual import DeltaResidual


class Block(nn.Module):
    """One decoder block.

    - ``standard``: ``h = x + Attn(Norm x)``; ``out = h + MLP(Norm h)``.
    - ``shortswa`` with ``shortswa_every == 1`` (Transformer², RSD Algorithm 1): a separate pre-norm
      sliding-window attention sublayer first, ``s = x + SWA(Norm x; w)``, then full attention and the
      MLP, no gating; the SWA sublayer has its own projections. With ``shortswa_every = k > 1`` the
      interleaved form: every k-th layer's attention is windowed instead (no extra sublayer).
    - ``ddl``: each sublayer's residual add becomes a Deep Delta Learning update.
    """

    def __init__(self, cfg: ModelConfig, index: int):
        super().__init__()
        self.cfg = cfg
        *swa_window, window = cfg.block_windows()[index]  # a ShortSWA sublayer's window first, if any
        self.swa = None
        if swa_window:
            self.swa_norm = RMSNorm(cfg.hidden, cfg.norm_eps)
            self.swa = SelfAttention(cfg, swa_window[0])
        self.attn_norm = RMSNorm(cfg.hidden, cfg.norm_eps)
        self.attn = SelfAttention(cfg, window)
        self.mlp_norm = RMSNorm(cfg.hidden, cfg.norm_eps)
        self.mlp = SwiGLU(cfg.hidden, cfg.ffn_hidden, cfg.mlp_bias)
        if cfg.residual == "ddl":
            self.attn_delta = DeltaResidual(cfg.hidden, cfg.ddl_beta_init)
            self.mlp_delta = DeltaResidual(cfg.hidden, cfg.ddl_beta_init)
        init_weights(self)

    def forward(self, x: torch.Tensor, core: CoreAttention, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return run_steps(self.steps(x, cos, sin), core)

    def steps(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> LayerSteps:
        """The block as steps: it yields each core-attention call (the ShortSWA sublayer's first, if any) and is
        sent its output (:func:`~distca.model.core.run_steps`). Everything else is row-wise, so a runner may
        run the block over subsets of its rows, each calling core attention on its own."""
        if self.swa is not None:
            x = x + (yield from self.swa.steps(self.swa_norm(x), cos, sin))
        c = self.attn_norm(x)
        h = yield from self.attn.steps(c, cos, sin)
        x = self.attn_delta(x, h, c) if self.cfg.residual == "ddl" else x + h
        c = self.mlp_norm(x)
        h = self.mlp(c)
        return self.mlp_delta(x, h, c) if self.cfg.residual == "ddl" else x + h


class TokenEmbedding(nn.Embedding):
    """Token ids -> hidden vectors, initialised N(0, 0.02²) (:func:`~distca.model.init.init_weights`)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg.vocab_size, cfg.hidden)

    def reset_parameters(self) -> None:
        init_weights(self)


class LMHead(nn.Linear):
    """Hidden vectors -> next-token logits (an untied head), initialised N(0, 0.02²)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg.hidden, cfg.vocab_size, bias=False)

    def reset_parameters(self) -> None:
        init_weights(self)


class LlamaModel(nn.Module):
    """Embedding, blocks, final norm, LM head (tied to the embedding or not).

    Each part initialises itself (:mod:`distca.model.init`), so the pipeline stages, built from these same
    classes one layer at a time, start as this model's parts do.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = TokenEmbedding(cfg)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.hidden, cfg.norm_eps)
        self.head = LMHead(cfg)
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight

    def forward(self, tokens: torch.Tensor, layout: DocLayout, core: CoreAttention) -> torch.Tensor:
        """Logits ``[T, vocab]`` for packed ``tokens [T]``."""
        x = self.embed(tokens)
        cos, sin = rope_cos_sin(layout.position_ids.to(x.device), self.cfg.head_dim, self.cfg.rope_theta, x.dtype,
                                self.cfg.rope_scaling)
        for block in self.blocks:
            x = block(x, core, cos, sin)
        return self.head(self.norm(x))

    @staticmethod
    def config_from_hf(folder: str | Path, strict: bool = True, **overrides) -> ModelConfig:
        """A :class:`ModelConfig` from a local Hugging Face ``config.json`` (``llama``, ``mistral`` or ``qwen2``;
        transformers 4.x or 5.x layout). A field that changes the math and is not implemented is a
        :class:`ValueError` naming it; with ``strict=False`` a warning saying what differs
        (:mod:`distca.model.hf_config`). ``overrides`` replace fields of the result."""
        from distca.model.hf_config import read_hf_config

        return read_hf_config(folder, strict, **overrides)


def next_token_labels(tokens: torch.Tensor, layout: DocLayout) -> torch.Tensor:
    """Next-token targets within each document; the last token of a document gets -100 (ignored)."""
    labels = torch.full_like(tokens, -100)
    labels[:-1] = tokens[1:]
    ends = layout.cu_seqlens[1:].long() - 1
    labels[ends] = -100
    return labels
