"""Model FLOPs of a training step, with core attention counted from the documents (Σ lᵢ², exact pairs).

Convention (stated with every MFU we print): a matmul of ``m×k`` by ``k×n`` is ``2mkn`` FLOPs; a
training step is 3× its forward (forward + a backward of twice the forward), for the linear layers
and for core attention alike; activation recomputation is *not* counted (model FLOPs, not hardware
FLOPs). Core attention's forward is ``4 · d_head · n_heads · pairs`` where ``pairs`` is the exact
number of attended (query, key) pairs of each document under its mask (``l(l+1)/2`` full causal, the
window's count for ShortSWA sublayers) — not the dense ``T²`` of the packed sequence.
"""

from __future__ import annotations

import time

import torch

from distca.config import ModelConfig
from distca.scheduler.work import cum_pairs


def attention_sublayers(cfg: ModelConfig) -> list[int]:
    """The window of every core-attention call of one forward pass (-1 = full causal)."""
    windows = []
    for i in range(cfg.n_layers):
        if cfg.residual == "shortswa" and cfg.shortswa_every == 1:
            windows += [cfg.shortswa_window, -1]
        elif cfg.residual == "shortswa" and i % cfg.shortswa_every == cfg.shortswa_every - 1:
            windows.append(cfg.shortswa_window)
        else:
            windows.append(-1)
    return windows


def linear_params_per_token(cfg: ModelConfig) -> int:
    """Weights every token multiplies through (projections, MLP, DDL gates, LM head; not the embedding)."""
    d, hd = cfg.hidden, cfg.head_dim
    attn = d * hd * (cfg.n_heads * 2 + cfg.n_kv_heads * 2)
    per_block = attn + 3 * d * cfg.ffn_hidden
    if cfg.residual == "shortswa" and cfg.shortswa_every == 1:
        per_block += attn
    if cfg.residual == "ddl":
        per_block += 2 * 2 * d
    return cfg.n_layers * per_block + d * cfg.vocab_size


def step_flops(cfg: ModelConfig, doc_lengths: list[int]) -> dict[str, float]:
    """Model FLOPs of one training step over documents of ``doc_lengths`` (all replicas, all micro-batches).

    Returns ``{"linear", "attention", "total"}``.
    """
    tokens = sum(doc_lengths)
    linear = 3 * 2 * linear_params_per_token(cfg) * tokens
    pairs = sum(sum(cum_pairs(n, w) for n in doc_lengths) for w in attention_sublayers(cfg))
    attention = 3 * 4 * cfg.head_dim * cfg.n_heads * pairs
    return {"linear": float(linear), "attention": float(attention), "total": float(linear + attention)}


def measure_peak_flops(dtype: torch.dtype = torch.float32, n: int = 1024, reps: int = 5) -> float:
    """This process's dense GEMM rate (FLOP/s), the best of ``reps`` — the CPU's practical peak for MFU."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def model_params(cfg: ModelConfig) -> int:
    """Parameter count of the model (embedding, blocks, norms, head unless tied)."""
    d = cfg.hidden
    norms = cfg.n_layers * 2 * d + d
    if cfg.residual == "shortswa" and cfg.shortswa_every == 1:
        norms += cfg.n_layers * d
    if cfg.residual == "ddl":
        norms += cfg.n_layers * 2 * 2  # the β and v gates' biases
    embed = 0 if cfg.tie_embeddings else cfg.vocab_size * d
    return linear_params_per_token(cfg) + embed + norms
