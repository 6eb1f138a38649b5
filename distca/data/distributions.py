"""Seeded document-length samplers: the workloads every benchmark packs into ranks.

Every sampler is deterministic given ``seed`` (``np.random.default_rng(seed)``) and returns an
int64 array of document lengths, all >= 1.

Families (``DISTRIBUTIONS``):

- ``fixed``     every document has ``length`` tokens.
- ``uniform``   integers drawn uniformly from ``[lo, hi]`` (both inclusive).
- ``pretrain``  long-tailed, mimics the WLB-LLM pretraining length distribution with long documents
  upsampled, as used by the DistCA paper (99,519 lengths, median 3.2K, max 122K).
- ``prolong``   long-tailed, mimics the ProLong data used by the DistCA paper (77,932 lengths,
  median 1.9K, max 340K).

The two long-tailed families are the same parametric mixture, with different constants:

    with probability 1 - tail_p:  L ~ LogNormal(ln(body_median), sigma)           (the body)
    with probability tail_p:      L ~ LogUniform(tail_lo, max_len)                (the tail)
    L = clip(round(L), 1, max_len)

The constants were fitted (400k common-random-number draws, bisection on ``tail_p``) so that the
median and the share of *tokens* in documents longer than 16K match the targets: pretrain median
3.2K, ~20% of tokens in >16K documents, cap 125K; prolong median 1.9K, ~10% of tokens in >16K
documents, cap 340K. Measured on 200,000 samples (seed 0; in brackets the mean over seeds 0-19):

    ==========  ===============  =======  ====================  ===============
    name        median           max      token share >16K      mean
    ==========  ===============  =======  ====================  ===============
    pretrain    3,200 (3,201)    125,000  20.4% (20.0% ± 0.3)   4,874 (4,858)
    prolong     1,899 (1,900)    338,218  10.9% (10.1% ± 0.4)   2,844 (2,820)
    ==========  ===============  =======  ====================  ===============

Constants (``DISTRIBUTIONS``): pretrain body_median=3157, sigma=0.8, tail_p=0.0131, tail_lo=8192,
max_len=125,000; prolong body_median=1895, sigma=0.8, tail_p=0.0024, tail_lo=8192, max_len=340,000.
With ``upsample_long=4`` the >16K token share becomes ~50% (pretrain) and ~31% (prolong).

Two transforms apply on top of any family, in this order, as in the DistCA paper:

- ``upsample_long = u >= 1`` multiplies the sampling weight of documents longer than
  ``long_threshold`` (default 16,384; a parameter every family accepts; compared before elongation)
  by ``u``. Implemented exactly by rejection: a draw longer than the threshold is always kept, a
  shorter one is kept with probability ``1/u``.
- ``elongate = f > 0`` multiplies every length by ``f`` (rounded, at least 1). The paper uses
  ``f = MaxDocLen / 64K``; ``elongate_to(name, max_len)`` gives ``f = max_len / distribution max``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from distca.errors import InputError
from distca.limits import MAX_DOC_TOKENS, pow2_text

LONG_THRESHOLD = 16_384


class DataError(InputError):
    """A length distribution, its parameters, or a packing request is invalid."""


Sampler = Callable[[np.random.Generator, int, Mapping[str, Any]], np.ndarray]


@dataclass(frozen=True)
class _Family:
    sampler: Sampler
    defaults: Mapping[str, Any]
    required: tuple[str, ...]
    max_len: Callable[[Mapping[str, Any]], int]
    check: Callable[[Mapping[str, Any]], str | None]


def _fixed(rng: np.random.Generator, n: int, p: Mapping[str, Any]) -> np.ndarray:
    return np.full(n, int(p["length"]), dtype=np.int64)


def _uniform(rng: np.random.Generator, n: int, p: Mapping[str, Any]) -> np.ndarray:
    return rng.integers(int(p["lo"]), int(p["hi"]), endpoint=True, size=n, dtype=np.int64)


def _mixture(rng: np.random.Generator, n: int, p: Mapping[str, Any]) -> np.ndarray:
    body = float(p["body_median"]) * np.exp(float(p["sigma"]) * rng.standard_normal(n))
    lo, hi = float(p["tail_lo"]), float(p["max_len"])
    tail = lo * (hi / lo) ** rng.random(n)
    x = np.where(rng.random(n) < float(p["tail_p"]), tail, body)
    return np.clip(np.rint(x), 1, int(p["max_len"])).astype(np.int64)


def _check_fixed(p: Mapping[str, Any]) -> str | None:
    return None if _is_int(p["length"]) and p["length"] >= 1 else f"length must be an int >= 1, got {p['length']!r}"


def _check_uniform(p: Mapping[str, Any]) -> str | None:
    lo, hi = p["lo"], p["hi"]
    if not (_is_int(lo) and _is_int(hi) and 1 <= lo <= hi):
        return f"need ints 1 <= lo <= hi, got lo={lo!r}, hi={hi!r}"
    return None


def _check_mixture(p: Mapping[str, Any]) -> str | None:
    if not all(isinstance(p[k], int | float) and not isinstance(p[k], bool) and math.isfinite(p[k]) for k in p):
        return f"all parameters must be finite numbers, got {dict(p)}"
    if not (p["body_median"] >= 1 and p["sigma"] >= 0 and 0 <= p["tail_p"] <= 1):
        return f"need body_median >= 1, sigma >= 0, 0 <= tail_p <= 1, got {dict(p)}"
    if not (_is_int(p["max_len"]) and 1 <= p["tail_lo"] <= p["max_len"]):
        return f"need an int max_len and 1 <= tail_lo <= max_len, got {dict(p)}"
    return None


def _is_int(x: Any) -> bool:
    return isinstance(x, int | np.integer) and not isinstance(x, bool)


def _mixture_family(body_median: float, sigma: float, tail_p: float, tail_lo: int, max_len: int) -> _Family:
    defaults = {"body_median": body_median, "sigma": sigma, "tail_p": tail_p, "tail_lo": tail_lo, "max_len": max_len}
    return _Family(_mixture, defaults, (), lambda p: int(p["max_len"]), _check_mixture)


DISTRIBUTIONS: dict[str, _Family] = {
    "fixed": _Family(_fixed, {}, ("length",), lambda p: int(p["length"]), _check_fixed),
    "uniform": _Family(_uniform, {}, ("lo", "hi"), lambda p: int(p["hi"]), _check_uniform),
    "pretrain": _mixture_family(body_median=3157.0, sigma=0.8, tail_p=0.0131, tail_lo=8192, max_len=125_000),
    "prolong": _mixture_family(body_median=1895.0, sigma=0.8, tail_p=0.0024, tail_lo=8192, max_len=340_000),
}


@dataclass(frozen=True)
class LengthDistribution:
    """A named length family with its parameters and the upsample/elongate transforms."""

    name: str
    upsample_long: float = 1.0
    elongate: float = 1.0
    params: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _resolve(self.name, self.params)
        u, f = self.upsample_long, self.elongate
        if not (isinstance(u, int | float) and math.isfinite(u) and u >= 1):
            raise DataError(f"upsample_long must be a finite number >= 1, got {u!r}")
        if not (isinstance(f, int | float) and math.isfinite(f) and f > 0):
            raise DataError(f"elongate must be a finite number > 0, got {f!r}")
        if self.base_max_len * f > MAX_DOC_TOKENS:
            raise DataError(f"elongate {f!r} stretches {self.name!r} lengths to {self.base_max_len * f:.3g} tokens, "
                            f"over the cap of {pow2_text(MAX_DOC_TOKENS)} tokens per document")

    @property
    def base_max_len(self) -> int:
        """Largest length the family can draw before elongation."""
        params, _ = _resolve(self.name, self.params)
        return DISTRIBUTIONS[self.name].max_len(params)

    @property
    def max_len(self) -> int:
        """Largest length this distribution can produce (after elongation)."""
        return max(1, round(self.base_max_len * self.elongate))

    def elongate_to(self, max_len: int) -> float:
        """Elongation factor that maps the family's max length to ``max_len``."""
        if not (_is_int(max_len) and max_len >= 1):
            raise DataError(f"max_len must be an int >= 1, got {max_len!r}")
        return max_len / self.base_max_len

    def scaled_to(self, max_len: int) -> LengthDistribution:
        """Copy of this distribution elongated so that its max length is ``max_len``."""
        return replace(self, elongate=self.elongate_to(max_len))

    def sample(self, n_docs: int | None = None, total_tokens: int | None = None, seed: int = 0) -> np.ndarray:
        """Draw ``n_docs`` lengths, or lengths summing exactly to ``total_tokens``."""
        if (n_docs is None) == (total_tokens is None):
            raise DataError(f"give exactly one of n_docs / total_tokens, got n_docs={n_docs!r}, "
                            f"total_tokens={total_tokens!r}")
        rng = np.random.default_rng(seed)
        if n_docs is not None:
            if not (_is_int(n_docs) and n_docs >= 0):
                raise DataError(f"n_docs must be an int >= 0, got {n_docs!r}")
            return self._draw(rng, int(n_docs))
        if not (_is_int(total_tokens) and total_tokens >= 1):
            raise DataError(f"total_tokens must be an int >= 1, got {total_tokens!r}")
        total = int(total_tokens)
        chunks: list[np.ndarray] = []
        have, mean = 0, float(self.max_len)
        while have < total:
            chunk = self._draw(rng, max(64, math.ceil(1.1 * (total - have) / mean)))
            chunks.append(chunk)
            have += int(chunk.sum())
            drawn = np.concatenate(chunks)
            mean = float(drawn.mean())
        drawn = np.concatenate(chunks)
        csum = np.cumsum(drawn)
        k = int(np.searchsorted(csum, total))  # first index where the running sum reaches total
        out = drawn[: k + 1].copy()
        out[k] = total - (int(csum[k - 1]) if k else 0)
        return out

    def _draw(self, rng: np.random.Generator, n: int) -> np.ndarray:
        params, threshold = _resolve(self.name, self.params)
        family = DISTRIBUTIONS[self.name]
        if self.upsample_long == 1.0:
            x = family.sampler(rng, n, params)
        else:
            kept: list[np.ndarray] = []
            got = 0
            while got < n:
                cand = family.sampler(rng, min(math.ceil((n - got) * self.upsample_long) + 16, 1 << 20), params)
                keep = (cand > threshold) | (rng.random(cand.size) < 1.0 / self.upsample_long)
                kept.append(cand[keep])
                got += int(keep.sum())
            x = np.concatenate(kept)[:n] if kept else np.zeros(0, dtype=np.int64)
        if self.elongate != 1.0:
            x = np.maximum(np.rint(x * self.elongate), 1).astype(np.int64)
        return x.astype(np.int64, copy=False)


def _resolve(name: str, params: Mapping[str, Any]) -> tuple[dict[str, Any], int]:
    """Validate ``params`` for family ``name``; return the full parameter set and the long threshold."""
    if name not in DISTRIBUTIONS:
        raise DataError(f"unknown length distribution {name!r}; valid names: {sorted(DISTRIBUTIONS)}")
    family = DISTRIBUTIONS[name]
    params = dict(params)
    threshold = params.pop("long_threshold", LONG_THRESHOLD)
    if not (_is_int(threshold) and threshold >= 0):
        raise DataError(f"long_threshold must be an int >= 0, got {threshold!r}")
    allowed = set(family.defaults) | set(family.required)
    unknown = sorted(set(params) - allowed)
    if unknown:
        raise DataError(f"unknown parameter(s) {unknown} for distribution {name!r}; valid: "
                        f"{sorted(allowed | {'long_threshold'})}")
    missing = [k for k in family.required if k not in params]
    if missing:
        raise DataError(f"distribution {name!r} needs parameter(s) {missing}")
    full = {**family.defaults, **params}
    problem = family.check(full)
    if problem:
        raise DataError(f"bad parameters for distribution {name!r}: {problem}")
    if family.max_len(full) > MAX_DOC_TOKENS:
        raise DataError(f"distribution {name!r} draws lengths up to {family.max_len(full)}, over the cap of "
                        f"{pow2_text(MAX_DOC_TOKENS)} tokens per document")
    return full, int(threshold)


def sample_lengths(name: str, n_docs: int | None = None, total_tokens: int | None = None, seed: int = 0,
                   upsample_long: float = 1.0, elongate: float = 1.0, **params: Any) -> np.ndarray:
    """Draw seeded int64 document lengths from distribution ``name`` (see module docstring)."""
    dist = LengthDistribution(name, upsample_long=upsample_long, elongate=elongate, params=params)
    return dist.sample(n_docs=n_docs, total_tokens=total_tokens, seed=seed)


def elongate_to(name: str, max_len: int, **params: Any) -> float:
    """Elongation factor ``max_len / (max length of distribution name)``."""
    return LengthDistribution(name, params=params).elongate_to(max_len)


def long_token_share(lengths: np.ndarray, threshold: int = LONG_THRESHOLD) -> float:
    """Fraction of tokens that sit in documents longer than ``threshold``."""
    x = np.asarray(lengths, dtype=np.int64)
    total = int(x.sum())
    return float(x[x > threshold].sum()) / total if total else 0.0


def length_stats(lengths: np.ndarray, threshold: int = LONG_THRESHOLD) -> dict[str, float]:
    """Summary (n, median, mean, max, long-token share) of a length sample."""
    x = np.asarray(lengths, dtype=np.int64)
    if x.size == 0:
        return {"n": 0, "median": 0.0, "mean": 0.0, "max": 0, "long_share": 0.0}
    return {"n": int(x.size), "median": float(np.median(x)), "mean": float(x.mean()), "max": int(x.max()),
            "long_share": long_token_share(x, threshold)}
