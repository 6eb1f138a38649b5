"""Rotary position embeddings: the inverse frequencies of each rope type Llama-family checkpoints use.

Computed in float64 and cast once, so a model in any dtype rotates by the same angles. The formulas are
those of the papers and of Meta's Llama 3.1 code; ``tests/test_hf_transformers.py`` checks every type
against Hugging Face ``transformers`` on real models.
"""

from __future__ import annotations

import math

import torch

from distca.config import RopeScaling

NO_SCALING = RopeScaling()


def _base_inv_freq(head_dim: int, theta: float, device=None) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64, device=device) / head_dim))


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rope_frequencies(head_dim: int, theta: float, scaling: RopeScaling = NO_SCALING,
                     device=None) -> tuple[torch.Tensor, float]:
    """``(inv_freq [head_dim/2] float64, attention_factor)``: the angle per position of each rotated pair,
    and the factor cos/sin are scaled by (1 but for YaRN)."""
    inv = _base_inv_freq(head_dim, theta, device)
    s = scaling
    if s.type == "default":
        return inv, 1.0
    if s.type == "linear":
        return inv / s.factor, 1.0
    if s.type == "llama3":
        low_wavelen = s.original_max_position / s.low_freq_factor
        high_wavelen = s.original_max_position / s.high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > low_wavelen, inv / s.factor, inv)
        smooth = (s.original_max_position / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
        blended = (1 - smooth) * scaled / s.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(medium, blended, scaled), 1.0
    if s.type == "yarn":
        if s.attention_factor:
            attention = s.attention_factor
        elif s.mscale and s.mscale_all_dim:
            attention = _yarn_mscale(s.factor, s.mscale) / _yarn_mscale(s.factor, s.mscale_all_dim)
        else:
            attention = _yarn_mscale(s.factor)

        def correction_dim(rotations: float) -> float:
            return head_dim * math.log(s.original_max_position / (rotations * 2 * math.pi)) / (2 * math.log(theta))

        low, high = correction_dim(s.beta_fast), correction_dim(s.beta_slow)
        if s.truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, head_dim - 1)
        if low == high:
            high += 0.001  # the band would be empty: avoid dividing by zero, as YaRN's reference does
        ramp = ((torch.arange(head_dim // 2, dtype=torch.float64, device=device) - low) / (high - low)).clamp(0, 1)
        keep = 1 - ramp  # 1: extrapolate (high frequencies, unchanged), 0: interpolate (divided by factor)
        return inv / s.factor * (1 - keep) + inv * keep, attention
    raise ValueError(f"rope type {s.type!r} is not implemented")


def rope_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype,
                 scaling: RopeScaling = NO_SCALING):
    """``cos, sin [T, head_dim]`` for each token's position *inside its document* (Llama's rotate-half
    layout). Positions come from the data layout, so a document split across ranks or shards keeps them."""
    inv, attention = rope_frequencies(head_dim, theta, scaling, position_ids.device)
    ang = position_ids.to(torch.float64)[:, None] * inv[None, :]
    ang = torch.cat([ang, ang], dim=-1)
    return (ang.cos() * attention).to(dtype), (ang.sin() * attention).to(dtype)
