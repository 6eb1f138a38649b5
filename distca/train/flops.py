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

from distca.config import ModelConfig, block_linear_params  # the one parameter counter lives with the shape
from distca.masks import key_mask


def linear_params_per_token(cfg: ModelConfig) -> int:
    """Weights every token multiplies through (projections, MLP, DDL gates, LM head; not the embedding)."""
    return cfg.n_layers * block_linear_params(cfg)[1] + cfg.hidden * cfg.vocab_size


def step_flops(cfg: ModelConfig, doc_lengths: list[int]) -> dict[str, float]:
    """Model FLOPs of one training step over documents of ``doc_lengths`` (all replicas, all micro-batches).

    Returns ``{"linear", "attention", "total"}``.
    """
    tokens = sum(doc_lengths)
    linear = 3 * 2 * linear_params_per_token(cfg) * tokens
    pairs = sum(sum(key_mask(w).cum(n, n) for n in doc_lengths) for w in cfg.attention_windows())
    attention = 3 * 4 * cfg.head_dim * cfg.n_heads * pairs
    return {"linear": float(linear), "attention": float(attention), "total": float(linear + attention)}


def measure_peak_flops(dtype: torch.dtype = torch.float32, n: int | None = None, reps: int = 5,
                       device: torch.device | str = "cpu") -> float:
    """This process's dense ``dtype`` GEMM rate (FLOP/s) on ``device``, the best of ``reps`` — the practical
    peak for MFU where ``train.peak_tflops`` is not given. ``n``: the matrices' size (default 1024 on the CPU,
    8192 on a GPU, large enough to keep it busy); a GPU is synchronised around every product."""
    device = torch.device(device)
    gpu = device.type == "cuda"
    n = n or (8192 if gpu else 1024)
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    sync = (lambda: torch.cuda.synchronize(device)) if gpu else (lambda: None)
    for _ in range(3 if gpu else 1):  # warm-up (a GPU also picks its GEMM kernel here)
        a @ b
    sync()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def model_params(cfg: ModelConfig) -> int:
    """Parameter count of the model (embedding, blocks, norms, head unless tied)."""
    d = cfg.hidden
    norms = cfg.n_layers * (len(cfg.block_windows()[0]) + 1) * d + d  # a norm before each sublayer, and the final
    if cfg.residual == "ddl":
        norms += cfg.n_layers * 2 * 2  # the β and v gates' biases
    embed = 0 if cfg.tie_embeddings else cfg.vocab_size * d
    return linear_params_per_token(cfg) + embed + norms
