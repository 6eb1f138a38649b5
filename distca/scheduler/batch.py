"""The scheduler's input: which pieces of which documents each trainer rank holds.

Documents are packed into per-rank token budgets and may be split at rank boundaries, so rank r
holds a list of *pieces*; ``continues[r]`` says its first piece continues rank r-1's last
document (whose earlier tokens — and keys — live on earlier ranks). A piece is a contiguous range
of one document's tokens; within a rank, pieces are laid out in order in the rank's q/k/v buffers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class BatchLayout:
    """Pieces of one (nano-)batch, as struct-of-arrays sorted by (rank, position in rank)."""

    n_ranks: int
    piece_rank: np.ndarray  # int64 [P]
    piece_doc: np.ndarray  # int64 [P] global document index
    piece_off: np.ndarray  # int64 [P] first token's position inside its document
    piece_len: np.ndarray  # int64 [P]
    piece_row: np.ndarray  # int64 [P] first token's row in its rank's local buffers
    doc_len: np.ndarray  # int64 [D] total length of each document (over all ranks)

    @property
    def n_pieces(self) -> int:
        return int(self.piece_len.size)

    @property
    def n_docs(self) -> int:
        return int(self.doc_len.size)

    @property
    def rank_tokens(self) -> np.ndarray:
        return np.bincount(self.piece_rank, weights=self.piece_len, minlength=self.n_ranks).astype(np.int64)

    @classmethod
    def from_ranks(cls, ranks: list[list[int]], continues: list[bool] | None = None) -> BatchLayout:
        """Build from per-rank lists of piece lengths and continuation flags (see module docstring)."""
        n_ranks = len(ranks)
        if n_ranks == 0:
            raise ValueError("a batch needs at least one rank")
        continues = [False] * n_ranks if continues is None else list(continues)
        if len(continues) != n_ranks:
            raise ValueError(f"continues has {len(continues)} flags for {n_ranks} ranks")
        if continues[0]:
            raise ValueError("continues[0] must be false: rank 0 has no previous rank")
        rank, doc, off, length, row, doc_len = [], [], [], [], [], []
        for r, pieces in enumerate(ranks):
            if not isinstance(pieces, list | tuple):
                raise ValueError(f"rank {r}: expected a list of lengths, got {type(pieces).__name__}")
            pos = 0
            for i, n in enumerate(pieces):
                if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 1:
                    raise ValueError(f"rank {r} piece {i}: lengths must be positive integers, got {n!r}")
                if i == 0 and continues[r]:
                    if not doc_len:
                        raise ValueError(f"rank {r} continues a document but no earlier rank holds one")
                    d, o = len(doc_len) - 1, doc_len[-1]
                    doc_len[-1] += int(n)
                else:
                    d, o = len(doc_len), 0
                    doc_len.append(int(n))
                rank.append(r)
                doc.append(d)
                off.append(o)
                length.append(int(n))
                row.append(pos)
                pos += int(n)
            if continues[r] and not pieces:
                raise ValueError(f"rank {r} continues a document but holds no pieces")
        as64 = lambda x: np.asarray(x, dtype=np.int64)  # noqa: E731
        return cls(n_ranks, as64(rank), as64(doc), as64(off), as64(length), as64(row), as64(doc_len))

    def query_rows(self, lo: list[int] | np.ndarray, hi: list[int] | np.ndarray) -> BatchLayout:
        """The part of this batch whose *queries* sit in rows ``[lo[r], hi[r])`` of each rank r — one nano-batch
        of a ping-pong split. Pieces are cut at those rows and keep their rows in the rank's whole buffers and
        their documents' numbering, so the pieces outside are still where the part's keys come from: plan the
        part with ``make_plan(part, ..., keys=self)``."""
        lo, hi = np.asarray(lo, dtype=np.int64), np.asarray(hi, dtype=np.int64)
        if lo.shape != (self.n_ranks,) or hi.shape != (self.n_ranks,) or (lo > hi).any() or (lo < 0).any():
            raise ValueError(f"query rows need 0 <= lo <= hi for each of {self.n_ranks} ranks, got {lo} and {hi}")
        a = np.maximum(self.piece_row, lo[self.piece_rank])
        b = np.minimum(self.piece_row + self.piece_len, hi[self.piece_rank])
        keep = b > a
        cut = a[keep] - self.piece_row[keep]
        return BatchLayout(self.n_ranks, self.piece_rank[keep], self.piece_doc[keep], self.piece_off[keep] + cut,
                           (b - a)[keep], a[keep], self.doc_len)
