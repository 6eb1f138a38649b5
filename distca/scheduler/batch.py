"""The scheduler's input: which pieces of which documents each trainer rank holds.

Documents are packed into per-rank token budgets and may be split at rank boundaries, so rank r
holds a list of *pieces*; ``continues[r]`` says its first piece continues rank r-1's last
document (whose earlier tokens — and keys — live on earlier ranks). A piece is a contiguous range
of one document's tokens; within a rank, pieces are laid out in order in the rank's q/k/v buffers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from distca.errors import InputError
from distca.limits import MAX_BATCH_PAIRS, MAX_DOC_TOKENS, MAX_RANKS, is_int, pow2_text, short_repr
from distca.masks import Mask, check_slices_fit


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
    # Per-document masks (:meth:`with_masks`): document d attends by doc_masks[d], ``None`` entries (or no tuple)
    # by the layer's mask (``SchedulerConfig.mask``). How ``slices`` masks, which are per-document data, reach
    # the planner; any family may appear, and documents of one batch may differ.
    doc_masks: tuple[Mask | None, ...] | None = None

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
        if not isinstance(ranks, list | tuple):
            raise InputError(f"ranks must be a list of per-rank lists of lengths, got {type(ranks).__name__}")
        n_ranks = len(ranks)
        if n_ranks == 0:
            raise InputError("a batch needs at least one rank")
        if n_ranks > MAX_RANKS:
            raise InputError(f"a batch holds at most {MAX_RANKS} ranks, got {n_ranks}")
        if continues is None:
            continues = [False] * n_ranks
        elif not isinstance(continues, list | tuple):
            raise InputError(f"continues must be a list of {n_ranks} booleans, got {type(continues).__name__}")
        continues = list(continues)
        if len(continues) != n_ranks:
            raise InputError(f"continues has {len(continues)} flags for {n_ranks} ranks")
        bad = next((i for i, c in enumerate(continues) if not isinstance(c, bool | np.bool_)), None)
        if bad is not None:
            raise InputError(f"continues[{bad}] must be true or false, got {type(continues[bad]).__name__}")
        if continues[0]:
            raise InputError("continues[0] must be false: rank 0 has no previous rank")
        rank, doc, off, length, row, doc_len = [], [], [], [], [], []
        for r, pieces in enumerate(ranks):
            if not isinstance(pieces, list | tuple):
                raise InputError(f"rank {r}: expected a list of lengths, got {type(pieces).__name__}")
            pos = 0
            for i, n in enumerate(pieces):
                if not is_int(n) or n < 1:
                    raise InputError(f"rank {r} piece {i}: lengths must be positive integers, got {short_repr(n)}")
                if n > MAX_DOC_TOKENS:
                    raise InputError(f"rank {r} piece {i}: length {short_repr(int(n))} exceeds the cap of "
                                     f"{pow2_text(MAX_DOC_TOKENS)} tokens per document")
                if i == 0 and continues[r]:
                    if not doc_len:
                        raise InputError(f"rank {r} continues a document but no earlier rank holds one")
                    d, o = len(doc_len) - 1, doc_len[-1]
                    doc_len[-1] += int(n)
                    if doc_len[-1] > MAX_DOC_TOKENS:
                        raise InputError(f"rank {r} piece {i}: the document it continues reaches {doc_len[-1]} "
                                         f"tokens, over the cap of {pow2_text(MAX_DOC_TOKENS)} tokens per document")
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
                raise InputError(f"rank {r} continues a document but holds no pieces")
        pairs = sum(n * (n + 1) // 2 for n in doc_len)  # Python ints: exact, no overflow
        if pairs > MAX_BATCH_PAIRS:
            raise InputError(f"the batch's documents attend {pairs} (query, key) pairs, over the cap of "
                             f"{pow2_text(MAX_BATCH_PAIRS)} (int64 pair counts would overflow)")
        as64 = lambda x: np.asarray(x, dtype=np.int64)  # noqa: E731
        return cls(n_ranks, as64(rank), as64(doc), as64(off), as64(length), as64(row), as64(doc_len))

    @classmethod
    def stacked(cls, batches: Sequence[BatchLayout]) -> BatchLayout:
        """Batches over disjoint ranks as one: batch 0's ranks first, then batch 1's, ... (the pooled schedule's
        tick: every stage's micro-batch on its own trainers); documents numbered on."""
        if not batches:
            raise ValueError("stacked needs at least one batch")
        if len(batches) == 1:
            return batches[0]
        if any(b.doc_masks is not None for b in batches):
            raise ValueError("stacked takes batches without per-document masks")
        ranks = docs = 0
        fields: list[list[np.ndarray]] = [[] for _ in range(5)]
        for b in batches:
            for f, x in zip(fields, (b.piece_rank + ranks, b.piece_doc + docs, b.piece_off, b.piece_len, b.piece_row),
                            strict=True):
                f.append(x)
            ranks += b.n_ranks
            docs += b.n_docs
        if ranks > MAX_RANKS:
            raise InputError(f"a batch holds at most {MAX_RANKS} ranks, got {ranks}")
        return cls(ranks, *(np.concatenate(f) for f in fields), np.concatenate([b.doc_len for b in batches]))

    def with_masks(self, masks: Sequence[Mask | None] | None) -> BatchLayout:
        """This batch with one mask per document (``None``: the layer's mask; ``masks=None`` drops them all).
        A ``slices`` mask must fit inside its document."""
        if masks is None:
            return BatchLayout(self.n_ranks, self.piece_rank, self.piece_doc, self.piece_off, self.piece_len,
                               self.piece_row, self.doc_len)
        if not isinstance(masks, list | tuple):
            raise InputError(f"doc masks must be a list of one Mask (or None) per document, got "
                             f"{type(masks).__name__}")
        masks = tuple(masks)
        if len(masks) != self.n_docs:
            raise InputError(f"the batch has {self.n_docs} documents but {len(masks)} masks were given")
        for d, m in enumerate(masks):
            if m is None:
                continue
            if not isinstance(m, Mask):
                raise InputError(f"document {d}'s mask must be a distca.masks.Mask or None, got "
                                 f"{type(m).__name__}")
            check_slices_fit(m, int(self.doc_len[d]), d)
        return BatchLayout(self.n_ranks, self.piece_rank, self.piece_doc, self.piece_off, self.piece_len,
                           self.piece_row, self.doc_len, masks)

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
                           (b - a)[keep], a[keep], self.doc_len, self.doc_masks)
