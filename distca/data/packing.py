"""Pack document lengths into per-rank token budgets (equal tokens per rank, no padding).

Documents are placed greedily in order. A document that does not fit the rest of a rank is split at
the rank boundary and continues on the next rank (so a long document may span several ranks). The
last document is truncated so the batch holds exactly ``n_ranks * tokens_per_rank`` tokens.

``PackedBatch.to_json()`` gives ``{"ranks": [[piece, ...], ...], "continues": [bool, ...]}``, the
format ``distca plan --lengths FILE`` reads.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from distca.data.distributions import DataError, _is_int, sample_lengths


@dataclass(frozen=True)
class PackedBatch:
    """Per-rank document pieces: lengths, continuation flags, global doc ids and in-doc offsets."""

    ranks: list[list[int]]
    continues: list[bool]
    doc_ids: list[list[int]]
    offsets: list[list[int]]

    def __post_init__(self) -> None:
        n = len(self.ranks)
        if n == 0:
            raise DataError("a packed batch needs at least one rank")
        if not (len(self.continues) == len(self.doc_ids) == len(self.offsets) == n):
            raise DataError(f"ranks/continues/doc_ids/offsets disagree in length: {n}, {len(self.continues)}, "
                            f"{len(self.doc_ids)}, {len(self.offsets)}")
        for r, pieces in enumerate(self.ranks):
            if not pieces:
                raise DataError(f"rank {r} holds no piece; every rank needs at least one")
            if any(not _is_int(x) or x < 1 for x in pieces):
                raise DataError(f"rank {r}: piece lengths must be ints >= 1, got {pieces}")
            if not (len(self.doc_ids[r]) == len(self.offsets[r]) == len(pieces)):
                raise DataError(f"rank {r}: doc_ids/offsets do not match its {len(pieces)} pieces")
        if self.continues[0]:
            raise DataError("continues[0] must be False: rank 0 has no previous rank")
        expected = _doc_ids_offsets(self.ranks, self.continues)
        if (self.doc_ids, self.offsets) != expected:
            raise DataError("doc_ids/offsets are inconsistent with ranks and continues")

    @property
    def n_ranks(self) -> int:
        """Number of ranks."""
        return len(self.ranks)

    @property
    def rank_tokens(self) -> list[int]:
        """Tokens held by each rank."""
        return [sum(p) for p in self.ranks]

    @property
    def total_tokens(self) -> int:
        """Tokens in the whole batch."""
        return sum(self.rank_tokens)

    @property
    def doc_lengths(self) -> list[int]:
        """Length of every (possibly truncated) document, by global doc id."""
        out: list[int] = []
        for ids, pieces in zip(self.doc_ids, self.ranks, strict=True):
            for d, x in zip(ids, pieces, strict=True):
                if d == len(out):
                    out.append(0)
                out[d] += x
        return out

    def to_json(self) -> dict[str, Any]:
        """``{"ranks": [[...]], "continues": [...]}``, the format ``distca plan --lengths`` reads."""
        return {"ranks": [list(p) for p in self.ranks], "continues": list(self.continues)}

    @classmethod
    def from_json(cls, obj: dict[str, Any] | list[list[int]]) -> PackedBatch:
        """Build from ``to_json()`` output or a plain list of per-rank whole-document lengths."""
        if isinstance(obj, dict):
            extra = sorted(set(obj) - {"ranks", "continues"})
            if "ranks" not in obj or extra:
                raise DataError(f"packed-batch JSON needs key 'ranks' (and optional 'continues'), got keys "
                                f"{sorted(obj)}")
            ranks, continues = obj["ranks"], obj.get("continues")
        elif isinstance(obj, list):
            ranks, continues = obj, None
        else:
            raise DataError(f"packed-batch JSON must be an object or a list of lists, got {type(obj).__name__}")
        if not isinstance(ranks, list) or not all(isinstance(p, list) for p in ranks):
            raise DataError(f"'ranks' must be a list of per-rank lists of ints, got {ranks!r}")
        ranks = [[_as_int(x) for x in p] for p in ranks]
        if continues is None:
            continues = [False] * len(ranks)
        if not isinstance(continues, list) or not all(isinstance(c, bool) for c in continues):
            raise DataError(f"'continues' must be a list of booleans, got {continues!r}")
        if len(continues) != len(ranks):
            raise DataError(f"'continues' has {len(continues)} entries for {len(ranks)} ranks")
        if ranks and continues[0]:
            raise DataError("continues[0] must be False: rank 0 has no previous rank")
        if any(not p for p in ranks):
            raise DataError("every rank needs at least one piece")
        doc_ids, offsets = _doc_ids_offsets(ranks, continues)
        return cls(ranks, list(continues), doc_ids, offsets)


def _as_int(x: Any) -> int:
    if not _is_int(x):
        raise DataError(f"piece lengths must be ints, got {x!r}")
    return int(x)


def _doc_ids_offsets(ranks: Sequence[Sequence[int]], continues: Sequence[bool]) -> tuple[list[list[int]],
                                                                                         list[list[int]]]:
    """Global doc id and in-document offset of every piece implied by ``ranks`` and ``continues``."""
    doc_ids: list[list[int]] = []
    offsets: list[list[int]] = []
    doc, off = -1, 0
    for r, pieces in enumerate(ranks):
        ids: list[int] = []
        offs: list[int] = []
        for i, x in enumerate(pieces):
            if not (i == 0 and r > 0 and continues[r]):
                doc, off = doc + 1, 0
            ids.append(doc)
            offs.append(off)
            off += int(x)
        doc_ids.append(ids)
        offsets.append(offs)
    return doc_ids, offsets


def pack_into_ranks(lengths: Iterable[int] | np.ndarray, n_ranks: int, tokens_per_rank: int) -> PackedBatch:
    """Greedily pack ``lengths`` in order into ``n_ranks`` budgets of exactly ``tokens_per_rank`` tokens."""
    if not (_is_int(n_ranks) and n_ranks >= 1):
        raise DataError(f"n_ranks must be an int >= 1, got {n_ranks!r}")
    if not (_is_int(tokens_per_rank) and tokens_per_rank >= 1):
        raise DataError(f"tokens_per_rank must be an int >= 1, got {tokens_per_rank!r}")
    arr = np.asarray(lengths if isinstance(lengths, np.ndarray) else list(lengths))
    if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
        raise DataError(f"lengths must be a 1-D sequence of ints, got dtype {arr.dtype}, shape {arr.shape}")
    docs = [int(x) for x in arr]
    if any(x < 1 for x in docs):
        raise DataError(f"document lengths must be >= 1, got min {min(docs)}")
    need = n_ranks * tokens_per_rank
    if sum(docs) < need:
        raise DataError(f"lengths sum to {sum(docs)} tokens, fewer than n_ranks * tokens_per_rank = {need}")
    ranks: list[list[int]] = [[] for _ in range(n_ranks)]
    continues = [False] * n_ranks
    r, room = 0, tokens_per_rank
    for length in docs:
        left = length
        while left and r < n_ranks:
            take = min(left, room)
            ranks[r].append(take)
            left -= take
            room -= take
            if room == 0:
                r, room = r + 1, tokens_per_rank
                if left and r < n_ranks:
                    continues[r] = True
        if r == n_ranks:
            break
    doc_ids, offsets = _doc_ids_offsets(ranks, continues)
    return PackedBatch(ranks, continues, doc_ids, offsets)


def sample_batch(dist_name: str, n_ranks: int, tokens_per_rank: int, seed: int = 0, **kw: Any) -> PackedBatch:
    """Sample lengths from ``dist_name`` (``kw`` as for ``sample_lengths``) and pack them into ranks."""
    if not (_is_int(n_ranks) and n_ranks >= 1 and _is_int(tokens_per_rank) and tokens_per_rank >= 1):
        raise DataError(f"need ints n_ranks >= 1 and tokens_per_rank >= 1, got {n_ranks!r}, {tokens_per_rank!r}")
    lengths = sample_lengths(dist_name, total_tokens=n_ranks * tokens_per_rank, seed=seed, **kw)
    return pack_into_ranks(lengths, n_ranks, tokens_per_rank)
