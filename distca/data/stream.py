"""Packing stream: documents of a source → micro-batches of ``n_ranks`` equal token budgets, resumable exactly.

Pinned choices:

- Order: epoch ``e`` visits every document once, in ``np.random.default_rng([seed, e]).permutation``
  order (index order with ``shuffle=False``); the next epoch starts with a new order.
- ``max_doc_tokens = m``: a document is cut into consecutive chunks ``[0, m), [m, 2m), ...``; each chunk
  is a separate document (positions restart, its last token has no target).
- Packing: the stream fills ``n_ranks * tokens_per_rank`` tokens with consecutive document pieces and
  lays them out with ``pack_into_ranks``: a document that does not fit the rest of a rank continues
  on the next rank (``continues=True``, same document, positions continue).
- Carry-over: the document in progress when a micro-batch is full continues as the *first document*
  of the next micro-batch, as a new document (positions restart; no token is dropped or repeated).
  Its last token in the full micro-batch therefore has no target (-100).
- Parts (``parts=2``, ping-pong's ``repack`` split): a micro-batch is filled as ``parts`` consecutive packs of
  ``n_ranks * tokens_per_rank / parts`` tokens each, cut and carried over between them as between micro-batches,
  each laid out on the ranks on its own; rank ``r`` holds its rows of part 0, then of part 1. No document spans
  two parts, so each part's attention needs none of another's keys.
- Labels: ``labels[t] = tokens[t + 1]`` inside one packed document, across rank boundaries too; the
  last token of every packed document (document, chunk or carried-over piece) is ``IGNORE_INDEX``.
- Resume: ``state_dict()`` is a small JSON-serialisable dict (epoch, cursor in the epoch's order,
  token offset in the current document, micro-batch count, seed and a fingerprint of source and
  shape); ``load_state_dict`` restores it exactly (the state's seed replaces the stream's) and raises
  ``DataError`` if the fingerprint differs.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from distca.data.distributions import DataError, _is_int
from distca.data.document_source import DocumentSource
from distca.data.packing import PackedBatch, pack_into_ranks
from distca.limits import MAX_DOC_TOKENS, MAX_RANKS, check_int

IGNORE_INDEX = -100
STATE_FORMAT = "distca-packed-stream"
STATE_VERSION = 1


@dataclass(frozen=True)
class DocSlice:
    """Where one packed document of a micro-batch came from: ``source.document(doc)[start:start + length]``."""

    doc: int
    start: int
    length: int
    epoch: int


@dataclass(frozen=True, eq=False)
class MicroBatch:
    """One micro-batch: per-rank token ids and next-token labels, their packed layout and provenance.

    ``tokens[r]`` / ``labels[r]`` are int64 arrays of exactly ``tokens_per_rank`` entries;
    ``parts``: the micro-batch's independent packs (one, or two with the ``repack`` split), each a
    :class:`PackedBatch` whose ``ranks[r]`` are the lengths of its document pieces on rank ``r`` in order; rank
    ``r``'s rows are part 0's pieces, then part 1's; ``packed`` is the only part of an unsplit micro-batch;
    ``slices[d]`` says where packed document ``d`` (numbered over the parts in order) came from;
    ``step`` is this micro-batch's index in the stream (0-based, counted across resumes).
    """

    tokens: list[np.ndarray]
    labels: list[np.ndarray]
    parts: tuple[PackedBatch, ...]
    slices: list[DocSlice]
    step: int

    def __post_init__(self) -> None:
        if not self.parts:
            raise DataError("a micro-batch needs at least one packed part")
        n = self.parts[0].n_ranks
        if any(p.n_ranks != n for p in self.parts):
            raise DataError(f"the micro-batch's parts hold {[p.n_ranks for p in self.parts]} ranks; they must agree")
        if len(self.tokens) != n or len(self.labels) != n:
            raise DataError(f"micro-batch has {len(self.tokens)} token and {len(self.labels)} label arrays for "
                            f"{n} ranks")
        for r, (t, y) in enumerate(zip(self.tokens, self.labels, strict=True)):
            want = sum(p.rank_tokens[r] for p in self.parts)
            if t.shape != (want,) or y.shape != (want,):
                raise DataError(f"rank {r}: tokens {t.shape} / labels {y.shape} do not match its {want} packed tokens")
        docs = sum(len(p.doc_lengths) for p in self.parts)
        if len(self.slices) != docs:
            raise DataError(f"{len(self.slices)} slices for {docs} packed documents")

    @property
    def packed(self) -> PackedBatch:
        """The layout of an unsplit micro-batch (its one part)."""
        if len(self.parts) != 1:
            raise DataError(f"this micro-batch is packed as {len(self.parts)} independent parts; read its parts")
        return self.parts[0]

    @property
    def doc_lengths(self) -> list[int]:
        """Every packed document's length, over the parts in order (as ``slices``)."""
        return [n for p in self.parts for n in p.doc_lengths]

    def position_ids(self) -> list[np.ndarray]:
        """Per-rank int64 positions: restart at 0 per document, continue across a rank boundary."""
        out = []
        for r in range(self.parts[0].n_ranks):
            out.append(np.concatenate([np.arange(o, o + x, dtype=np.int64) for p in self.parts
                                       for x, o in zip(p.ranks[r], p.offsets[r], strict=True)]))
        return out


class PackedStream:
    """Endless, seeded, exactly resumable stream of ``MicroBatch``es over a ``DocumentSource``."""

    def __init__(self, source: DocumentSource, n_ranks: int, tokens_per_rank: int, seed: int = 0,
                 max_doc_tokens: int | None = None, shuffle: bool = True, parts: int = 1) -> None:
        for label, v, cap in (("n_ranks", n_ranks, MAX_RANKS), ("tokens_per_rank", tokens_per_rank, MAX_DOC_TOKENS),
                              ("parts", parts, 2)):
            check_int(v, label, 1, cap, DataError)
        if tokens_per_rank % parts:
            raise DataError(f"tokens_per_rank ({tokens_per_rank}) must divide into {parts} equal parts per rank")
        if not (_is_int(seed) and seed >= 0):
            raise DataError(f"seed must be an int >= 0, got {seed!r}")
        if max_doc_tokens is not None:
            check_int(max_doc_tokens, "max_doc_tokens (an int or None)", 1, MAX_DOC_TOKENS, DataError)
        if not isinstance(shuffle, bool):
            raise DataError(f"shuffle must be a bool, got {shuffle!r}")
        if len(source) < 1:
            raise DataError(f"data source {source.name} has no documents")
        self.source = source
        self.n_ranks = int(n_ranks)
        self.tokens_per_rank = int(tokens_per_rank)
        self.max_doc_tokens = None if max_doc_tokens is None else int(max_doc_tokens)
        self.shuffle = shuffle
        self.parts = int(parts)
        self.seed = int(seed)
        self._n_docs = len(source)
        self._epoch = self._cursor = self._offset = self._step = 0
        self._order_cache: tuple[int, int, np.ndarray] | None = None  # (seed, epoch, order)
        self._doc_cache: tuple[int, np.ndarray] | None = None  # (source index, tokens)

    def __iter__(self) -> Iterator[MicroBatch]:
        return self

    def __next__(self) -> MicroBatch:
        return self.next_micro_batch()

    @property
    def epoch(self) -> int:
        """Epoch of the next token to be read."""
        return self._epoch

    def next_micro_batch(self) -> MicroBatch:
        """Fill the next ``n_ranks * tokens_per_rank`` tokens (see the module docstring)."""
        epoch, cursor, offset = self._epoch, self._cursor, self._offset
        per_rank = self.tokens_per_rank // self.parts
        parts, slices, tokens, labels = [], [], [], []
        for _ in range(self.parts):
            need = self.n_ranks * per_rank
            pieces: list[np.ndarray] = []
            mine: list[DocSlice] = []
            while need:
                index = int(self._order(epoch)[cursor])
                doc = self._document(index)
                end = doc.size if self.max_doc_tokens is None else min(doc.size, (offset // self.max_doc_tokens + 1)
                                                                      * self.max_doc_tokens)
                take = min(end - offset, need)
                pieces.append(doc[offset: offset + take])
                mine.append(DocSlice(index, offset, take, epoch))
                offset += take
                need -= take
                if offset == doc.size:
                    offset, cursor = 0, cursor + 1
                    if cursor == self._n_docs:
                        epoch, cursor = epoch + 1, 0
            flat = np.concatenate(pieces)
            lab = np.empty_like(flat)
            lab[:-1] = flat[1:]
            lengths = [s.length for s in mine]
            lab[np.cumsum(lengths) - 1] = IGNORE_INDEX
            parts.append(pack_into_ranks(lengths, self.n_ranks, per_rank))
            cuts = [r * per_rank for r in range(1, self.n_ranks)]
            tokens.append(np.split(flat, cuts))
            labels.append(np.split(lab, cuts))
            slices += mine
        if self.parts == 1:
            tokens_r, labels_r = tokens[0], labels[0]
        else:  # rank r: its rows of part 0, then of part 1
            tokens_r = [np.concatenate([t[r] for t in tokens]) for r in range(self.n_ranks)]
            labels_r = [np.concatenate([y[r] for y in labels]) for r in range(self.n_ranks)]
        batch = MicroBatch(tokens_r, labels_r, tuple(parts), slices, self._step)
        self._epoch, self._cursor, self._offset = epoch, cursor, offset
        self._step += 1
        return batch

    def _order(self, epoch: int) -> np.ndarray:
        cached = self._order_cache
        if cached is not None and cached[0] == self.seed and cached[1] == epoch:
            return cached[2]
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(self._n_docs)
        else:
            order = np.arange(self._n_docs)
        self._order_cache = (self.seed, epoch, order)
        return order

    def _document(self, index: int) -> np.ndarray:
        if self._doc_cache is not None and self._doc_cache[0] == index:
            return self._doc_cache[1]
        doc = np.asarray(self.source.document(index))
        where = f"data source {self.source.name}, document {index}"
        if doc.ndim != 1 or doc.size == 0 or not np.issubdtype(doc.dtype, np.integer):
            raise DataError(f"{where}: expected a non-empty 1-D integer array, got dtype {doc.dtype}, "
                            f"shape {doc.shape}")
        lo, hi = int(doc.min()), int(doc.max())
        if lo < 0 or hi >= self.source.vocab_size:
            raise DataError(f"{where}: token id {lo if lo < 0 else hi} outside [0, {self.source.vocab_size})")
        doc = doc.astype(np.int64, copy=False)
        self._doc_cache = (index, doc)
        return doc

    def fingerprint(self) -> dict[str, Any]:
        """What a saved state must match: the source's identity and the stream's shape."""
        return {"source": self.source.name, "n_docs": self._n_docs, "vocab_size": int(self.source.vocab_size),
                "n_ranks": self.n_ranks, "tokens_per_rank": self.tokens_per_rank,
                "max_doc_tokens": self.max_doc_tokens, "shuffle": self.shuffle,
                **({"parts": self.parts} if self.parts > 1 else {})}

    def state_dict(self) -> dict[str, Any]:
        """Position of the stream as a JSON-serialisable dict (see the module docstring)."""
        return {"format": STATE_FORMAT, "version": STATE_VERSION, "seed": self.seed, "epoch": self._epoch,
                "cursor": self._cursor, "offset": self._offset, "step": self._step,
                "fingerprint": self.fingerprint()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume exactly where ``state`` was saved; ``DataError`` if it belongs to another source or shape."""
        if not isinstance(state, dict):
            raise DataError(f"stream state must be a dict, got {type(state).__name__}")
        want = set(self.state_dict())
        if set(state) != want:
            raise DataError(f"stream state keys {sorted(state)} != expected {sorted(want)}")
        if state["format"] != STATE_FORMAT or state["version"] != STATE_VERSION:
            raise DataError(f"stream state has format {state['format']!r} version {state['version']!r}, expected "
                            f"{STATE_FORMAT!r} version {STATE_VERSION}")
        ours = self.fingerprint()
        theirs = state["fingerprint"]
        if theirs != ours:
            if isinstance(theirs, dict):
                keys = [k for k in [*ours, *sorted(set(theirs) - set(ours))] if theirs.get(k) != ours.get(k)]
                detail = ", ".join(f"{k}: state {theirs.get(k)!r} vs stream {ours.get(k)!r}" for k in keys)
            else:
                detail = f"fingerprint {theirs!r}"
            raise DataError(f"stream state is for another source or shape ({detail})")
        for key in ("seed", "epoch", "cursor", "offset", "step"):
            if not (_is_int(state[key]) and state[key] >= 0):
                raise DataError(f"stream state {key!r} must be an int >= 0, got {state[key]!r}")
        if state["cursor"] >= self._n_docs:
            raise DataError(f"stream state cursor {state['cursor']} out of range for {self._n_docs} documents")
        old_seed = self.seed
        self.seed = int(state["seed"])
        index = int(self._order(int(state["epoch"]))[state["cursor"]])
        length = self.source.length(index)
        if state["offset"] >= length:
            self.seed = old_seed
            raise DataError(f"stream state offset {state['offset']} is past the end of document {index} "
                            f"({length} tokens) of {self.source.name}")
        self._epoch, self._cursor = int(state["epoch"]), int(state["cursor"])
        self._offset, self._step = int(state["offset"]), int(state["step"])
        self._doc_cache = None
