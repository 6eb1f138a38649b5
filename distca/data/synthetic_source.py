"""Random-token documents with lengths from a length distribution (long-context synthetic runs)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from distca.data.distributions import DataError, LengthDistribution, _is_int
from distca.data.document_source import check_index


class SyntheticSource:
    """Random-token documents whose lengths follow a ``LengthDistribution`` (long-context synthetic runs).

    Pinned choices: lengths are ``distribution.sample(n_docs=n_docs, seed=seed)``, then capped at
    ``max_len`` when given (a cap, not a rescale: use ``LengthDistribution.scaled_to`` to rescale).
    Document ``i``'s tokens are uniform in ``[0, vocab_size)`` from ``np.random.default_rng([seed, 1, i])``,
    so any document can be generated alone, in any order, identically on every run.
    """

    def __init__(self, distribution: LengthDistribution | str, n_docs: int, vocab_size: int, seed: int = 0,
                 max_len: int | None = None, params: Mapping[str, Any] | None = None) -> None:
        if isinstance(distribution, str):
            distribution = LengthDistribution(distribution, params=dict(params or {}))
        elif params:
            raise DataError("params is only for a distribution given by name; put them in the LengthDistribution")
        if not isinstance(distribution, LengthDistribution):
            raise DataError(f"distribution must be a LengthDistribution or a name, got {type(distribution).__name__}")
        if not (_is_int(n_docs) and n_docs >= 1):
            raise DataError(f"n_docs must be an int >= 1, got {n_docs!r}")
        if not (_is_int(vocab_size) and vocab_size >= 1):
            raise DataError(f"vocab_size must be an int >= 1, got {vocab_size!r}")
        if not (_is_int(seed) and seed >= 0):
            raise DataError(f"seed must be an int >= 0, got {seed!r}")
        if max_len is not None and not (_is_int(max_len) and max_len >= 1):
            raise DataError(f"max_len must be an int >= 1 or None, got {max_len!r}")
        self.distribution = distribution
        self.seed = int(seed)
        lengths = distribution.sample(n_docs=int(n_docs), seed=self.seed)
        self._lengths = np.minimum(lengths, max_len) if max_len is not None else lengths
        self._vocab_size = int(vocab_size)
        self._name = f"synthetic:{distribution.name}:seed{self.seed}"

    @property
    def name(self) -> str:
        """``synthetic:<distribution name>:seed<seed>``."""
        return self._name

    @property
    def vocab_size(self) -> int:
        """As given."""
        return self._vocab_size

    @property
    def lengths(self) -> np.ndarray:
        """Every document's length, int64 (a copy)."""
        return self._lengths.copy()

    def __len__(self) -> int:
        return len(self._lengths)

    def length(self, i: int) -> int:
        """Sampled length of document ``i``."""
        return int(self._lengths[check_index(self, i)])

    def document(self, i: int) -> np.ndarray:
        """Seeded uniform random token ids."""
        i = check_index(self, i)
        rng = np.random.default_rng([self.seed, 1, i])
        return rng.integers(0, self._vocab_size, size=int(self._lengths[i]), dtype=np.int64)
