"""The document-source contract that the packing stream reads, shared by every source kind.

A source is anything that satisfies ``DocumentSource``: ``name``, ``vocab_size``, ``len()``,
``document(i)`` (a fresh 1-D int64 array of token ids, length >= 1, every id in
``[0, vocab_size)``) and ``length(i)`` (``len(document(i))``, cheap where the source can know it).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np

from distca.data.distributions import DataError, _is_int


@runtime_checkable
class DocumentSource(Protocol):
    """An indexable collection of tokenised documents (see the module docstring for the contract)."""

    @property
    def name(self) -> str:
        """Short stable identifier (used in errors and in stream resume fingerprints)."""
        ...

    @property
    def vocab_size(self) -> int:
        """Every token id is in ``[0, vocab_size)``."""
        ...

    def __len__(self) -> int: ...

    def document(self, i: int) -> np.ndarray:
        """Token ids of document ``i``: a fresh 1-D int64 array of length >= 1."""
        ...

    def length(self, i: int) -> int:
        """``len(document(i))``; cheap where the source can know it without tokenising."""
        ...


def check_index(source: DocumentSource, i: int) -> int:
    """Validate a document index of ``source`` (no negative indexing) and return it as an int."""
    n = len(source)
    if not _is_int(i) or not 0 <= i < n:
        raise DataError(f"{source.name}: document index {i!r} out of range [0, {n})")
    return int(i)
